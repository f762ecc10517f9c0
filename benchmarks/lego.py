"""Speed of LoRA-LEGO at Llama-3-8B shape: 4 adapters, r = 16, clustered to k = 16 per module (224 modules).

Run: ``.venv/bin/python -m benchmarks.lego [--layers 32] [--device cpu] [--baseline ffc2762]``

Rows, all on the same inputs in the same run:

* *before*: ``lorakit.ops.lego`` and ``lorakit.ops.kmeans`` as they were at the ``--baseline`` commit (read with
  ``git show``, default ``ffc2762``, the last commit before the batched k-means), module by module, at their
  defaults then (canonical gauge, 4 restarts) and in the raw gauge (the clustering objective the new default
  minimises, for an objective-to-objective comparison); ``--baseline none`` skips them;
* *now*, module by module through the registered operator (what ``lorakit merge --method lego`` runs), and
  ``lego_merge`` (a window of modules clustered by one batched k-means), at the defaults (raw gauge, 8
  restarts), and ``lego_merge`` in the canonical gauge;
* how the k-means objective falls with the number of restarts (all 224 modules in one batch);
* lorakit's exact ``svd`` merge to the same rank (QR-core SVD of the 64-unit sum), the cheapest alternative.

Objective: the k-means inertia summed over modules (lower is better; the gauges cluster different vectors, so
compare within a gauge). Inputs: random factors with a trained-like decaying spectrum, generated per module
from a seed; only the merge calls are timed. Results go to ``docs/benchmarks/lego.md``.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import psutil
import torch

import lorakit
from lorakit.adapter import Adapter
from lorakit.linalg import factored_svd
from lorakit.ops import registry
from lorakit.ops.kmeans import kmeans_gram
from lorakit.ops.lego import _prepare
from lorakit.ops.rank_rules import rank_rule
from lorakit.testing import llama_shapes, random_factors
from lorakit.verbs.lego import lego_merge

OUT = Path("docs/benchmarks/lego.md")


def inputs_for(i: int, out: int, inn: int, n: int, rank: int):
    g = torch.Generator().manual_seed(1000 * i + 1)
    return [random_factors(out, inn, rank, scale=2.0, decay=0.85, generator=g) for _ in range(n)]


def load_baseline(commit: str) -> ModuleType:
    """The LEGO module of ``commit`` (and its k-means), importable beside today's: registration stubbed out."""
    tmp = Path(tempfile.mkdtemp(prefix="lego-baseline-"))

    def show(path: str) -> str:
        return subprocess.run(["git", "show", f"{commit}:{path}"], check=True, capture_output=True,
                              text=True).stdout

    (tmp / "_lego_baseline_kmeans.py").write_text(show("lorakit/ops/kmeans.py"))
    src = show("lorakit/ops/lego.py")
    src = src.replace("from lorakit.ops.kmeans import", "from _lego_baseline_kmeans import")
    src = src.replace("from lorakit.ops.registry import MergeResult, register",
                      "from lorakit.ops.registry import MergeResult\n\n\ndef register(*a, **k):\n"
                      "    return lambda f: f\n")
    (tmp / "_lego_baseline.py").write_text(src)
    sys.path.insert(0, str(tmp))
    mod = importlib.import_module("_lego_baseline")
    return mod


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--baseline", default="ffc2762", help="commit of the 'before' rows, or 'none'")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    shapes = llama_shapes(args.layers)
    rule = rank_rule(rank=args.k)
    load0 = psutil.getloadavg()[0]
    t = time.perf_counter()
    per_module = {name: inputs_for(i, o, n, args.adapters, args.rank) for i, (name, (o, n)) in enumerate(shapes.items())}
    adapters = [Adapter({m: fs[j] for m, fs in per_module.items()}) for j in range(args.adapters)]
    print(f"inputs generated in {time.perf_counter() - t:.0f} s", flush=True)
    ones = [1.0] * args.adapters

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    rows: list[tuple[str, float, float, float]] = []  # label, seconds, total inertia, median error

    def record(label: str, seconds: float, inertias: list[float], errors: list[float]) -> None:
        rows.append((label, seconds, sum(inertias), median(errors)))
        print(f"{label:<62} {seconds:8.2f} s  objective {sum(inertias):12.2f}  median error {median(errors):.4f}",
              flush=True)

    if args.baseline != "none":
        old = load_baseline(args.baseline)
        for gauge, label in (("canonical", "defaults then: canonical gauge"), ("raw", "raw gauge")):
            secs, inert, errs = 0.0, [], []
            for name, fs in per_module.items():
                t = time.perf_counter()
                _, asg = old.lego_module(fs, ones, rank_rule=rule, gauge=gauge, restarts=4, device=args.device,
                                         module=name)
                sync()
                secs += time.perf_counter() - t
                inert.append(asg.inertia)
                errs.append(asg.error)
            record(f"before ({args.baseline}), per module, {label}, 4 restarts", secs, inert, errs)

    spec = registry.resolve("lego")
    secs, inert, errs = 0.0, [], []
    for fs in per_module.values():
        on_dev = [f.to(dev) for f in fs]  # where the merge pipeline puts them for --device
        t = time.perf_counter()
        res = spec.fn(on_dev, ones, rank_rule=rule)
        res.factors.A.cpu()
        secs += time.perf_counter() - t
        inert.append(res.info["inertia"])
        errs.append(res.error)
    record("now, per module (registered operator), raw gauge, 8 restarts", secs, inert, errs)
    for gauge in ("raw", "canonical"):
        t = time.perf_counter()
        _, asg = lego_merge(adapters, k=args.k, gauge=gauge, device=args.device)  # type: ignore[arg-type]
        sync()
        record(f"now, lego_merge (batched k-means), {gauge} gauge, 8 restarts", time.perf_counter() - t,
               [a.inertia for a in asg.values()], [a.error for a in asg.values()])

    G = torch.stack([_prepare(fs, ones, rule, "raw", dev, name).G for name, fs in per_module.items()])
    restart_rows = []
    for r in (1, 2, 4, 8, 16, 32):
        t = time.perf_counter()
        km = kmeans_gram(G, args.k, seed=0, restarts=r)
        sync()
        restart_rows.append((r, float(km.inertia.sum()), time.perf_counter() - t, km.n_iter))
        print(f"restarts {r:>2}: objective {restart_rows[-1][1]:.2f} in {restart_rows[-1][2]:.2f} s", flush=True)

    t_svd = 0.0
    for fs in per_module.values():
        t = time.perf_counter()
        factored_svd([f.B for f in fs], [f.A for f in fs], [f.scale for f in fs]).truncate(args.k).to_factors()
        t_svd += time.perf_counter() - t
    load1 = psutil.getloadavg()[0]
    print(f"svd merge to rank {args.k}: {t_svd:.2f} s; load {load0:.2f} / {load1:.2f}")
    if args.no_write:
        return

    before = next((r for r in rows if r[0].startswith("before") and "canonical" in r[0]), None)
    cmd = ".venv/bin/python -m benchmarks.lego" + (f" --layers {args.layers}" if args.layers != 32 else "") + (
        f" --threads {args.threads}" if args.threads != 1 else "") + (
        f" --device {args.device}" if args.device != "cpu" else "")
    md = [
        f"# LoRA-LEGO speed ({args.adapters} × Llama-3-8B-shape adapters, r={args.rank} → k={args.k})",
        "",
        (f"Machine: shared 2-core CPU (other agents running), {args.threads} torch thread(s), device {args.device}; "
         f"Python {platform.python_version()}, torch {torch.__version__}, lorakit {lorakit.__version__}; load "
         f"average (1 min) {load0:.2f} before, {load1:.2f} after."),
        (f"Command: `{cmd}`. {len(shapes)} modules ({args.layers} layers × 7 projections); inputs: random factors "
         "with a decaying spectrum (0.85^i), fp32, all held in memory; only the merge calls are timed."),
        "",
        "| run | time | × faster than before | k-means objective (Σ inertia) | median rel. error vs exact sum |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, secs, obj, err in rows:
        speed = f"{before[1] / secs:.1f}×" if before else "–"
        md.append(f"| {label} | {secs:.2f} s | {speed} | {obj:.1f} | {err:.3f} |")
    md += [
        f"| lorakit exact svd merge to rank {args.k}, same inputs | {t_svd:.2f} s | – | – | – |",
        "",
        ("The objective is comparable within a gauge (the gauges cluster different vectors). The error column is "
         "‖merged − Σ ΔW_i‖/‖Σ ΔW_i‖: LEGO averages the members of a cluster, so on unrelated random adapters it "
         "stays far above the SVD optimum (Eckart–Young), which is not what it is for (see docs/lego.md)."),
        "",
        f"k-means objective against restarts (raw gauge, all {len(shapes)} modules in one batched call):",
        "",
        "| restarts | Σ inertia | time | Lloyd steps (slowest run) |",
        "| ---: | ---: | ---: | ---: |",
        *[f"| {r} | {obj:.1f} | {secs:.2f} s | {it} |" for r, obj, secs, it in restart_rows],
        "",
        ("Each restart keeps improving the objective on these unrelated random units (many equal local optima), "
         "so restarts are not cut short: all restarts of all modules run as one batch, 8 (the default) add well "
         "under a second to the whole adapter and reach a lower objective than the 4 sequential restarts before. "
         "In the canonical gauge every module of these synthetic inputs is the same k-means problem up to a "
         "rotation (the canonical units depend only on the spectrum, which is the same for every module here), "
         "so that row's objective is one draw repeated over all modules, and the 'before' seed happened to land "
         "in a lower optimum of it."),
        "",
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(md))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
