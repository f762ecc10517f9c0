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

from lorakit.errors import ShapeMismatchError
from lorakit.factors import LoraFactors
from lorakit.linalg import SVD, core_svd, tail_error
from lorakit.ops.algebra import cat_factors
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
          space="factors")
def cat(inputs: Sequence[LoraFactors], weights: Sequence[float]) -> MergeResult:
    check_same_shape(inputs)
    return MergeResult(cat_factors(inputs, weights), error=0.0, best_error=0.0)


@register("task_arithmetic", description="λ·Σ w_i ΔW_i, exact (rank concatenation); optional truncation",
          exact=True, space="factors", paper="https://arxiv.org/abs/2212.04089")
def task_arithmetic(
    inputs: Sequence[LoraFactors], weights: Sequence[float], *, lam: float = 1.0, rank_rule: RankRule | None = None
) -> MergeResult:
    scaled = [w * lam for w in weights]
    if rank_rule is None:
        return cat(inputs, scaled)
    return svd(inputs, scaled, rank_rule=rank_rule)


@register("svd", description="best rank-K approximation of the exact weighted sum (factored SVD, no dense ΔW)",
          exact=False, space="factors")
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
