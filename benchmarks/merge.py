"""Merge benchmark: lorakit against PEFT's ``add_weighted_adapter`` on the same 8B-shaped adapters, one run.

    .venv/bin/python -m benchmarks.merge [--subset k_proj,gate_proj] [--layers 32] [--skip-peft]

- Adapters: ``random_adapter(llama_shapes(32), rank=16, decay=0.85, dtype=bfloat16)`` (224 modules of the
  Llama-3-8B shapes), 8 of them, written as PEFT safetensors into a temporary directory.
- ``svd`` for 2 and 8 adapters: lorakit on all 224 modules and on the PEFT subset; PEFT's
  ``add_weighted_adapter(combination_type="svd", svd_rank=16)`` on the subset (a dense SVD per module on a
  shared 2-core CPU takes minutes, so all 224 modules are out of reach); PEFT's time for 224 modules is
  extrapolated from the subset by the dense-SVD cost model ``out·in·min(out, in)`` and marked as such.
- ``ties --rank 16`` (density 0.5, weights 1) against PEFT ``ties_svd`` on the subset: time, error against the
  dense TIES result (PEFT's own ``merge_utils.ties`` on the dense stack), peak RSS.
- End to end: ``lorakit merge a0 a1 -o out.safetensors`` as a subprocess: wall time and peak RSS.

Every measurement runs in a fresh process (peak RSS from ``getrusage``); the baseline of a process that only
imports torch and lorakit is reported beside them.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RANK = 16
DECAY = 0.85
DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "merge.md"


# ---- child processes ----------------------------------------------------------------------------------------
def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(target, args, queue):
    import torch

    # One thread per process: on the shared, loaded 2-core machine OpenMP threads contend (a 14336×32 QR ran
    # 24× slower with 2 threads than with 1 at load average 13). Same setting for lorakit and PEFT.
    torch.set_num_threads(1)
    try:
        queue.put(("ok", target(*args), _peak_mb()))
    except Exception as e:  # noqa: BLE001 (any failure of the peer is reported as its result, not hidden)
        queue.put(("error", f"{type(e).__name__}: {e}", _peak_mb()))


def in_child(target, *args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(target, args, q))
    p.start()
    status, value, peak = q.get()
    p.join()
    if status != "ok":
        raise RuntimeError(value)
    return value, peak


def baseline():

    return 0.0


def generate(folder: str, layers: int, count: int) -> list[str]:
    import torch

    import lorakit
    from lorakit.testing import llama_shapes, random_adapter

    paths = []
    for i in range(count):
        a = random_adapter(llama_shapes(layers), RANK, decay=DECAY, dtype=torch.bfloat16, seed=100 + i)
        path = Path(folder) / f"a{i}.safetensors"
        lorakit.save(a, path, format="peft")
        paths.append(str(path))
    return paths


def lorakit_merge(paths, method, subset, params):
    """Merge in memory (no file written); returns seconds (after the header-only plan), per-module errors."""
    import torch

    from lorakit.pipeline import plan_merge, run_merge
    from lorakit.run import RunOptions

    plan = plan_merge(paths, [1.0 / len(paths)] * len(paths) if method == "svd" else None, method,
                      params=params, rank=RANK)
    if subset:
        plan.modules = [m for m in plan.modules if m.rsplit(".", 1)[-1] in subset and ".layers.0." in m]
        plan.infos = {m: plan.infos[m] for m in plan.modules} if plan.infos else None
    # Timed from here: reading the factors and merging (PEFT's time likewise starts with adapters loaded).
    t0 = time.perf_counter()
    run = run_merge(plan, RunOptions.resolve("cpu", dtype=torch.float32))  # compare in float32, as PEFT computes
    merged = {m: run.adapter[m] for m in plan.modules}
    seconds = time.perf_counter() - t0
    return seconds, {m: run.results[m].error for m in merged}, {m: (merged[m].A.float().numpy(),
                                                                   merged[m].B.float().numpy())
                                                                  for m in merged} if subset else None


def peft_merge(paths, combination, subset, density):
    """PEFT's real ``add_weighted_adapter`` on a model made of just the subset's Linear shapes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.utils import merge_utils
    from torch import nn

    import lorakit

    adapters = [lorakit.load(p) for p in paths]
    names = [m for m in adapters[0] if m.rsplit(".", 1)[-1] in subset and ".layers.0." in m]
    root = nn.Module()
    for m in names:
        info = adapters[0].info(m)
        parent = root
        *path, leaf = m.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, torch.nn.utils.skip_init(nn.Linear, info.in_features, info.out_features,
                                                         bias=False, dtype=torch.bfloat16))
    # PEFT's scaling is 1 (alpha = r); each module's own scale is folded into lora_B below, so PEFT's ΔW is the
    # files' s·B@A whatever alpha they were written with.
    cfg = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=names)
    model = get_peft_model(root, cfg, adapter_name="a0")
    for i in range(1, len(adapters)):
        model.add_adapter(f"a{i}", cfg)
    with torch.no_grad():
        for m in names:
            layer = model.base_model.model.get_submodule(m)
            for i, a in enumerate(adapters):
                f = a[m]
                layer.lora_A[f"a{i}"].weight.copy_(f.A.float())
                layer.lora_B[f"a{i}"].weight.copy_(f.B.float() * f.scale)
    n = len(adapters)
    weights = [1.0 / n] * n if combination == "svd" else [1.0] * n
    t0 = time.perf_counter()
    model.base_model.add_weighted_adapter([f"a{i}" for i in range(n)], weights, "m", combination_type=combination,
                                          svd_rank=RANK, density=density)
    seconds = time.perf_counter() - t0
    deltas = {}
    errors = {}
    with torch.no_grad():
        for m in names:
            layer = model.base_model.model.get_submodule(m)
            got = layer.get_delta_weight("m").float()
            stack = torch.stack([a[m].delta(torch.float32) for a in adapters])
            if combination == "svd":
                target = (stack * torch.tensor(weights).view(-1, 1, 1)).sum(0)
            else:  # PEFT's own dense TIES (the target both ties_svd and lorakit's ties approximate)
                target = merge_utils.ties(stack, torch.tensor(weights), density)
            errors[m] = float((got - target).norm() / target.norm())
            deltas[m] = got.numpy()  # numpy: tensors do not cross process boundaries safely
    return seconds, errors, {m: d for m, d in deltas.items()}


