"""One module's spectrum facts, exactly, from its singular values: what ``lorakit inspect --spectrum`` shows.

The singular values of ``s·B @ A`` come from the batched QR-core SVD (:func:`lorakit.linalg.adapter_spectra`:
σ of the small core only, O((out + in)·r² + r³) per module, no dense ΔW), computed over the modules by the
inspect verb (:func:`lorakit.verbs.inspect.spectra`, through the engine's module stream). From them, here: the
Roy–Vetterli effective rank ``exp(H(σ/Σσ))`` and the ranks that keep 90% and 99% of ``Σσ²``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.linalg import effective_rank
from lorakit.ops.rank_rules import RankRule

SHOWN = 4  # leading singular values shown in the table (JSON has all)

_E90, _E99 = RankRule("energy", 0.9), RankRule("energy", 0.99)


@dataclass(frozen=True)
class ModuleSpectrum:
    """The spectrum facts of one module's ΔW.

    Attributes:
        values: every singular value, descending.
        effective_rank: ``exp(H(p))``, ``p = σ/Σσ`` (0 for an empty spectrum).
        rank_90: the smallest rank keeping 90% of ``Σσ²``; ``rank_99`` likewise at 99%.
    """

    values: list[float]
    effective_rank: float
    rank_90: int
    rank_99: int

    @property
    def leading(self) -> str:
        """The first :data:`SHOWN` singular values as table text."""
        return ", ".join(f"{v:.4g}" for v in self.values[:SHOWN])

    @property
    def smallest(self) -> float:
        """σ_min (0 for an empty spectrum)."""
        return self.values[-1] if self.values else 0.0


def module_spectrum(S: torch.Tensor) -> ModuleSpectrum:
    """The facts of one module from its singular values ``S`` (1-D, descending); O(len(S))."""
    return ModuleSpectrum([float(v) for v in S], effective_rank(S), _E90.select(S), _E99.select(S))


__all__ = ["SHOWN", "ModuleSpectrum", "module_spectrum"]
