"""LoRA-LEGO (Zhao et al., ICLR 2025): merge adapters by clustering their rank-1 units.

A rank-r module ``ΔW = s·B@A`` is a set of r *Minimal Semantic Units* (MSUs) ``(b_j, a_j)`` with
``ΔW = Σ_j b_j a_jᵀ`` once the scale is folded in. Per module, independently:

1. **Units.** Input ``i`` at weight ``w_i`` gives the units of ``w_i·s_i·B_i@A_i``, each as the vector
   ``u = [b; a] ∈ ℝ^{out+in}``. The pool holds ``R = Σ r_i`` units. Concatenating any units gives the exact sum
   of their terms (concatenation–summation equivalence), so the pool alone is the exact ``cat`` merge.
   Gauges (``gauge=``): ``raw`` (default) is the paper's form: the stored factors with ``√|w·s|`` folded into
   each side (the sign into ``b``), no sign fixing; with equal scales and weights this multiplies every unit by
   one number, so it clusters exactly what the paper clusters. ``canonical`` takes each input's canonical SVD
   form ``b = u_j√σ_j``, ``a = √σ_j v_j`` instead — independent of the arbitrary basis of the training run,
   with ``‖b‖ = ‖a‖`` — and fixes the sign of each pair so that the largest-magnitude entry of ``a`` is
   positive (``(b, a)`` and ``(−b, −a)`` are the same term, yet k-means would average them into zero). It is
   a different method, not the paper's (it was the default before, and scored far below the paper's form).
2. **Clustering.** k-means into κ clusters on the Gram matrix ``G = BᵀB + AAᵀ`` of the units
   (:func:`lorakit.ops.kmeans.kmeans_gram`: k-means++, seeded, restarts batched; :func:`lorakit.verbs.lego.lego_merge` batches
   the modules of a window too), on the device the inputs are on. The pool is put in a canonical order first
   (descending norm, ties by a fixed projection), so the result does not depend on the order of the units
   inside an input nor on the order of the inputs.
3. **Centroids** ``μ_c = mean of the members`` are split back into ``(b̄_c, ā_c)``: the merged module is
   ``B = [b̄_1 … b̄_κ]`` ``(out, κ)``, ``A = [ā_1ᵀ; …; ā_κᵀ]`` ``(κ, in)``.
4. **Dual reweighting**, each switchable:
   * parameter reweighting (``param_reweight``): ``μ̂_c = μ_c · mean_{u∈C_c}‖u‖ / ‖μ_c‖``, undoing the norm
     lost when members that point apart are averaged;
   * output reweighting (``output_reweight``): the merged update is scaled by ``γ = √(r̄/κ)``, ``r̄`` the mean
     number of units per input, so the variance of the sum of κ rank-1 outputs matches one source adapter
     (a reconstruction: the paper's exact constant is not public); ``output_scale`` sets γ explicitly.

With κ = R (every unit its own cluster) and both reweightings off, the result is exactly ``Σ w_i ΔW_i``. With
fewer clusters it is an approximation: the centroid of factors is not the mean of the rank-1 matrices, and
clusters of similar units are *averaged*, so LEGO behaves like an average of matching units, not like a sum.

Cost per module: the Grams ``BᵀB`` and ``AAᵀ``, O(R²·(out+in)), then everything else on R×R matrices (k-means
O(restarts·iters·R²·κ), reweighting, the spectrum of the exact sum and the error report), and the centroids
O(R·κ·(out+in)); the canonical gauge adds one QR-core SVD per input. No dense ΔW.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from lorakit.device import factors_to
from lorakit.errors import OperatorParameterError, RankError, ShapeMismatchError
from lorakit.factors import LoraFactors
from lorakit.linalg import compute_dtype, svd_of, tail_error
from lorakit.ops.kmeans import kmeans_gram
from lorakit.ops.rank_rules import RankRule
from lorakit.ops.registry import MergeResult, register

Gauge = Literal["canonical", "raw"]
GAUGES = ("canonical", "raw")


@dataclass(frozen=True)
class Units:
    """A pool of rank-1 units: ``B (out, R)`` columns and ``A (R, in)`` rows, ``Σ_j B[:, j] A[j]`` = the sum.

    ``owner[j]`` is the input a unit came from and ``index[j]`` its position among that input's units.
    """

    B: torch.Tensor
    A: torch.Tensor
    owner: torch.Tensor
    index: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.A.shape[0])

    def vectors(self) -> torch.Tensor:
        """The units as rows ``[bᵀ, aᵀ]``, ``(R, out + in)``."""
        return torch.cat([self.B.T, self.A], dim=1)


@dataclass(frozen=True)
class LegoAssignment:
    """Which cluster each unit of each input went to, for one module.

    Args:
        labels: per input, a ``(units_i,)`` int64 tensor of cluster ids in ``[0, κ)``; unit ``j`` of input ``i``
            is the j-th singular direction of ``w_i·ΔW_i`` (``canonical``) or its j-th stored rank (``raw``).
        sizes: ``(κ,)`` members per cluster. Clusters are numbered as the merged ranks (by descending norm).
        inertia: the k-means objective Σ‖u − μ_c‖² of the kept run.
        output_scale: the γ applied to the merged update.
        error: relative Frobenius error against the exact weighted sum ``Σ w_i ΔW_i``, computed exactly on the
            R×R Gram matrices (float64; absolute accuracy about 1e-8 from the cancellation in the squared norm).
        best_error: the Eckart–Young error at rank κ of that sum (its spectrum from the same Grams).
    """

    labels: tuple[torch.Tensor, ...]
    sizes: torch.Tensor
    inertia: float
    output_scale: float
    error: float
    best_error: float

    @property
    def k(self) -> int:
        return int(self.sizes.numel())


# ---- units ---------------------------------------------------------------------------------------------------
def _fix_sign(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip ``(b_j, a_j)`` → ``(−b_j, −a_j)`` so the largest-|entry| of each ``a_j`` is positive."""
    if A.shape[0] == 0:
        return B, A
    pick = A.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(A.gather(1, pick))[:, 0]
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return B * sign[None, :], A * sign[:, None]


