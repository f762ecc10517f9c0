"""Exact factor-space merges: ``cat``, ``task_arithmetic`` and ``svd``, one module at a time.

For inputs ``ΔW_i = s_i·B_i@A_i`` and weights ``w_i``, the target is ``T = λ·Σ_i w_i·ΔW_i``:

- ``cat`` returns ``T`` exactly at rank ``Σ r_i`` (``A = [A_1; …]``, ``B = [w_1 s_1 B_1, …]``, scale 1);
- ``task_arithmetic`` is ``cat`` with a global ``λ`` (Ilharco et al.);
- ``svd`` returns the best rank-K approximation of ``T`` (Eckart–Young) through the factored QR-core SVD:
  O((out + in)·R² + R³) per module, no dense ΔW. K comes from the rank rule (default: the largest input rank).

Scale semantics: every result has ``scale = 1`` with the singular values folded evenly (``B = U√S``,
``A = √S Vᵀ``); writers re-derive each format's alpha from that (PEFT: α = r, or α = √r under rsLoRA; kohya:
alpha = r per module), so the merged ΔW is the same whatever format it is written in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorakit.algebra import cat_factors
from lorakit.device import to_device
from lorakit.errors import ShapeMismatchError
from lorakit.factors import LoraFactors
from lorakit.linalg import SVD, compute_dtype, core_svd, tail_error
from lorakit.ops.rank_rules import RankRule
from lorakit.ops.registry import MergeResult, register


def check_same_shape(inputs: Sequence[LoraFactors]) -> None:
    first = inputs[0]
    for f in inputs[1:]:
        if f.shape != first.shape:
            raise ShapeMismatchError(f"shapes differ between adapters: {first.shape} vs {f.shape} "
                                     "(adapters for different base models?)")


def default_rank(inputs: Sequence[LoraFactors]) -> RankRule:
    """PEFT's default for its ``svd`` merge: the largest input rank."""
    return RankRule("rank", float(max(f.rank for f in inputs)))


def output_rank(rule: RankRule | None, ranks: Sequence[int], shape: tuple[int, int]) -> int | None:
    """The rank a rank-producing merge will have, when it is known before computing (``--rank`` rules)."""
    rule = rule or RankRule("rank", float(max(ranks)))
    if rule.kind != "rank":
        return None
    return min(int(rule.value), sum(ranks), *shape)


@register("cat", description="exact weighted sum by rank concatenation (rank Σr_i, no loss)", exact=True,
          space="factors", rank="sum", linear=True, homogeneous=True, lossless={})
def cat(inputs: Sequence[LoraFactors], weights: Sequence[float], *,
        stored_dtype: torch.dtype | None = None) -> MergeResult:
    check_same_shape(inputs)
    return MergeResult(cat_factors(inputs, weights, stored_dtype=stored_dtype), error=0.0, best_error=0.0)


@register("task_arithmetic", description="λ·Σ w_i ΔW_i, exact (rank concatenation); optional truncation",
          exact=True, space="factors", paper="https://arxiv.org/abs/2212.04089", rank="sum", rank_requested=True,
          rank_cap="sum", linear=True, homogeneous=True, lossless={})
def task_arithmetic(
    inputs: Sequence[LoraFactors], weights: Sequence[float], *, lam: float = 1.0, rank_rule: RankRule | None = None,
    stored_dtype: torch.dtype | None = None,
) -> MergeResult:
    scaled = [w * lam for w in weights]
    if rank_rule is None:
        return cat(inputs, scaled, stored_dtype=stored_dtype)
    return svd(inputs, scaled, rank_rule=rank_rule)


