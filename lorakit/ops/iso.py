"""Isotropic merging, Iso-C and Iso-CTS (Marczak et al., ICML 2025, "No Task Left Behind"), factored for LoRA.

Per module, with weighted task updates ``τ_i = w_i·s_i·B_i@A_i`` and their sum ``Σ_i τ_i = U Σ Vᵀ`` (exact thin
SVD by the QR core, O((out + in)·R² + R³) with ``R = Σ r_i``; the sum is low rank, so this is exact):

- **Iso-C** (common subspace): keep ``K`` directions and flatten the spectrum to its mean,
  ``ΔW = λ·σ̄·U_K V_Kᵀ``, ``σ̄ = mean(σ_1 … σ_K)``. The paper flattens the whole spectrum of a full-rank sum;
  for LoRA the whole spectrum is the ``R`` nonzero values, the default ``K`` (``--rank`` truncates first). A
  flat spectrum gives every task's direction the same gain, so tasks with small updates are not drowned by the
  dominant directions of the sum.
- **Iso-CTS** (common and task-specific subspaces): of a budget of ``K`` directions (default ``R``), the
  common subspace takes the sum's top ``k_c ≈ f·K`` (``common_fraction`` ``f``, default 0.8 as in the paper,
  rounded so the rest splits evenly) and each task gets ``s = (K − k_c)/T`` directions of its own update with
  the common subspace projected out, ``τ_i − U_c U_cᵀ τ_i = (B_i' = B_i − U_c U_cᵀ B_i)·A_i`` (factored).
  ``[U_c, U_1' … U_T']`` and ``[V_c, V_1' … V_T']`` are orthonormalised by their polar factors (as in TSV-M) and
  the spectrum is flattened to the mean of all ``K`` kept singular values: ``ΔW = λ·σ̄·U⊥ V⊥ᵀ``.

Costs: Iso-C one QR-core SVD; Iso-CTS adds one per task and two polar factors, O((out + in)·K²). Nothing of
size out×in is formed. The papers tune ``λ`` (their α) on validation data; here it is a parameter.

Reported error: the distance from the task-arithmetic sum ``λΣ τ_i`` and the best error at the same rank (see
:func:`lorakit.ops.tsv.distance_to_sum`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorakit.errors import OperatorParameterError
from lorakit.factors import LoraFactors
from lorakit.linalg import SVD, compute_dtype, core_svd
from lorakit.ops.merge_exact import check_same_shape
from lorakit.ops.rank_rules import RankRule
from lorakit.ops.registry import MergeResult, register
from lorakit.ops.tsv import distance_to_sum, polar, signed


def _sum_svd(inputs: Sequence[LoraFactors], weights: Sequence[float]):
    check_same_shape(inputs)
    dt = compute_dtype(*[f.A for f in inputs])
    core = core_svd([f.B for f in inputs], [f.A for f in inputs], [w * f.scale for f, w in zip(inputs, weights)],
                    dtype=dt)
    S = core.S
    # the sum's numerical rank: directions below rounding are not part of the spectrum that gets flattened
    nonzero = int((S > S[0] * torch.finfo(dt).eps * max(inputs[0].shape) * 10).sum()) if S.numel() and S[0] > 0 else 0
    return core, max(1, nonzero)


def _budget(rule: RankRule | None, S: torch.Tensor, nonzero: int) -> int:
    if rule is None:
        return nonzero
    return max(1, min(rule.select(S[:nonzero]), nonzero))


def _result(svd: SVD, lam: float, inputs, weights, S_sum, info) -> MergeResult:
    first = inputs[0]
    out = signed(svd, lam).to_factors(kernel=first.kernel, kind=first.kind)
    err, best = distance_to_sum(out, inputs, weights, lam, S_sum, out.rank)
    return MergeResult(out, error=err, best_error=best, info={"rank": out.rank, **info})


@register("iso_c", description="Iso-C: SVD of the weighted sum, spectrum flattened to its mean (rank R or K)",
          exact=False, space="factors", paper="https://arxiv.org/abs/2502.04959", homogeneous=True, lossless=None)
def iso_c(
    inputs: Sequence[LoraFactors], weights: Sequence[float], *, lam: float = 1.0,
    rank_rule: RankRule | None = None,
) -> MergeResult:
    core, nonzero = _sum_svd(inputs, weights)
    K = _budget(rank_rule, core.S, nonzero)
    lead = core.leading(K)
    iso = SVD(lead.U, torch.full_like(lead.S, float(lead.S.double().mean())), lead.Vh)
    return _result(iso, lam, inputs, weights, core.S, {"sigma": float(iso.S[0])})


@register("iso_cts", description="Iso-CTS: the sum's top directions plus each task's own, orthonormalised, "
          "flat spectrum", exact=False, space="factors", paper="https://arxiv.org/abs/2502.04959",
          homogeneous=True, ranges={"common_fraction": "[0, 1]"}, lossless=None)
def iso_cts(
    inputs: Sequence[LoraFactors], weights: Sequence[float], *, lam: float = 1.0, common_fraction: float = 0.8,
    rank_rule: RankRule | None = None,
) -> MergeResult:
    if not 0.0 <= common_fraction <= 1.0:
        raise OperatorParameterError(f"common_fraction must be in [0, 1], got {common_fraction}",
                                     parameter="common_fraction")
    core, nonzero = _sum_svd(inputs, weights)
    K = _budget(rank_rule, core.S, nonzero)
    T = len(inputs)
    k_common = int(K * common_fraction)
    per_task = round((K - k_common) / T)
    k_common = max(0, K - per_task * T)
    if k_common == 0:  # the budget is too small for a common part: every direction is a task's own
        per_task = K // T
        k_common = K - per_task * T
    lead = core.leading(k_common) if k_common else None
    Us, Ss, Vs = ([lead.U], [lead.S], [lead.Vh.T]) if lead is not None else ([], [], [])
    if per_task:
        for f, w in zip(inputs, weights):
            B = f.B.to(lead.U.dtype if lead is not None else core.dtype) * (w * f.scale)
            if lead is not None:
                B = B - lead.U @ (lead.U.T @ B)  # the common subspace projected out of the task
            own = core_svd([B], [f.A], dtype=B.dtype).leading(per_task)
            Us.append(own.U)
            Ss.append(own.S)
            Vs.append(own.Vh.T)
    U, S, V = torch.cat(Us, dim=1), torch.cat(Ss), torch.cat(Vs, dim=1)
    iso = SVD(polar(U), torch.full_like(S, float(S.double().mean())), polar(V).T)
    return _result(iso, lam, inputs, weights, core.S, {"common": k_common, "per_task": per_task,
                                                        "sigma": float(iso.S[0])})