def end_to_end(paths, out):
    lk = str(Path(sys.executable).with_name("lorakit"))
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([lk, "merge", paths[0], paths[1], "-o", out, "-q"], capture_output=True, text=True,
                          env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(proc.stderr)
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


# ---- main -----------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--subset", default="k_proj,gate_proj", help="layer-0 projections PEFT is timed on")
    ap.add_argument("--counts", default="2,8")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    subset = args.subset.split(",")
    counts = [int(c) for c in args.counts.split(",")]
    lines: list[str] = []
    after: list[str] = []

    def say(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    import numpy as np
    import peft
    import torch

    from lorakit.testing import LLAMA_8B_SHAPES

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        paths, _ = in_child(generate, tmp, args.layers, max(counts))
        gen_s = time.perf_counter() - t0
        _, base_mb = in_child(baseline)
        say(f"adapters: {max(counts)} × {args.layers * 7} modules (Llama-3-8B shapes), r={RANK}, decay {DECAY}, "
            f"bf16, PEFT safetensors, {Path(paths[0]).stat().st_size / 2**20:.0f} MB each (generated in {gen_s:.0f} s)")
        say(f"baseline peak RSS of a process importing torch + lorakit: {base_mb:.0f} MB")
        say()
        say("| task | adapters | modules | lorakit s | PEFT s | ratio | lorakit error | PEFT error | "
            "lorakit peak RSS MB | PEFT peak RSS MB |")
        say("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        sub_cost = sum(LLAMA_8B_SHAPES[k][0] * LLAMA_8B_SHAPES[k][1] * min(LLAMA_8B_SHAPES[k])
                       for k in LLAMA_8B_SHAPES if k.rsplit(".", 1)[-1] in subset)
        all_cost = args.layers * sum(o * i * min(o, i) for o, i in LLAMA_8B_SHAPES.values())
        for n in counts:
            ps = paths[:n]
            (full_s, full_err, _), full_mb = in_child(lorakit_merge, ps, "svd", None, {})
            (sub_s, sub_err, ours), sub_mb = in_child(lorakit_merge, ps, "svd", subset, {})
            if args.skip_peft:
                say(f"| svd, all modules | {n} | {len(full_err)} | {full_s:.2f} | - | - | {max(full_err.values()):.4f} | - | "
                    f"{full_mb:.0f} | - |")
                continue
            (p_s, p_err, p_deltas), p_mb = in_child(peft_merge, ps, "svd", subset, None)
            same = max(float(np.linalg.norm(ours[m][1] @ ours[m][0] - p_deltas[m]) / np.linalg.norm(p_deltas[m]))
                       for m in p_deltas)
            say(f"| svd, subset ({args.subset}) | {n} | {len(p_err)} | {sub_s:.3f} | {p_s:.2f} | "
                f"{p_s / sub_s:.0f}× | {max(sub_err.values()):.4f} | {max(p_err.values()):.4f} | {sub_mb:.0f} | {p_mb:.0f} |")
            est = p_s * all_cost / sub_cost
            say(f"| svd, all modules (PEFT extrapolated) | {n} | {len(full_err)} | {full_s:.2f} | ~{est:.0f} (est.) | "
                f"~{est / full_s:.0f}× (est.) | {max(full_err.values()):.4f} | - | {full_mb:.0f} | - |")
            after.append(f"- {n} adapters: max relative ΔW difference between lorakit `svd` and PEFT `svd` on the "
                         f"subset: {same:.2e} (float32 rounding; the errors agree)")
            (t_s, t_err, _), t_mb = in_child(lorakit_merge, ps, "ties", subset, {"density": 0.5})
            (pt_s, pt_err, _), pt_mb = in_child(peft_merge, ps, "ties_svd", subset, 0.5)
            say(f"| ties density 0.5 → rank {RANK}, subset | {n} | {len(t_err)} | {t_s:.2f} | {pt_s:.2f} | "
                f"{pt_s / t_s:.1f}× | {max(t_err.values()):.4f} | {max(pt_err.values()):.4f} | {t_mb:.0f} | {pt_mb:.0f} |")
        out = str(Path(tmp) / "merged.safetensors")
        (e2e_s, e2e_mb), _ = in_child(end_to_end, paths[:2], out)
        say()
        for line in after:
            say(line)
        say()
        say(f"end to end: `lorakit merge a0.safetensors a1.safetensors -o merged.safetensors` (cat, exact, "
            f"{args.layers * 7} modules): {e2e_s:.2f} s wall, peak RSS {e2e_mb:.0f} MB")
    load_after = os.getloadavg()
    say()
    say(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs "
        f"(load average {load_before[0]:.1f} before, {load_after[0]:.1f} after); torch {torch.__version__}, "
        f"peft {peft.__version__}, Python {platform.python_version()}")
    if not args.no_doc:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        cmd = "python -m benchmarks.merge " + " ".join(sys.argv[1:])
        DOC.write_text("# Merge benchmark\n\nCommand: `" + cmd.strip() + "` (one run; all numbers from that run)."
                       "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
