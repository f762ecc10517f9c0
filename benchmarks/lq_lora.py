"""``python -m benchmarks.lq_lora [--layers N] [--rank R]``: LQ-LoRA on a 1B-shaped random-plus-low-rank set.

Matrices with Llama-3.2-1B projection shapes (hidden 2048, intermediate 8192, 8 KV heads of 64), each
``W = G/√in + U diag(s) Vᵀ`` (Gaussian bulk plus a decaying rank-128 spike, like trained weights' spectra).
Measured: the error over the alternation's iterations, LQ-LoRA against plain NF quantization of the same
matrices at the same bits (for Q alone and counting the bf16 low-rank factors), and the ILP's allocation for
average-bit budgets (budget met, configurations chosen, error). Writes ``docs/benchmarks/lq_lora.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._env import markdown_table

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks" / "lq_lora.md"
SHAPES_1B = {
    "self_attn.q_proj": (2048, 2048),
    "self_attn.k_proj": (512, 2048),
    "self_attn.v_proj": (512, 2048),
    "self_attn.o_proj": (2048, 2048),
    "mlp.gate_proj": (8192, 2048),
    "mlp.up_proj": (8192, 2048),
    "mlp.down_proj": (2048, 8192),
}


def make_matrix(out: int, inn: int, seed: int, spike_rank: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = min(spike_rank, out, inn)
    U, _ = torch.linalg.qr(torch.randn(out, k, generator=g))
    V, _ = torch.linalg.qr(torch.randn(inn, k, generator=g))
    s = 6.0 * 0.97 ** torch.arange(k, dtype=torch.float32)
    return torch.randn(out, inn, generator=g) / inn**0.5 + (U * s) @ V.T




def main(argv: list[str] | None = None) -> int:
    from lorakit.quant.blockwise import QuantConfig, dequantize_tensor, quantize_tensor
    from lorakit.quant.lq_lora import CostTable, lq_decompose, solve_budget

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--budgets", type=float, nargs="+", default=[2.75, 3.25])
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    load = os.getloadavg()[0]
    mats = {
        f"model.layers.{layer}.{n}.weight": shape
        for layer in range(args.layers)
        for n, shape in SHAPES_1B.items()
    }
    seeds = {n: i for i, n in enumerate(mats)}

    def get(name: str) -> torch.Tensor:
        out, inn = mats[name]
        return make_matrix(out, inn, seeds[name])

    total = sum(o * i for o, i in mats.values())
    lowrank_bits = sum(16 * args.rank * (o + i) for o, i in mats.values()) / total
    t_start = time.perf_counter()
    configs = [QuantConfig(b, "nf", 64, True) for b in args.bits]
    names = list(mats)
    # One full decomposition per matrix and configuration: it gives the comparison with plain NF, the iteration
    # curves, and the ILP's cost table (squared error and exact storage, as LQ-LoRA tabulates them).
    costs = np.full((len(names), len(configs)), np.inf)
    storage = np.full_like(costs, np.inf)
    plain_sq = np.zeros_like(costs)
    numel = np.zeros(len(names))
    norms2 = np.zeros(len(names))
    curves: dict[int, list[list[float]]] = {b: [] for b in args.bits}
    seconds = dict.fromkeys(args.bits, 0.0)
    for i, name in enumerate(names):
        W = get(name)
        numel[i] = W.numel()
        norms2[i] = float(W.norm()) ** 2
        for c, cfg in enumerate(configs):
            t0 = time.perf_counter()
            res = lq_decompose(W, args.rank, cfg, iters=args.iters)
            seconds[cfg.bits] += time.perf_counter() - t0
            assert res.Q is not None
            costs[i, c] = res.error**2 * norms2[i]
            storage[i, c] = res.Q.storage_bits
            plain_sq[i, c] = float((W - dequantize_tensor(quantize_tensor(W, cfg))).norm()) ** 2
            curves[cfg.bits].append(res.errors)
            print(cfg.bits, name, [f"{e:.4f}" for e in res.errors], flush=True)
    compare_rows = []
    for c, cfg in enumerate(configs):
        q_bits = storage[:, c].sum() / total
        compare_rows.append(
            [
                f"NF{cfg.bits}",
                f"{q_bits:.3f}",
                f"{q_bits + lowrank_bits:.3f}",
                f"{math.sqrt(plain_sq[:, c].sum() / norms2.sum()):.4f}",
                f"{math.sqrt(costs[:, c].sum() / norms2.sum()):.4f}",
                f"{seconds[cfg.bits]:.0f}",
            ]
        )
    iter_rows = []
    for bits, runs in curves.items():
        longest = max(len(r) for r in runs)
        for t in range(longest):
            per = [min(r[: t + 1]) for r in runs]
            iter_rows.append(
                [
                    f"NF{bits}",
                    t + 1,
                    f"{sum(per) / len(per):.5f}",
                    f"{max(per):.5f}",
                    sum(1 for r in runs if len(r) > t),
                ]
            )
    table = CostTable(names, configs, costs, storage, numel)
    ilp_rows = []
    for budget in args.budgets:
        chosen, facts = solve_budget(table, budget)
        picks = [configs.index(chosen[n]) for n in names]
        err = math.sqrt(sum(costs[i, c] for i, c in enumerate(picks)) / norms2.sum())
        uniform = [c for c, cfg in enumerate(configs) if storage[:, c].sum() / total <= budget]
        best_uniform = (
            f"NF{configs[uniform[-1]].bits}: {math.sqrt(costs[:, uniform[-1]].sum() / norms2.sum()):.4f}"
            if uniform
            else "none fits"
        )
        picked = ", ".join(f"{n.split('.')[-2]}: {chosen[n].bits}" for n in names)
        ilp_rows.append(
            [
                f"{budget:g}",
                f"{facts['avg_bits']:.3f}",
                "yes" if facts["avg_bits"] <= budget else "NO",
                f"{err:.4f}",
                best_uniform,
                picked,
            ]
        )
        print(ilp_rows[-1], flush=True)
    cmd = "python -m benchmarks.lq_lora " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        from benchmarks._env import header_markdown

        head = header_markdown()
    except ImportError:
        import platform

        head = f"Machine: {os.cpu_count()} cores (shared), python {platform.python_version()}, torch {torch.__version__}."
    parts = [
        "## LQ-LoRA: low-rank plus quantized base weights",
        "",
        (f"Command: `{cmd.strip()}`. {head} Load average at start: {load:.1f} (shared machine). Total wall time "
        f"{time.perf_counter() - t_start:.0f} s; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB."),
        "",
        (f"Matrix set: {len(mats)} matrices with Llama-3.2-1B shapes ({args.layers} layer(s) of q/k/v/o/gate/up/down, "
        f"{total / 1e6:.1f} M parameters), each a Gaussian bulk plus a decaying rank-128 spike. LoRA rank "
        f"{args.rank}; the low-rank factors in bf16 add {lowrank_bits:.3f} bits/parameter. Errors are "
        "‖W − (Q + L₁L₂)‖_F/‖W‖_F over the whole set; block 64 with double quantization."),
        "",
        "### Against plain NF quantization of the same matrices",
        "",
        markdown_table(
            ["code", "Q bits/param", "Q + L bits/param", "plain NF error", "LQ-LoRA error", "seconds"],
            compare_rows,
        ),
        "",
        "### Error over the iterations (best so far, mean and worst over matrices)",
        "",
        markdown_table(
            ["code", "iteration", "mean error", "worst error", "matrices still iterating"], iter_rows
        ),
        "",
        (f"### ILP allocation (one configuration per matrix among NF{'/'.join(map(str, args.bits))} at block 64, "
        "costs = squared error after the full alternation, exact storage; scipy.optimize.milp)"),
        "",
        markdown_table(
            [
                "budget bits/param",
                "achieved",
                "met",
                "LQ-LoRA error (ILP)",
                "best uniform bits within budget: error",
                "bits per matrix",
            ],
            ilp_rows,
        ),
        "",
    ]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(parts))
    print("\n".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
