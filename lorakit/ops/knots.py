"""Merges in a shared low-dimensional basis: KnOTS (Stoica et al. 2025) and Core Space (Panariello et al. 2025).

Both apply an element-wise merge (TIES, DARE, ...; see :mod:`lorakit.ops._kernels`) to small matrices in a
basis shared by all inputs, so nothing of size out×in is ever formed. With the plain ``linear`` merge both are
exactly ``Σ_i w_i·ΔW_i``.

KnOTS, factored. ``[ΔW_1 … ΔW_n] = [w_1 s_1 B_1 … w_n s_n B_n]·blockdiag(A_1 … A_n)``. With ``B_cat = Q_B R_B``
and ``A_iᵀ = Q_i R_i`` (reduced QR), the ``R×R`` core ``R_B·blockdiag(R_iᵀ) = U_c Σ V_cᵀ`` gives the exact SVD
``U = Q_B U_c`` and ``V_iᵀ = V_cᵀ[:, block i]·Q_iᵀ``. The aligned tasks are ``τ̃_i = Σ V_iᵀ`` (``ρ × in``);
they are merged to ``τ̃_m`` and the result is ``ΔW = U·τ̃_m`` (``B = U``, ``A = τ̃_m``). Cost O((out + in)·R²).
The paper merges all modules' ``τ̃`` as one vector; lorakit merges per module (as mergekit does per tensor).

Core Space. ``U_B`` = left singular vectors of ``[w_i s_i B_i]``, ``V_A`` = right singular vectors of
``[A_1; …; A_n]``; cores ``M_i = U_Bᵀ(w_i s_i B_i)(A_i V_A)`` (``R×R``) are merged to ``M``; ``ΔW = U_B M V_Aᵀ``.
Lossless because ``U_B U_Bᵀ B_i = B_i`` and ``A_i V_A V_Aᵀ = A_i``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from lorakit.errors import OperatorParameterError
from lorakit.factors import LoraFactors
from lorakit.linalg import compute_dtype, svd_of
from lorakit.ops import _kernels as K
from lorakit.ops.merge_delta import check_params, keep_count
from lorakit.ops.merge_exact import check_same_shape
from lorakit.ops.rank_rules import RankRule
from lorakit.ops.registry import MergeResult, register

Inner = Literal["linear", "ties", "magnitude_prune", "dare_linear", "dare_ties"]
INNER: tuple[str, ...] = ("linear", "ties", "magnitude_prune", "dare_linear", "dare_ties")


def merge_stack(x: torch.Tensor, inner: str, *, density: float, seed: int, module: str) -> torch.Tensor:
    """Element-wise merge of a small stack ``x (n, rows, cols)`` (one tile) with the ``inner`` method."""
    if inner not in INNER:
        raise OperatorParameterError(f"unknown inner method {inner!r} (one of {', '.join(INNER)})",
                                     parameter="inner")
    check_params(density=density)
    if inner == "linear":
        return x.sum(0)
    if inner in ("ties", "magnitude_prune"):
        ks = torch.full((x.shape[0], 1), keep_count(density, x[0].numel()), dtype=torch.int64)
        bound = x.abs().flatten(1).max(1).values.double() * (1 + 1e-6) + 1e-30
        t = K.kth_largest_abs(lambda: iter([(0, x)]), ks, bound)[:, 0]
        x = K.trim(x, t)
    else:
        x = K.dare(x, density, [K.tile_generator(seed, i, module, 0) for i in range(x.shape[0])])
    if inner in ("ties", "dare_ties"):
        signer = K.SignedMerge()
        out = signer.tile(0, x)
        signer.finish(out)
        return out
    return x.sum(0)


def _truncate(f: LoraFactors, rule: RankRule | None, info: dict) -> MergeResult:
    if rule is None:
        return MergeResult(f, info={**info, "rank": f.rank})
    s = svd_of(f)
    k = max(1, min(rule.select(s.S), s.rank))
    err = s.tail_error(k)
    out = s.truncate(k).to_factors(kernel=f.kernel, kind=f.kind)
    return MergeResult(out, error=err, best_error=err, info={**info, "rank": k})


def _weighted(inputs: Sequence[LoraFactors], weights: Sequence[float]):
    check_same_shape(inputs)
    dt = compute_dtype(*[f.A for f in inputs])
    Bs = [f.B.to(dt) * (w * f.scale) for f, w in zip(inputs, weights)]
    As = [f.A.to(dt) for f in inputs]
    return Bs, As


@register("knots", description="KnOTS: align in the SVD basis of [ΔW_1…ΔW_n], merge there (inner method)",
          exact=False, space="factors", paper="https://github.com/gstoica27/KnOTS", homogeneous=True,
          ranges={"density": "(0, 1]"}, lossless={"density": 1.0})
def knots(
    inputs: Sequence[LoraFactors], weights: Sequence[float], *, inner: str = "ties", density: float = 1.0,
    lam: float = 1.0, rank_rule: RankRule | None = None, seed: int = 0, module: str = "",
) -> MergeResult:
    Bs, As = _weighted(inputs, weights)
    Qb, Rb = torch.linalg.qr(torch.cat(Bs, dim=1))
    Qs, Rs = zip(*(torch.linalg.qr(A.T) for A in As))
    core = Rb @ torch.block_diag(*[R.T for R in Rs])
    Uc, S, Vhc = torch.linalg.svd(core, full_matrices=False)
    keep = max(1, int((S > S[0] * torch.finfo(S.dtype).eps * max(core.shape) * 10).sum())) if S[0] > 0 else 1
    Uc, S, Vhc = Uc[:, :keep], S[:keep], Vhc[:keep]
    blocks, start = [], 0
    for Q in Qs:
        r = Q.shape[1]
        blocks.append(S.unsqueeze(1) * (Vhc[:, start:start + r] @ Q.T))  # τ̃_i = Σ V_iᵀ  (ρ, in)
        start += r
    merged = merge_stack(torch.stack(blocks), inner, density=density, seed=seed, module=module) * lam
    first = inputs[0]
    f = LoraFactors(merged, Qb @ Uc, 1.0, first.kernel, first.kind)
    return _truncate(f, rank_rule, {"aligned_rank": keep, "inner": inner})


@register("core_space", description="Core Space: merge R×R cores in the shared bases of the B's and A's",
          exact=False, space="factors", paper="https://github.com/apanariello4/core-space-merging", homogeneous=True,
          ranges={"density": "(0, 1]"}, lossless={"density": 1.0})
def core_space(
    inputs: Sequence[LoraFactors], weights: Sequence[float], *, inner: str = "ties", density: float = 1.0,
    lam: float = 1.0, rank_rule: RankRule | None = None, seed: int = 0, module: str = "",
) -> MergeResult:
    Bs, As = _weighted(inputs, weights)
    Ub, _, _ = torch.linalg.svd(torch.cat(Bs, dim=1), full_matrices=False)  # (out, R)
    _, _, VhA = torch.linalg.svd(torch.cat(As, dim=0), full_matrices=False)  # (R, in)
    cores = torch.stack([(Ub.T @ B) @ (A @ VhA.T) for B, A in zip(Bs, As)])
    M = merge_stack(cores, inner, density=density, seed=seed, module=module) * lam
    first = inputs[0]
    f = LoraFactors(VhA, Ub @ M, 1.0, first.kernel, first.kind)
    return _truncate(f, rank_rule, {"inner": inner, "core": int(M.shape[0])})
