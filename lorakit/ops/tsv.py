"""Task Singular Vectors merging, TSV-M (Gargiulo et al., CVPR 2025), factored for LoRA.

Per module, with weighted task updates ``τ_i = w_i·s_i·B_i@A_i`` (``T`` of them) and an output rank ``K``:

1. **Compress.** Each task keeps its ``k_i`` leading singular triplets, ``τ_i ≈ U_i Σ_i V_iᵀ`` with
   ``k_i = K / T`` (the paper keeps the top 1/T fraction of each task's spectrum; a LoRA's spectrum has ``r_i``
   values, so the default ``K`` = the largest input rank gives each task ``r/T``). Each task's SVD is the exact
   QR-core SVD of its factors (:func:`lorakit.linalg.svd_of`), O((out + in)·r_i²).
2. **Decorrelate.** ``U = [U_1 … U_T]`` ``(out, K)`` and ``V = [V_1 … V_T]`` ``(in, K)`` are replaced by their
   nearest matrices with orthonormal columns (orthogonal Procrustes / polar factor): with the thin SVD
   ``U = P S Qᵀ``, ``U⊥ = P Qᵀ``. This removes the overlap between tasks' singular vectors (the interference).
   O((out + in)·K²).
3. **Merge.** ``ΔW = λ·U⊥ diag(Σ_1 … Σ_T) V⊥ᵀ``: already a thin SVD (orthonormal columns, non-negative
   diagonal), returned as factors of rank ``K`` (``B = U⊥√Σ``, ``A = √Σ V⊥ᵀ``, scale 1).

Nothing of size out×in is formed. With tasks in mutually orthogonal subspaces and ``K = Σ r_i`` the result is
the exact sum; one adapter at ``K ≥ r`` is returned unchanged.

Reported error: ``‖ΔW − λΣ_i τ_i‖/‖λΣ_i τ_i‖``, the distance from the task-arithmetic sum (in factored form),
and the best error at rank ``K`` (the sum's spectral tail), so the report says how far the merge moved from
the plain sum.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorakit.algebra import cat_factors
from lorakit.factors import LoraFactors, frobenius_inner
from lorakit.linalg import SVD, compute_dtype, core_svd, svd_of
from lorakit.ops.merge_exact import check_same_shape
from lorakit.ops.rank_rules import RankRule
from lorakit.ops.registry import MergeResult, register


def polar(X: torch.Tensor) -> torch.Tensor:
    """The matrix with orthonormal columns nearest to ``X (m, k)`` in Frobenius norm (orthogonal Procrustes):
    ``P Qᵀ`` from the thin SVD ``X = P S Qᵀ``. O(m·k²)."""
    P, _, Qh = torch.linalg.svd(X, full_matrices=False)
    return P @ Qh


def split_rank(K: int, ranks: Sequence[int]) -> list[int]:
    """``K`` triplets shared evenly among tasks (the first ``K mod T`` get one more), capped by each rank; what a
    capped task cannot use goes to the others."""
    T = len(ranks)
    ks = [min(r, K // T + (1 if i < K % T else 0)) for i, r in enumerate(ranks)]
    spare = K - sum(ks)
    while spare > 0:
        room = [i for i, r in enumerate(ranks) if ks[i] < r]
        if not room:
            break
        for i in room[:spare]:
            ks[i] += 1
        spare = K - sum(ks)
    return ks


def distance_to_sum(
    out: LoraFactors, inputs: Sequence[LoraFactors], weights: Sequence[float], lam: float, S_sum: torch.Tensor,
    k: int,
) -> tuple[float, float]:
    """``(‖ΔW − T‖/‖T‖, best error at rank k)`` for the task-arithmetic target ``T = λΣ w_i ΔW_i`` with singular
    values ``S_sum`` (of ``Σ w_i ΔW_i``), all in factored form (float64 inner products)."""
    target = cat_factors(inputs, [w * lam for w in weights])
    t2 = frobenius_inner(target, target)
    if t2 <= 0:
        return 0.0, 0.0
    d2 = frobenius_inner(out, out) - 2 * frobenius_inner(out, target) + t2
    s2 = S_sum.double() ** 2
    best = float((s2[k:].sum() / s2.sum()).sqrt()) if float(s2.sum()) > 0 else 0.0
    return max(d2, 0.0) ** 0.5 / t2**0.5, best


def signed(svd: SVD, lam: float) -> SVD:
    """``λ·M`` for a thin SVD ``M``: ``|λ|`` into the singular values, the sign into ``U``."""
    return SVD(svd.U * (-1.0 if lam < 0 else 1.0), svd.S * abs(lam), svd.Vh)


def descending(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> SVD:
    order = torch.argsort(S, descending=True)
    return SVD(U[:, order], S[order], Vh[order])


@register("tsv", description="TSV-M: each task's top K/T singular vectors, decorrelated (polar), Σ kept; rank K",
          exact=False, space="factors", paper="https://arxiv.org/abs/2412.00081", homogeneous=True, lossless={})
def tsv(
    inputs: Sequence[LoraFactors], weights: Sequence[float], *, lam: float = 1.0,
    rank_rule: RankRule | None = None,
) -> MergeResult:
    """TSV-M (module docstring). ``rank_rule``: a ``rank K`` rule splits ``K`` evenly among the tasks (default: the
    largest input rank); other rules (energy, error) pick each task's ``k_i`` from its own spectrum."""
    check_same_shape(inputs)
    dt = compute_dtype(*[f.A for f in inputs])
    svds = [svd_of(f.scaled(w), dtype=dt) for f, w in zip(inputs, weights)]
    ranks = [s.rank for s in svds]
    limit = min(inputs[0].shape)
    if rank_rule is None or rank_rule.kind == "rank":
        K = min(int(rank_rule.value) if rank_rule else max(f.rank for f in inputs), limit, sum(ranks))
        ks = split_rank(K, ranks)
    else:
        ks = [max(1, min(rank_rule.select(s.S), s.rank)) for s in svds]
    U = torch.cat([s.U[:, :k] for s, k in zip(svds, ks)], dim=1)
    S = torch.cat([s.S[:k] for s, k in zip(svds, ks)])
    V = torch.cat([s.Vh[:k].T for s, k in zip(svds, ks)], dim=1)
    merged = signed(descending(polar(U), S, polar(V).T), lam)
    first = inputs[0]
    out = merged.to_factors(kernel=first.kernel, kind=first.kind)
    S_sum = core_svd([f.B for f in inputs], [f.A for f in inputs], [w * f.scale for f, w in zip(inputs, weights)]).S
    err, best = distance_to_sum(out, inputs, weights, lam, S_sum, out.rank)
    return MergeResult(out, error=err, best_error=best, info={"rank": out.rank, "per_task": ks})
