"""LQ-LoRA (Guo et al. 2024): base weights as a quantized matrix plus a low-rank part, ``W ≈ Q + L₁L₂``.

Per matrix, alternate (algorithms.md §3.2)::

    Q ← 0
    repeat (at most ``iters`` times):
        L₁, L₂ ← rank-r SVD of W − Q      (L₁ = U√S, L₂ = √S Vᵀ; randomized: r + 10 probes, 2 power iterations)
        Q      ← quantize(W − L₁L₂)        (block-wise NF/int codes, :mod:`lorakit.quant.blockwise`)
        err    ← ‖W − L₁L₂ − Q‖_F
        stop when err rises (or improves by less than ``tol`` relatively)

and keep the best iterate (the reference code returns the one that triggered the stop). ``Q`` stays frozen;
``L₁ = lora_B``, ``L₂ = lora_A`` initialise a LoRA at scale 1.

Bit budget: for every matrix ``i`` and configuration ``c`` (bits × block size, double-quantized constants) the
cost ``‖W_i − (Q + L₁L₂)‖²_F`` after a short decomposition and the exact storage ``s_ic`` are tabulated, and
``min Σ cost·x`` subject to ``Σ s·x ≤ budget·Σ numel``, one configuration per matrix, is solved with
``scipy.optimize.milp`` (:mod:`lorakit.quant.knapsack`). Matrices are streamed one at a time in both passes, by the verb
(:mod:`lorakit.verbs.lq_decompose`, which also reads residual files back).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lorakit.errors import OperatorParameterError
from lorakit.linalg import SVD, randomized_svd
from lorakit.quant.blockwise import QuantConfig, QuantizedTensor, dequantize_tensor, quantize_tensor
from lorakit.quant.mixed import default_code

RESIDUAL_KEY = "lorakit.lq_residual"
RESIDUAL_SCHEMA = "lorakit.lq_residual"
RESIDUAL_VERSION = 1
DEFAULT_GRID = tuple((b, blk) for b in (2, 3, 4, 8) for blk in (32, 64, 128))
DEFAULT_EXCLUDE = r"(embed|lm_head|norm)"


@dataclass
class LQResult:
    """The best iterate for one matrix: ``W ≈ Q + L1 @ L2``; ``errors`` are ``‖W − L₁L₂ − Q‖_F/‖W‖_F`` per
    iteration (the last one may be the rise that stopped it)."""

    Q: QuantizedTensor | None
    L1: torch.Tensor
    L2: torch.Tensor
    errors: list[float] = field(default_factory=list)
    best_iteration: int = 0

    @property
    def error(self) -> float:
        return self.errors[self.best_iteration]


def _low_rank(M: torch.Tensor, rank: int, *, exact: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if exact:
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        svd = SVD(U, S, Vh).truncate(rank)
    else:
        svd = randomized_svd(M, rank, oversample=10, n_iter=2, seed=seed, dtype=M.dtype)
    f = svd.to_factors()
    return f.B, f.A


def lq_decompose(
    W: torch.Tensor,
    rank: int,
    config: QuantConfig | None,
    *,
    iters: int = 20,
    tol: float = 1e-3,
    exact_svd: bool = False,
    seed: int = 0,
    pad: bool = False,
    device: torch.device | str | None = None,
) -> LQResult:
    """Decompose one matrix (see the module docstring). ``config=None`` switches quantization off (Q = 0), which
    leaves the rank-``rank`` SVD. Cost per iteration: one randomized SVD, O(out·in·(r + 10)·6), and one
    quantization, O(out·in·log 2^b)."""
    if W.ndim != 2:
        raise OperatorParameterError(f"LQ decomposition needs a 2-D matrix, got shape {tuple(W.shape)}")
    if rank < 1 or rank > min(W.shape):
        raise OperatorParameterError(
            f"rank {rank} is outside [1, {min(W.shape)}] for a {W.shape[0]}x{W.shape[1]} matrix"
        )
    Wf = W.detach().to(device=device or W.device, dtype=torch.float32)
    norm = float(Wf.norm()) or 1.0
    Qd = torch.zeros_like(Wf)
    best: LQResult | None = None
    errors: list[float] = []
    for t in range(max(1, iters)):
        L1, L2 = _low_rank(Wf - Qd, rank, exact=exact_svd, seed=seed + t)
        R = Wf - L1 @ L2
        q = quantize_tensor(R, config, pad=pad) if config is not None else None
        Qd = dequantize_tensor(q) if q is not None else torch.zeros_like(Wf)
        err = float((R - Qd).norm()) / norm
        errors.append(err)
        if best is None or err < best.error:
            best = LQResult(q, L1, L2, errors, t)
        if config is None or (t > 0 and err > errors[-2]) or (t > 0 and errors[-2] - err < tol * errors[-2]):
            break
    assert best is not None
    best.errors = errors
    return best


# ---- base weights in and out ----------------------------------------------------------------------------------
def matrices_to_decompose(
    keys: Iterable[str],
    shapes: Callable[[str], tuple[int, ...]],
    rank: int,
    include: str | None,
    exclude: str | None,
) -> list[str]:
    """2-D tensors named ``*.weight`` (or matching ``include``), not matching ``exclude``, with both sides > rank."""
    out = []
    for k in keys:
        shape = shapes(k)
        if len(shape) != 2 or min(shape) <= rank:
            continue
        if include is not None:
            if not re.search(include, k):
                continue
        elif not k.endswith(".weight"):
            continue
        if exclude and re.search(exclude, k):
            continue
        out.append(k)
    return out


@dataclass
class CostTable:
    """Per matrix ``i`` and configuration ``c``: squared error ``costs[i, c]`` after a short decomposition and
    exact storage ``storage[i, c]`` in bits (``inf`` where the block size does not divide the row)."""

    names: list[str]
    configs: list[QuantConfig]
    costs: np.ndarray
    storage: np.ndarray
    numel: np.ndarray


def grid_configs(grid: Iterable[tuple[int, int]] = DEFAULT_GRID) -> list[QuantConfig]:
    """The ILP's candidate configurations: ``(bits, block)`` pairs with the default code, double quantization."""
    return [QuantConfig(b, default_code(b), blk, True) for b, blk in grid]


