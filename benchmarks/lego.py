"""Speed of LoRA-LEGO at Llama-3-8B shape: 4 adapters, r = 16, clustered to k = 16 per module (224 modules).

Run: ``.venv/bin/python -m benchmarks.lego [--layers 32] [--restarts 4] [--device cpu]``

No other tool implements LoRA-LEGO, so the comparison in the same run is lorakit's exact ``svd`` route to the
same output rank (QR-core SVD of the 64-unit sum, truncated to 16), which is the cheapest alternative merge
of the same inputs to the same size. Inputs are generated per module from a seed (trained-like spectra), so
memory holds one module's inputs at a time plus the merged output. Only the merge calls are timed. Peak memory
is the process's peak RSS (``resource.getrusage``), reported with the RSS before the merge started.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from pathlib import Path

import psutil
import torch

import lorakit
from lorakit.linalg import factored_svd
from lorakit.ops.lego import lego_module
from lorakit.ops.rank_rules import rank_rule
from lorakit.testing import llama_shapes, random_factors

OUT = Path("docs/benchmarks/lego.md")
THREAD_NOTE = (
    'With 2 torch threads on this machine, loaded by other agents (load average about 12 on 2 cores), one'
    ' 14336×4096 module took 15 s instead of about 1 s with 1 thread (threads waiting on descheduled peer'
    's), so this run used 1 thread; on an idle 2-core machine pass `--threads 2`.'
)


def inputs_for(i: int, out: int, inn: int, n: int, rank: int):
    g = torch.Generator().manual_seed(1000 * i + 1)
    return [random_factors(out, inn, rank, scale=2.0, decay=0.85, generator=g) for _ in range(n)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--restarts", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shapes = llama_shapes(args.layers)
    rule = rank_rule(rank=args.k)
    rss0 = psutil.Process().memory_info().rss
    t_lego = t_svd = 0.0
    kept: dict[str, lorakit.LoraFactors] = {}
    errs, bests, iters = [], [], []
    load0 = psutil.getloadavg()[0]
    for i, (name, (out, inn)) in enumerate(shapes.items()):
        fs = inputs_for(i, out, inn, args.adapters, args.rank)
        t = time.perf_counter()
        merged, asg = lego_module(fs, [1.0] * len(fs), rank_rule=rule, restarts=args.restarts, device=args.device,
                                  module=name)
        t_lego += time.perf_counter() - t
        kept[name] = merged
        errs.append(asg.error)
        bests.append(asg.best_error)
        t = time.perf_counter()
        svd = factored_svd([f.B for f in fs], [f.A for f in fs], [f.scale for f in fs]).truncate(args.k)
        svd.to_factors()
        t_svd += time.perf_counter() - t
        del fs
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    load1 = psutil.getloadavg()[0]
    out_mb = sum(f.A.numel() + f.B.numel() for f in kept.values()) * 4 / 2**20
    in_mb = out_mb * args.adapters * args.rank / args.k
    rows = [
        ("modules", f"{len(shapes)} ({args.layers} layers × 7 projections)"),
        ("inputs", f"{args.adapters} adapters, r={args.rank}, fp32 ({in_mb:.0f} MiB together)"),
        ("LEGO k=16 (4 restarts, k-means++) total", f"{t_lego:.2f} s ({1000 * t_lego / len(shapes):.1f} ms/module)"),
        ("lorakit exact svd merge to rank 16, same run", f"{t_svd:.2f} s"),
        ("LEGO / svd time", f"{t_lego / t_svd:.2f}×"),
        ("peak RSS of the process", f"{peak / 2**20:.0f} MiB (RSS before merging {rss0 / 2**20:.0f} MiB; "
                                    f"merged output {out_mb:.0f} MiB held in memory)"),
        ("LEGO rel. error vs exact sum (median)", f"{sorted(errs)[len(errs) // 2]:.3f}"),
        ("best rank-16 error (Eckart–Young, median)", f"{sorted(bests)[len(bests) // 2]:.3f}"),
        ("load average (1 min) before / after", f"{load0:.2f} / {load1:.2f}"),
    ]
    w = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    if args.no_write:
        return
    cmd = ".venv/bin/python -m benchmarks.lego" + (f" --layers {args.layers}" if args.layers != 32 else "") + (
        f" --threads {args.threads}" if args.threads != 1 else "")
    md = [
        "# LoRA-LEGO speed (4 × Llama-3-8B-shape adapters, r=16 → k=16)",
        "",
        f"Machine: shared 2-core CPU (other agents running), {args.threads} torch thread(s), device {args.device}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, lorakit {lorakit.__version__}.",
        f"Command: `{cmd}`. Inputs: random factors with a decaying spectrum (0.85^i), one module at a time.",
        "",
        "| quantity | value |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        "There is no public LoRA-LEGO implementation to compare with; the svd row is lorakit's exact QR-core merge "
        "of the same inputs to the same rank, timed in the same run. The error rows say what clustering costs "
        "against the exact sum: LEGO averages units of a cluster, so on unrelated random adapters its error stays "
        "above the SVD optimum — it is meant for adapters whose units are related (see docs/lego.md and the "
        "merge-quality benchmark). Numbers as measured in one run; the machine is shared, so timings are noisy.",
        "",
        *([THREAD_NOTE] if args.threads == 1 else []),
        "",
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(md))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