def svd_batched(per_module: Sequence[Sequence[LoraFactors]], weights: Sequence[float], *,
                rank_rule: RankRule | None, device: torch.device, storage_dtype: torch.dtype) -> list[MergeResult]:
    """The ``svd`` merge of many modules whose inputs have equal ``(out, in, rank)``, in one batched
    :func:`~lorakit.linalg.core_svd` on ``device``; each result equals the per-module operator's (weight·scale
    folded into B exactly as it folds it; batched LAPACK runs the same routine per matrix). The rotations are
    formed for the largest rank any module keeps. Raises :class:`~lorakit.errors.NumericalError` on a
    non-finite value (the caller then merges module by module, which names the module)."""
    dt = compute_dtype(*(t for fs in per_module for f in fs for t in (f.A, f.B)))
    B, A = _stack_concatenated(per_module, weights, dt, pinned=device.type == "cuda")
    B, A = to_device(B, device), to_device(A, device)
    core = core_svd(B, A, dtype=dt, storage_dtype=storage_dtype)
    del B, A
    ks = [svd_rank(core.S[i], fs, rank_rule) for i, fs in enumerate(per_module)]
    lead = core.leading(max(ks))  # batched rotations of the directions any module of the batch keeps
    U, S_lead, Vh, S = lead.U.cpu(), lead.S.cpu(), lead.Vh.cpu(), core.S.cpu()
    return [svd_result(S[i], SVD(U[i], S_lead[i], Vh[i]), k, fs[0]) for i, (fs, k) in enumerate(zip(per_module, ks))]


def _stack_concatenated(per_module: Sequence[Sequence[LoraFactors]], weights: Sequence[float], dt: torch.dtype, *,
                        pinned: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``B (n, out, R)`` and ``A (n, R, in)``: each module's ``[w_i·s_i·B_i]`` and ``[A_i]`` concatenated, the
    modules stacked, written straight into one buffer each (no per-input stacks to concatenate again).
    Each slice is ``B_i.to(dt) * (w_i·s_i)``, as the per-module operator computes it."""
    first = per_module[0]
    R = sum(f.rank for f in first)
    B = torch.empty(len(per_module), first[0].out_features, R, dtype=dt, pin_memory=pinned)
    A = torch.empty(len(per_module), R, first[0].in_features, dtype=dt, pin_memory=pinned)
    for n, fs in enumerate(per_module):
        at = 0
        for f, w in zip(fs, weights):
            torch.mul(f.B.to(dt), w * f.scale, out=B[n, :, at:at + f.rank])
            A[n, at:at + f.rank].copy_(f.A)
            at += f.rank
    return B, A


@register("svd", description="best rank-K approximation of the exact weighted sum (factored SVD, no dense ΔW)",
          exact=False, space="factors", rank="max_input", rank_requested=True, rank_cap="sum", linear=True,
          homogeneous=True, batched=svd_batched, lossless={})
def svd(
    inputs: Sequence[LoraFactors], weights: Sequence[float], *, rank_rule: RankRule | None = None
) -> MergeResult:
    check_same_shape(inputs)
    core = core_svd([f.B for f in inputs], [f.A for f in inputs], [w * f.scale for f, w in zip(inputs, weights)])
    k = svd_rank(core.S, inputs, rank_rule)
    return svd_result(core.S, core.leading(k), k, inputs[0])


def svd_rank(S: torch.Tensor, inputs: Sequence[LoraFactors], rank_rule: RankRule | None) -> int:
    """The rank the ``svd`` merge keeps for the weighted sum's spectrum ``S`` (default: the largest input rank)."""
    return max(1, min((rank_rule or default_rank(inputs)).select(S), int(S.shape[-1])))


def svd_result(S: torch.Tensor, leading: SVD, k: int, first: LoraFactors) -> MergeResult:
    """The ``svd`` merge's result at rank ``k`` (:func:`svd_rank`) from one module's exact spectrum ``S`` and at
    least its ``k`` leading triplets, in ``first``'s layer kind; the error is the spectrum's tail. Shared by the
    operator and the pipeline's batched path (:func:`lorakit.pipeline.run_merge` stacks same-shaped modules into
    one :func:`~lorakit.linalg.core_svd`)."""
    err = tail_error(S, k)
    out = leading.truncate(k).to_factors(kernel=first.kernel, kind=first.kind)
    return MergeResult(out, error=err, best_error=err, info={"rank": k})