def matrix_costs(W: torch.Tensor, rank: int, configs: Sequence[QuantConfig], *, iters: int = 2, pad: bool = False,
                 device: torch.device | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One matrix's row of the ILP: per configuration the squared error ``‖W − (Q + L₁L₂)‖²_F`` after a short
    decomposition (``iters``) and the exact storage of ``Q`` in bits; ``inf`` where the block does not divide
    the row (without ``pad``). Cost: one :func:`lq_decompose` per configuration. The loop over a checkpoint's
    matrices is the verb's (:func:`lorakit.verbs.lq_decompose.plan_budget`, through the engine's stream)."""
    W = W.float()
    costs, storage = np.full(len(configs), np.inf), np.full(len(configs), np.inf)
    wn2 = float(W.norm()) ** 2
    for c, cfg in enumerate(configs):
        if W.shape[1] % cfg.block and not pad:
            continue
        res = lq_decompose(W, rank, cfg, iters=iters, pad=pad, device=device)
        costs[c] = res.error**2 * wn2
        assert res.Q is not None
        storage[c] = res.Q.storage_bits
    return costs, storage


def solve_budget(table: CostTable, budget: float) -> tuple[dict[str, QuantConfig], dict[str, Any]]:
    """One configuration per matrix minimising the total squared error with ``Σ storage ≤ budget·Σ numel``."""
    from lorakit.quant.knapsack import choose_one_per_item

    total = float(table.numel.sum())
    choice = choose_one_per_item(table.costs, table.storage, budget * total)
    chosen = {n: table.configs[int(c)] for n, c in zip(table.names, choice)}
    used = float(sum(table.storage[i, int(c)] for i, c in enumerate(choice)))
    predicted = float(sum(table.costs[i, int(c)] for i, c in enumerate(choice)))
    return chosen, {
        "avg_bits": used / total,
        "budget": budget,
        "configs": len(table.configs),
        "predicted_sq_error": predicted,
    }


