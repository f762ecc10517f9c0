"""LoRA-LEGO quality on the tiny-task test bed: lorakit's ``lego`` (the paper's raw units, the default) against
the float64 loop reference (``benchmarks/lego_reference.py``), the former default (canonical gauge, 4 restarts)
and the exact sum, four rank-r adapters merged at κ = r, each at per-adapter weight λ.

Run: ``.venv/bin/python -m benchmarks.lego_quality [--ranks 8 16] [--seed 0]`` (uses the base and adapters of
``benchmarks.tiny_tasks``, cached under ``bench-out/tiny_tasks/``). Writes ``docs/benchmarks/lego_quality.md``.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

import lorakit
from benchmarks import tiny_tasks as tt
from benchmarks.lego_reference import reference_lego
from lorakit.adapter import Adapter, cat
from lorakit.factors import LoraFactors
from lorakit.verbs.lego import lego_merge

OUT = Path("docs/benchmarks/lego_quality.md")
LAMBDAS = (0.25, 0.5, 0.75, 1.0)
F64 = torch.float64


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    base, _ = tt.build_base(args.seed, verbose=False)
    tasks = tt.make_tasks(args.seed)
    copy = tt.copy_task(args.seed)
    rows: list[tuple[int, str, str, list[float], float]] = []

    def score(r: int, method: str, params: str, adapter: Adapter | None) -> float:
        model = tt.apply(base, adapter)
        accs = [tt.accuracy(model, t) for t in tasks]
        rows.append((r, method, params, accs, tt.accuracy(model, copy)))
        mean = sum(accs) / len(accs)
        print(f"r={r} {method:<34} {params:<26} " + " ".join(f"{a:.3f}" for a in accs) + f"  mean {mean:.3f}",
              flush=True)
        return mean

    for r in args.ranks:
        ads = [tt.train_adapter(base, t, r, args.seed, verbose=False) for t in tasks]
        n = len(ads)
        score(r, "base", "", None)
        for lam in LAMBDAS:
            score(r, "exact sum (cat)", f"λ={lam:g}", cat(ads, [lam] * n))
            merged, _ = lego_merge(ads, [lam] * n, k=r)
            score(r, "lego (raw units, default)", f"λ={lam:g}, κ={r}", merged)
            old, _ = lego_merge(ads, [lam] * n, k=r, gauge="canonical", restarts=4)
            score(r, "lego canonical (former default)", f"λ={lam:g}, κ={r}", old)
            ref, num, den = {}, 0.0, 0.0
            for m in ads[0]:
                fs = [a[m] for a in ads]
                d = reference_lego([(f.B, f.A, f.scale) for f in fs], [lam] * n, r).delta
                ref[m] = LoraFactors(torch.eye(d.shape[1], dtype=F64), d, 1.0)  # dense ΔW as B, A = I
                num += float((merged[m].delta(F64) - d).norm() ** 2)
                den += float(d.norm() ** 2)
            score(r, "float64 reference", f"λ={lam:g}, κ={r} (ΔW rel. diff {(num / den) ** 0.5:.1e})",
                  Adapter(ref))
    total = time.perf_counter() - t0
    if args.no_write:
        return
    names = [t.name for t in tasks]
    md = [
        "# LoRA-LEGO quality on the tiny tasks",
        "",
        (f"Command: `.venv/bin/python -m benchmarks.lego_quality --ranks {' '.join(map(str, args.ranks))}"
        f" --seed {args.seed}`; Python {platform.python_version()}, torch {torch.__version__}, lorakit "
        f"{lorakit.__version__}; {total:.0f} s. Test bed: `benchmarks/tiny_tasks.py` (four tasks, one PEFT LoRA "
        "of rank r each); score: exact match on 512 held-out examples per task. Every merge gives each adapter "
        "the weight λ; LEGO merges the four rank-r adapters to κ = r."),
        "",
        "| r | method | parameters | " + " | ".join(names) + " | mean | copy (base skill) |",
        "| ---: | --- | --- | " + " | ".join("---:" for _ in names) + " | ---: | ---: |",
    ]
    for r, method, params, accs, kept in rows:
        md.append(f"| {r} | {method} | {params} | " + " | ".join(f"{a:.3f}" for a in accs)
                  + f" | {sum(accs) / len(accs):.3f} | {kept:.3f} |")
    md += ["", ("The float64 reference rows score what lorakit's default rows score: the operator is the paper's "
           "method up to float32 rounding. The canonical rows are the former default."), ""]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(md))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
