"""One adapted module's low-rank factors.

Convention, everywhere in lorakit::

    ΔW = scale · B @ A        B: (out, r)    A: (r, in)    ΔW: (out, in)

Conv layers are flattened to 2-D for the algebra: ``A`` is stored as ``(r, in·kh·kw)`` and ``kernel`` keeps
``(kh, kw)`` so writers can restore the 4-D shapes. Embedding LoRA (PEFT ``lora_embedding_A/B``) uses the same
convention with ``in = num_embeddings``, ``out = embedding_dim``; the base weight it applies to is ΔWᵀ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from lorakit.errors import NonFiniteError, ShapeMismatchError

LayerKind = Literal["linear", "conv", "embedding"]


@dataclass(frozen=True, slots=True)
class LoraFactors:
    """The factors of one module: ``ΔW = scale · B @ A``.

    Args:
        A: down factor, ``(r, in)`` (conv: ``(r, in·kh·kw)``).
        B: up factor, ``(out, r)``.
        scale: the effective scale (α/r, α/√r for rsLoRA, 1.0 where no alpha is stored), already resolved.
        kernel: ``(kh, kw)`` for conv layers, ``None`` otherwise.
        kind: the kind of base layer (``linear``, ``conv`` or ``embedding``).
        magnitude: the DoRA magnitude vector ``(out,)``, carried through but not part of ΔW.
        extras: other per-module tensors a format stores, carried through. ``extras["bias"]`` is the bias
            update ``Δb (out,)`` itself (PEFT ``lora_bias``: ``Δb = s·lora_B.bias``), with the scale already
            applied, so that re-factorisations (canonical form, resize, ``folded``) keep it as it is and only
            operations that change the represented update (``scaled``, weighted sums) change it.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float = 1.0
    kernel: tuple[int, int] | None = None
    kind: LayerKind = "linear"
    magnitude: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2:
            raise ShapeMismatchError(
                f"factors must be 2-D, got A {tuple(self.A.shape)} and B {tuple(self.B.shape)}"
            )
        if self.A.shape[0] != self.B.shape[1]:
            raise ShapeMismatchError(
                f"A and B ranks differ: A is {tuple(self.A.shape)} (rank {self.A.shape[0]}), "
                f"B is {tuple(self.B.shape)} (rank {self.B.shape[1]})",
                expected=self.B.shape[1],
                actual=self.A.shape[0],
            )
        if not math.isfinite(self.scale):
            raise NonFiniteError(f"scale is {self.scale}")
        bias = self.extras.get("bias")
        if bias is not None and tuple(bias.shape) != (self.B.shape[0],):
            raise ShapeMismatchError(f"bias update has shape {tuple(bias.shape)}, the layer has {self.B.shape[0]} "
                                     "outputs", expected=self.B.shape[0], actual=tuple(bias.shape))
        if self.kind == "conv" and self.kernel is None:
            object.__setattr__(self, "kernel", (1, 1))

    # ---- shapes -------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    @property
    def in_features(self) -> int:
        """Columns of the flattened ΔW (``in·kh·kw`` for conv)."""
        return int(self.A.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the flattened ΔW, ``(out, in)``."""
        return (self.out_features, self.in_features)

    @property
    def num_params(self) -> int:
        return self.A.numel() + self.B.numel()

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    # ---- values -------------------------------------------------------------------------------------
    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense flattened ΔW ``(out, in)`` in ``dtype``. Cost O(out·in·r); use only when needed."""
        return self.scale * (self.B.to(dtype) @ self.A.to(dtype))

    def norm(self) -> float:
        """‖ΔW‖_F in factored form: ``|s|·sqrt(Σ (BᵀB) ⊙ (AAᵀ))``, O((out + in)·r²), no dense ΔW."""
        return math.sqrt(max(frobenius_inner(self, self), 0.0))

    def with_(self, **changes: object) -> LoraFactors:
        """A copy with some fields replaced (factors are validated again)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    @property
    def bias(self) -> torch.Tensor | None:
        """The bias update ``Δb (out,)`` (PEFT ``lora_bias``), scale applied; ``None`` when there is none."""
        return self.extras.get("bias")

    def scaled(self, weight: float) -> LoraFactors:
        """``weight · ΔW`` (and ``weight · Δb``), exact: the scale changes, and the bias update with it."""
        w = float(weight)
        extras = self.extras
        if "bias" in extras:
            b = extras["bias"]
            work = torch.promote_types(torch.float32, b.dtype)
            extras = {**extras, "bias": (b.to(work) * w).to(b.dtype)}
        return self.with_(scale=self.scale * w, extras=extras)

    def folded(self, dtype: torch.dtype | None = None) -> LoraFactors:
        """Scale folded into the factors evenly (``√|s|`` into each, the sign into B); scale becomes 1."""
        root = math.sqrt(abs(self.scale))
        sign = -1.0 if self.scale < 0 else 1.0
        dt = dtype or self.dtype
        work = torch.promote_types(torch.float32, self.dtype)  # float64 factors stay float64
        return self.with_(
            A=(self.A.to(work) * root).to(dt), B=(self.B.to(work) * (root * sign)).to(dt), scale=1.0
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LoraFactors:
        """Factors moved and/or cast; the DoRA magnitude and extras move along (dtype kept for them)."""
        return self.with_(
            A=self.A.to(device=device, dtype=dtype),
            B=self.B.to(device=device, dtype=dtype),
            magnitude=None if self.magnitude is None else self.magnitude.to(device=device),
            extras={k: v.to(device=device) for k, v in self.extras.items()},
        )

    def check_finite(self, *, file: str | None = None, module: str | None = None) -> None:
        """Raise :class:`NonFiniteError` naming the tensor if A, B or the DoRA magnitude holds NaN or Inf."""
        tensors = [("factor A", self.A), ("factor B", self.B)]
        if self.magnitude is not None:
            tensors.append(("DoRA magnitude", self.magnitude))
        if self.bias is not None:
            tensors.append(("bias update (lora_B.bias)", self.bias))
        for name, t in tensors:
            if not all_finite(t):
                bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
                raise NonFiniteError(f"{name} contains {bad}", file=file, module=module)

    def stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` in the shapes a file stores them (:func:`stored_shapes`): views, no copy."""
        a, b = stored_shapes(self.out_features, self.in_features, self.rank, self.kind, self.kernel)
        return self.A.reshape(a), self.B.reshape(b)


def stored_shapes(out_features: int, in_features: int, rank: int, kind: LayerKind,
                  kernel: tuple[int, int] | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes ``(A, B)`` a file stores a module's factors in: ``(r, in)`` and ``(out, r)``, and for a conv
    layer the 4-D ``(r, in/(kh·kw), kh, kw)`` and ``(out, r, 1, 1)``."""
    if kind != "conv":
        return (rank, in_features), (out_features, rank)
    kh, kw = kernel or (1, 1)
    return (rank, in_features // (kh * kw), kh, kw), (out_features, rank, 1, 1)


def all_finite(t: torch.Tensor) -> bool:
    """True if no element of ``t`` is NaN or ±Inf.

    A finite sum proves every term finite, and a sum is 10-40× faster than ``isfinite`` over the tensor
    (which this torch does not vectorise); only a non-finite sum, which a huge finite tensor can also give by
    overflow, pays for the elementwise check. O(numel), one pass, no copy. A bfloat16 tensor is summed in its
    own dtype (torch accumulates it in float32 all the same, and bfloat16 has float32's range): 0.12 against
    0.42 ns an entry with ``dtype=float32``, whose conversion path is slower.
    """
    if not t.is_floating_point() or not t.numel():
        return True
    total = t.sum() if t.dtype == torch.bfloat16 else t.sum(dtype=torch.promote_types(t.dtype, torch.float32))
    if bool(torch.isfinite(total)):
        return True
    return bool(torch.isfinite(t).all())


def frobenius_inner(a: LoraFactors, b: LoraFactors) -> float:
    """``⟨ΔW_a, ΔW_b⟩_F = s_a·s_b·Σ (B_aᵀB_b) ⊙ (A_a A_bᵀ)`` in float64; O((out + in)·r_a·r_b), no dense ΔW.

    The one factored inner product: norms, cosine similarities and errors are built from it.
    """
    Ba, Aa, Bb, Ab = a.B.double(), a.A.double(), b.B.double(), b.A.double()
    return a.scale * b.scale * float(((Ba.T @ Bb) * (Aa @ Ab.T)).sum())
