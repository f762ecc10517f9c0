"""Quantizing one module in canonical SVD form, per singular direction, and measuring the loss in factored form.

A module ``ΔW = s·B @ A`` is first put in canonical form (:func:`lorakit.linalg.canonical`): ``B = U√S``,
``A = √S Vᵀ``, scale 1, same ΔW. Direction ``j`` is the pair (column ``B[:, j]``, row ``A[j, :]``); both are
stored as rows (``Bᵀ`` is ``(r, out)``), so a block never spans two directions and each direction may carry its
own precision. Consecutive directions at equal bits form a *segment*: one :class:`QuantizedTensor` for ``Bᵀ``
and one for ``A``. Directions at 0 bits are dropped.

Error, without a dense ΔW: with ``X = [s·B, −B̂]`` and ``Y = [A; Â]``,
``‖ΔW − ΔŴ‖²_F = ‖X Y‖²_F = Σ (XᵀX) ⊙ (Y Yᵀ)``, cost O((out + in)·r²).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorakit.factors import LayerKind, LoraFactors
from lorakit.linalg import canonical
from lorakit.quant.blockwise import QuantConfig, QuantizedTensor, dequantize_tensor, quantize_tensor


@dataclass(frozen=True)
class Segment:
    """Directions ``start … start + rows − 1`` at ``config.bits`` (``B``: their ``Bᵀ`` rows, ``A``: their rows)."""

    start: int
    rows: int
    config: QuantConfig
    B: QuantizedTensor
    A: QuantizedTensor

    @property
    def storage_bits(self) -> int:
        return self.B.storage_bits + self.A.storage_bits


@dataclass(frozen=True)
class QuantizedModule:
    """One module, quantized: its segments plus what is needed to rebuild :class:`LoraFactors`."""

    name: str
    out_features: int
    in_features: int
    rank: int  # directions in canonical form, before any were dropped
    segments: tuple[Segment, ...]
    dtype: torch.dtype
    kind: LayerKind = "linear"
    kernel: tuple[int, int] | None = None
    magnitude: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def kept_rank(self) -> int:
        return sum(s.rows for s in self.segments)

    @property
    def bits(self) -> list[int]:
        """Bits of every direction (0 for dropped ones)."""
        out = [0] * self.rank
        for s in self.segments:
            out[s.start : s.start + s.rows] = [s.config.bits] * s.rows
        return out

    @property
    def storage_bits(self) -> int:
        return sum(s.storage_bits for s in self.segments)

    @property
    def num_params(self) -> int:
        """Parameters of the original factors at this rank: ``rank·(out + in)``."""
        return self.rank * (self.out_features + self.in_features)

    def factors(self, dtype: torch.dtype | None = None) -> LoraFactors:
        """The dequantized factors (scale 1), in ``dtype`` (default: the source's)."""
        where = f"module {self.name}"
        Bt = [dequantize_tensor(s.B, where=f"{where}: B segment {i}") for i, s in enumerate(self.segments)]
        A = [dequantize_tensor(s.A, where=f"{where}: A segment {i}") for i, s in enumerate(self.segments)]
        dt = dtype or self.dtype
        B_full = torch.cat(Bt, dim=0).T if Bt else torch.zeros(self.out_features, 0)
        A_full = torch.cat(A, dim=0) if A else torch.zeros(0, self.in_features)
        return LoraFactors(
            A_full.to(dt),
            B_full.contiguous().to(dt),
            1.0,
            self.kernel,
            self.kind,
            self.magnitude,
            dict(self.extras),
        )


def runs(bits: list[int]) -> list[tuple[int, int, int]]:
    """``(start, length, bits)`` of each run of equal bits, zero-bit runs left out."""
    out: list[tuple[int, int, int]] = []
    j = 0
    while j < len(bits):
        k = j
        while k < len(bits) and bits[k] == bits[j]:
            k += 1
        if bits[j] > 0:
            out.append((j, k - j, bits[j]))
        j = k
    return out


def quantize_canonical(
    name: str,
    f: LoraFactors,
    canon: LoraFactors,
    bits: list[int],
    configs: dict[int, QuantConfig],
    *,
    pad: bool = False,
) -> QuantizedModule:
    """Quantize canonical factors ``canon`` of ``f`` with ``bits[j]`` for direction ``j`` (0 drops it)."""
    Bt, A = canon.B.T.float(), canon.A.float()
    segments = tuple(
        Segment(
            start,
            length,
            configs[b],
            quantize_tensor(Bt[start : start + length], configs[b], pad=pad),
            quantize_tensor(A[start : start + length], configs[b], pad=pad),
        )
        for start, length, b in runs(bits)
    )
    return QuantizedModule(
        name,
        f.out_features,
        f.in_features,
        canon.rank,
        segments,
        f.dtype,
        f.kind,
        f.kernel,
        f.magnitude,
        dict(f.extras),
    )


def to_canonical(f: LoraFactors) -> LoraFactors:
    """Canonical SVD form in float32 (float64 for float64 input)."""
    return canonical(f, dtype=torch.float64 if f.dtype == torch.float64 else torch.float32)


def factored_error(ref: LoraFactors, approx: LoraFactors) -> float:
    """``‖ΔW_ref − ΔW_approx‖_F`` via the Gram matrices of ``[s·B, −ŝ·B̂]`` and ``[A; Â]`` (float64, no dense ΔW)."""
    # The difference as one concatenated low-rank term (not ⟨a,a⟩ − 2⟨a,b⟩ + ⟨b,b⟩, which cancels badly).
    X = torch.cat([ref.B.double() * ref.scale, -approx.B.double() * approx.scale], dim=1)
    Y = torch.cat([ref.A.double(), approx.A.double()], dim=0)
    return LoraFactors(Y, X).norm()
