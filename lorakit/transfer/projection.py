"""Training-free transfer between same-shape bases: factored subspace projection (ProLoRA-style, §2.2).

For one module with source base weight ``W_s`` and target base weight ``W_t`` (both ``(out, in)``), take the
top-``q`` singular vectors ``U_s, V_s`` of ``W_s`` and ``U_t, V_t`` of ``W_t``, and the projectors
``P_s = U_s U_sᵀ``, ``P_t = U_t U_tᵀ`` (right side: ``Q_s = V_s V_sᵀ``, ``Q_t = V_t V_tᵀ``). Split each factor
of ``ΔW_s = s·B A`` into its part in the source's principal subspace and the rest (its null-space part)::

    B_∥ = P_s B        B_⊥ = B − B_∥            A_∥ = A Q_s        A_⊥ = A − A_∥

then move the principal part into the target's principal subspace and the null-space part into the target's
complement::

    B_t = P_t B_∥ + (I − P_t) B_⊥          A_t = A_∥ Q_t + A_⊥ (I − Q_t)          (null_space=True)
    B_t = P_t B_∥                          A_t = A_∥ Q_t                          (null_space=False)

The result keeps rank ≤ r and the scale; nothing of size ``out × in`` is formed for the projection itself
(cost O((out+in)·q·r) per module, plus one truncated SVD per base weight, cached by the caller). Invariants:
with identical bases the null-space form returns ΔW exactly for any ``q`` and the principal-only form at full
``q``; re-projecting a transferred adapter target→target leaves it unchanged (idempotence).

This is the factor-wise reading of ProLoRA's ``P^U_t∥ ΔW_s∥ P^V_t∥ + P^U_t⊥ ΔW_s⊥ P^V_t⊥``: the two agree on
``B_∥A_∥`` and ``B_⊥A_⊥`` and differ on the cross terms ``B_∥A_⊥ + B_⊥A_∥``, which the dense formula drops
and this one transports (to ``P_t·(I−Q_t)`` and ``(I−P_t)·Q_t``). It is the form that keeps rank ≤ r.

Each module is gated by the subspace similarity ``sim = ½(‖U_sᵀU_t‖²_F + ‖V_sᵀV_t‖²_F)/q ∈ [0, 1]``
(1 for identical bases, about ``q/out`` for unrelated random ones); modules below ``min_similarity`` are left
out of the transferred adapter and say so in the report.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.errors import KeyMappingError, ShapeMismatchError
from lorakit.factors import LoraFactors
from lorakit.linalg import randomized_svd


@dataclass(frozen=True)
class Subspace:
    """Top-``q`` singular vectors of a base weight: ``U (out, q)``, ``V (in, q)`` (orthonormal columns)."""

    U: torch.Tensor
    V: torch.Tensor

    @property
    def q(self) -> int:
        return int(self.U.shape[1])


def principal_subspace(W: torch.Tensor, q: int, *, seed: int = 0, exact_below: float = 0.25) -> Subspace:
    """Top-``q`` singular subspaces of ``W (out, in)``, in float64 on ``W``'s device.

    A dense SVD when ``q`` is a large share of ``min(out, in)`` (above ``exact_below``), else a randomized SVD
    (HMT, 4 power iterations) costing O(out·in·q) instead of O(out·in·min(out, in)).
    """
    out, inn = W.shape
    q = max(1, min(int(q), out, inn))
    W = W.to(torch.float64)
    if q >= exact_below * min(out, inn):
        U, _, Vh = torch.linalg.svd(W, full_matrices=False)
        return Subspace(U[:, :q].contiguous(), Vh[:q].T.contiguous())
    svd = randomized_svd(W, q, n_iter=4, seed=seed, dtype=torch.float64)
    return Subspace(svd.U.contiguous(), svd.Vh.T.contiguous())


def subspace_similarity(a: Subspace, b: Subspace) -> float:
    """``½(‖U_aᵀU_b‖²_F + ‖V_aᵀV_b‖²_F) / q`` ∈ [0, 1]: 1 when the subspaces coincide."""
    q = min(a.q, b.q)
    left = float((a.U.T @ b.U).pow(2).sum()) / q
    right = float((a.V.T @ b.V).pow(2).sum()) / q
    return 0.5 * (left + right)


def project_factors(f: LoraFactors, source: Subspace, target: Subspace, *, null_space: bool = True) -> LoraFactors:
    """Move one module's factors from the source base's subspaces to the target's (formulas in the module doc).

    Computed in float64, returned in the input dtype; cost O((out + in)·q·r).
    """
    if source.U.shape[0] != f.out_features or source.V.shape[0] != f.in_features:
        raise ShapeMismatchError(
            f"adapter module is {f.shape} but the base weight is {(source.U.shape[0], source.V.shape[0])}"
        )
    if target.U.shape[0] != f.out_features or target.V.shape[0] != f.in_features:
        raise ShapeMismatchError(
            f"source and target bases differ in shape: {f.shape} vs {(target.U.shape[0], target.V.shape[0])}",
            hint="training-free projection needs same-shape bases; use `lorakit transfer run` (distillation)",
        )
    dev = source.U.device
    B = f.B.to(dev, torch.float64)
    A = f.A.to(dev, torch.float64)
    Us, Ut, Vs, Vt = source.U, target.U, source.V, target.V
    B_par = Us @ (Us.T @ B)
    A_par = (A @ Vs) @ Vs.T
    B_t = Ut @ (Ut.T @ B_par)
    A_t = (A_par @ Vt) @ Vt.T
    if null_space:
        B_perp = B - B_par
        A_perp = A - A_par
        B_t = B_t + (B_perp - Ut @ (Ut.T @ B_perp))
        A_t = A_t + (A_perp - (A_perp @ Vt) @ Vt.T)
    return f.with_(A=A_t.to(f.A.device, f.A.dtype), B=B_t.to(f.B.device, f.B.dtype))


WeightSource = Callable[[str], torch.Tensor]


#: The projection report's columns, one row per module (:func:`project_module`).
COLUMNS = ["module", "shape", "rank", "q", "similarity", "kept_norm", "status"]


def project_module(
    name: str,
    f: LoraFactors,
    source_weight: WeightSource,
    target_weight: WeightSource,
    *,
    q: float = 0.5,
    null_space: bool = True,
    min_similarity: float = 0.0,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[LoraFactors | None, list[Any]]:
    """Transfer one module by :func:`project_factors`: its new factors (``None``: left out) and its report row
    (:data:`COLUMNS`). The loop over an adapter's modules is the verb's
    (:func:`lorakit.transfer.pipeline.project_adapter`, through the engine's module stream).

    Args:
        source_weight / target_weight: module name → the base weight in ΔW's orientation ``(out, in)``.
        q: subspace rank: an int, or a float in (0, 1] as a share of ``min(out, in)``.
        null_space: also carry the null-space part (ProLoRA); off keeps only the principal part.
        min_similarity: a module whose subspace similarity is below this is skipped (left out).

    Raises:
        KeyMappingError: a base has no weight for the module; ShapeMismatchError: a base weight's shape differs.
    """
    if f.kind != "linear":
        return None, [name, list(f.shape), f.rank, None, None, None, f"skipped: {f.kind} layer"]
    try:
        Ws, Wt = source_weight(name), target_weight(name)
    except KeyError as e:
        raise KeyMappingError(f"no base weight for this module in the {e.args[0]} model", module=name,
                              hint="the adapter was trained on a different architecture") from e
    for label, W in (("source", Ws), ("target", Wt)):
        if tuple(W.shape) != f.shape:
            raise ShapeMismatchError(f"{label} base weight is {tuple(W.shape)}, the adapter module is {f.shape}; "
                                     "training-free projection needs same-shape bases", module=name,
                                     hint="use `lorakit transfer run` (distillation) instead")
    qq = int(q) if isinstance(q, int) else max(1, round(float(q) * min(f.shape)))
    ss = principal_subspace(Ws.to(device), qq, seed=seed)
    st = principal_subspace(Wt.to(device), qq, seed=seed)
    sim = subspace_similarity(ss, st)
    if sim < min_similarity:
        return None, [name, list(f.shape), f.rank, ss.q, sim, 0.0, f"skipped: similarity < {min_similarity}"]
    g = project_factors(f, ss, st, null_space=null_space)
    n0 = f.norm()
    return g, [name, list(f.shape), f.rank, ss.q, sim, g.norm() / n0 if n0 > 0 else 1.0, "projected"]


def model_weights(model: object) -> Mapping[str, torch.Tensor]:
    """Module name → weight in ``(out, in)`` orientation for every linear layer of a transformers model
    (GPT-2 ``Conv1D`` weights, stored ``(in, out)``, are transposed)."""
    from torch import nn

    out: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():  # type: ignore[attr-defined]
        if isinstance(m, nn.Linear):
            out[name] = m.weight.detach()
        elif type(m).__name__ == "Conv1D":
            out[name] = m.weight.detach().T
    return out