def _canonical_units(f: LoraFactors, weight: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` of ``weight·ΔW`` in the canonical gauge (SVD units, sign-fixed), in ``dtype``."""
    svd = svd_of(f.scaled(weight), dtype=torch.float64)
    root = svd.S.clamp_min(0).sqrt()
    B, A = _fix_sign(svd.U * root[None, :], root[:, None] * svd.Vh)
    return B.to(dtype), A.to(dtype)


def extract_units(
    inputs: Sequence[LoraFactors],
    weights: Sequence[float],
    *,
    gauge: Gauge = "raw",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Units:
    """The pooled units of ``Σ w_i ΔW_i`` in ``gauge`` (input order, then unit order) on ``device`` (default:
    the inputs' device), in ``dtype`` (default: float32, float64 if an input is float64)."""
    dev = torch.device(device) if device is not None else inputs[0].A.device
    dt = dtype or compute_dtype(*(t for f in inputs for t in (f.A, f.B)))
    moved = [factors_to(f, dev) for f in inputs]
    if gauge == "canonical":
        pairs = [_canonical_units(f, float(w), dt) for f, w in zip(moved, weights)]
        B, A = torch.cat([b for b, _ in pairs], 1), torch.cat([a for _, a in pairs], 0)
    else:  # the paper's units: stored factors, √|w·s| into each side, the sign into B (one copy, scaled in place)
        B = torch.cat([f.B.to(dt) for f in moved], 1)
        A = torch.cat([f.A.to(dt) for f in moved], 0)
        roots = [math.sqrt(abs(float(w) * f.scale)) for f, w in zip(moved, weights)]
        signs = [-1.0 if float(w) * f.scale < 0 else 1.0 for f, w in zip(moved, weights)]
        ranks = [f.rank for f in moved]
        row = torch.tensor([r for r, n in zip(roots, ranks) for _ in range(n)], dtype=dt, device=dev)
        col = torch.tensor([r * g for r, g, n in zip(roots, signs, ranks) for _ in range(n)], dtype=dt, device=dev)
        B.mul_(col[None, :])
        A.mul_(row[:, None])
    counts = [int(f.A.shape[0]) for f in moved]
    owner = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(counts)])
    index = torch.cat([torch.arange(n) for n in counts])
    return Units(B, A, owner, index)


@functools.lru_cache(maxsize=16)
def _probe(length: int) -> torch.Tensor:
    """The fixed pseudo-random direction of length ``length`` that breaks norm ties in the canonical order."""
    g = torch.Generator(device="cpu").manual_seed(0x1E60)
    return torch.randn(length, generator=g, dtype=torch.float64)


def _canonical_order(units: Units, norms: torch.Tensor) -> torch.Tensor:
    """A permutation of the units that depends only on their values: descending norm, ties broken by the
    projection on a fixed pseudo-random direction (then by position, which only equal units reach)."""
    out = units.B.shape[0]
    probe = _probe(out + units.A.shape[1]).to(units.A.device, units.A.dtype)
    proj = (units.B.T @ probe[:out] + units.A @ probe[out:]).cpu()
    order = torch.sort(proj, stable=True).indices
    return order[torch.sort(-norms.cpu()[order], stable=True).indices]


def _spectrum(Gb: torch.Tensor, Ga: torch.Tensor) -> torch.Tensor:
    """Singular values (descending, float64) of ``B @ A`` from ``Gb = BᵀB`` and ``Ga = A Aᵀ``: the eigenvalues
    of ``Ga^½ Gb Ga^½`` are ``σ²``. Small σ are accurate to about ``1e-8·σ_max`` (squares are taken)."""
    lam, V = torch.linalg.eigh(Ga)
    R = V * lam.clamp_min(0).sqrt()[None, :]
    s2 = torch.linalg.eigvalsh(R.T @ Gb @ R)
    return s2.clamp_min(0).sqrt().flip(0)


# ---- the per-module merge ---------------------------------------------------------------------------------
def _choose_k(rule: RankRule | None, units: int, ranks: Sequence[int], S: torch.Tensor, module: str | None) -> int:
    if rule is None:
        k = max(ranks)
    elif rule.kind == "rank":
        k = int(rule.value)
    else:  # energy, error, sv_ratio...: the rank the exact sum needs under that rule
        k = rule.select(S)
    if k < 1:
        raise RankError(f"LEGO needs at least 1 cluster, got k={k}", module=module)
    if k > units:
        raise RankError(
            f"k={k} clusters is more than the {units} rank-1 units of the inputs (ranks {list(ranks)})",
            module=module, hint=f"use --rank {units} or less; --rank {units} with reweighting off is the exact cat",
        )
    return k


@dataclass
class _Prepared:
    """One module between pooling and clustering: its units, their Gram matrices and the sorted Gram."""

    units: Units
    Gb: torch.Tensor  # BᵀB, float64 (R, R)
    Ga: torch.Tensor  # A Aᵀ, float64 (R, R)
    order: torch.Tensor  # canonical order of the units (CPU int64)
    G: torch.Tensor  # Gram of the units [b; a] in canonical order, float64
    S: torch.Tensor  # spectrum of the exact sum
    k: int


def _check(inputs: Sequence[LoraFactors], weights: Sequence[float], gauge: str, module: str | None) -> None:
    if not inputs:
        raise OperatorParameterError("LEGO needs at least one input adapter", operator="lego")
    if len(weights) != len(inputs):
        raise OperatorParameterError(f"{len(weights)} weights for {len(inputs)} inputs", operator="lego")
    if gauge not in GAUGES:
        raise OperatorParameterError(f"lego: gauge must be one of {GAUGES}, got {gauge!r}", parameter="gauge")
    first = inputs[0]
    for f in inputs[1:]:
        if f.shape != first.shape:
            raise ShapeMismatchError(f"shapes differ between adapters: {first.shape} vs {f.shape}", module=module)


def _prepare(inputs: Sequence[LoraFactors], weights: Sequence[float], rule: RankRule | None, gauge: Gauge,
             device: torch.device, module: str | None) -> _Prepared:
    units = extract_units(inputs, weights, gauge=gauge, device=device)
    ranks = [int((units.owner == i).sum()) for i in range(len(inputs))]
    # The two Grams are the only O(R²·(out+in)) work: k-means, reweighting, spectrum and error all follow from them.
    Gb = (units.B.T @ units.B).to(torch.float64)
    Ga = (units.A @ units.A.T).to(torch.float64)
    S = _spectrum(Gb, Ga)
    k = _choose_k(rule, units.count, ranks, S, module)
    G = Gb + Ga
    order = _canonical_order(units, G.diagonal().clamp_min(0).sqrt())
    on_dev = order.to(G.device)
    return _Prepared(units, Gb, Ga, order, G[on_dev][:, on_dev], S, k)


def _finish(p: _Prepared, inputs: Sequence[LoraFactors], labels_sorted: torch.Tensor, mix_sorted: torch.Tensor,
            inertia: float, *, param_reweight: bool, output_reweight: bool,
            output_scale: float | None) -> tuple[LoraFactors, LegoAssignment]:
    """Centroids, reweighting, numbering, error report and output factors of one clustered module."""
    units, k, dev = p.units, p.k, p.G.device
    order = p.order.to(dev)
    mix = torch.zeros_like(mix_sorted)
    mix[:, order] = mix_sorted  # mixing weights over the units in pool order: μ_c = Σ_j mix[c, j] x_j
    labels_pool = torch.empty_like(labels_sorted)
    labels_pool[order] = labels_sorted
    G = p.Gb + p.Ga
    sizes = torch.bincount(labels_pool, minlength=k)
    cnorm = (mix @ G * mix).sum(1).clamp_min(0).sqrt()  # ‖μ_c‖
    if param_reweight:  # μ̂_c = μ_c · mean_{u∈C_c}‖u‖ / ‖μ_c‖ (mix rows are 1/|C_c| on the members)
        member_norms = mix @ G.diagonal().clamp_min(0).sqrt()
        rho = torch.where(cnorm > 0, member_norms / cnorm.clamp_min(1e-300), torch.ones_like(cnorm))
        mix = mix * rho[:, None]
        cnorm = cnorm * rho
    # Number the merged ranks by descending centroid norm (ties: first member in the canonical pool order).
    first_member = torch.full((k,), units.count, dtype=torch.long, device=dev).scatter_reduce_(
        0, labels_sorted, torch.arange(units.count, device=dev), reduce="amin"
    )
    rank_of = torch.sort(first_member.cpu(), stable=True).indices
    rank_of = rank_of[torch.sort(-cnorm.cpu()[rank_of], stable=True).indices]
    mix = mix[rank_of.to(dev)]
    relabel = torch.empty(k, dtype=torch.long)
    relabel[rank_of] = torch.arange(k)
    labels = relabel[labels_pool.cpu()]
    sizes = sizes.cpu()[rank_of]

    if output_scale is not None:
        gamma = float(output_scale)
    elif output_reweight:
        gamma = math.sqrt((units.count / len(inputs)) / k)
    else:
        gamma = 1.0
    W = mix.to(units.A.dtype)
    Bm, Am = units.B @ W.T, W @ units.A

    # ‖γ·Bm@Am − B@A‖² = tr(Eᵀ Gb E Ga) with E = γ·mixᵀmix − I: exact algebra on R×R matrices, no dense ΔW.
    E = gamma * (mix.T @ mix) - torch.eye(units.count, dtype=mix.dtype, device=dev)
    total2 = float((p.Gb * p.Ga).sum())
    err2 = float(((E.T @ p.Gb @ E) * p.Ga).sum())
    error = math.sqrt(max(err2, 0.0) / total2) if total2 > 0 else 0.0
    best = tail_error(p.S, k)

    first = inputs[0]
    dtype = torch.float32
    for f in inputs:
        dtype = torch.promote_types(dtype, f.dtype)
    home = first.A.device
    merged = LoraFactors(Am.to(home, dtype), Bm.to(home, dtype), gamma, first.kernel, first.kind)
    per_input = tuple(
        labels[units.owner == i][torch.argsort(units.index[units.owner == i])] for i in range(len(inputs))
    )
    return merged, LegoAssignment(per_input, sizes, inertia, gamma, error, best)


def lego_module(
    inputs: Sequence[LoraFactors],
    weights: Sequence[float],
    *,
    rank_rule: RankRule | None = None,
    gauge: Gauge = "raw",
    param_reweight: bool = True,
    output_reweight: bool = True,
    output_scale: float | None = None,
    seed: int = 0,
    restarts: int = 8,
    max_iter: int = 100,
    device: str | torch.device | None = None,
    module: str | None = None,
) -> tuple[LoraFactors, LegoAssignment]:
    """LoRA-LEGO for one module; returns the merged factors (scale = γ) and the cluster assignment.

    ``rank_rule`` picks κ: ``rank K`` is κ = K exactly; an energy/error/sv-ratio rule gives the rank that rule
    keeps on the spectrum of the exact sum; none gives κ = max input rank. ``device``: where the units are
    pooled and clustered (default: where the inputs are); the result goes back to the inputs' device.
    See the module docstring.

    Raises:
        RankError: κ < 1 or κ greater than the number of units.
        ShapeMismatchError: inputs of different shapes.
        OperatorParameterError: an unknown gauge, no inputs, weights that do not match the inputs.
    """
    _check(inputs, weights, gauge, module)
    dev = torch.device(device) if device is not None else inputs[0].A.device
    p = _prepare(inputs, weights, rank_rule, gauge, dev, module)
    km = kmeans_gram(p.G, p.k, seed=seed, restarts=restarts, max_iter=max_iter)
    return _finish(p, inputs, km.labels[0], km.mix[0], float(km.inertia[0]), param_reweight=param_reweight,
                   output_reweight=output_reweight, output_scale=output_scale)


@register(
    "lego",
    description="LoRA-LEGO: k-means over the rank-1 units of all inputs, centroids as the merged ranks",
    exact=False,
    space="factors",
    paper="Zhao et al., Merging LoRAs like Playing LEGO, ICLR 2025 (arXiv 2409.16167)",
    homogeneous=True,
    lossless={},
)
def lego(
    inputs: Sequence[LoraFactors],
    weights: Sequence[float],
    *,
    rank_rule: RankRule | None = None,
    gauge: str = "raw",
    param_reweight: bool = True,
    output_reweight: bool = True,
    output_scale: float | None = None,
    seed: int = 0,
    restarts: int = 8,
    max_iter: int = 100,
    device: str | None = None,
) -> MergeResult:
    """The registered merge operator (one module); ``info`` holds the :class:`LegoAssignment` and κ.

    It clusters where its inputs are (the merge pipeline has put them on ``--device``); ``device`` overrides."""
    merged, asg = lego_module(
        inputs, weights, rank_rule=rank_rule, gauge=gauge,  # type: ignore[arg-type]
        param_reweight=param_reweight, output_reweight=output_reweight, output_scale=output_scale, seed=seed,
        restarts=restarts, max_iter=max_iter, device=device,
    )
    return MergeResult(merged, asg.error, asg.best_error, {"k": asg.k, "assignment": asg, "inertia": asg.inertia})

__all__ = ["LegoAssignment", "Units", "extract_units", "lego", "lego_module"]
