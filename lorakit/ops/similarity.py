"""Similarity between adapters in factored form: inner products, cosines and norm ratios, no dense ΔW.

For ``ΔW_a = s_a B_a A_a`` and ``ΔW_b = s_b B_b A_b``::

    ⟨ΔW_a, ΔW_b⟩_F = s_a s_b · Σ (B_aᵀ B_b) ⊙ (A_a A_bᵀ)        O((out + in)·r_a·r_b)

so the cosine ``⟨a, b⟩/(‖a‖‖b‖)`` per module and overall (inner products and squared norms summed over the
common modules) cost no more than reading the factors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorakit.adapter import Adapter
from lorakit.device import factors_to
from lorakit.errors import IncompatibleAdaptersError
from lorakit.factors import frobenius_inner

inner = frobenius_inner  # ⟨ΔW_a, ΔW_b⟩_F in factored form (float64)


@dataclass(frozen=True)
class Similarity:
    """Pairwise facts about ``n`` adapters over their common modules.

    Attributes:
        names: the adapters' labels.
        modules: the common module names.
        gram: ``(n, n)`` summed inner products ``Σ_modules ⟨ΔW_i, ΔW_j⟩``.
        per_module: module → ``(n, n)`` Gram matrix of that module.
    """

    names: list[str]
    modules: list[str]
    gram: torch.Tensor
    per_module: dict[str, torch.Tensor]

    @staticmethod
    def _cos(g: torch.Tensor) -> torch.Tensor:
        d = g.diagonal().clamp_min(0).sqrt()
        denom = d.unsqueeze(0) * d.unsqueeze(1)
        return torch.where(denom > 0, g / denom.clamp_min(1e-300), torch.zeros_like(g))

    def cosine(self, module: str | None = None) -> torch.Tensor:
        """``(n, n)`` cosine similarities, overall or of one module."""
        return self._cos(self.gram if module is None else self.per_module[module])

    def norms(self, module: str | None = None) -> torch.Tensor:
        """``‖ΔW_i‖_F`` (overall: over all common modules)."""
        g = self.gram if module is None else self.per_module[module]
        return g.diagonal().clamp_min(0).sqrt()

    def norm_ratio(self, module: str | None = None) -> torch.Tensor:
        """``(n, n)`` matrix of ``‖ΔW_i‖/‖ΔW_j‖``."""
        nrm = self.norms(module)
        return nrm.unsqueeze(1) / nrm.unsqueeze(0).clamp_min(1e-300)


def similarity(adapters: Sequence[Adapter], names: Sequence[str] | None = None, *,
               device: str | torch.device = "cpu") -> Similarity:
    """Cosines and norms of ``adapters`` over their common modules, module by module (bounded memory).

    ``device``: where the small Gram products run (factors moved by :func:`lorakit.device.factors_to`).

    Raises:
        IncompatibleAdaptersError: no module in common, or a common module with different shapes.
    """
    names = list(names or [f"#{i}" for i in range(len(adapters))])
    common = [m for m in adapters[0] if all(m in a for a in adapters[1:])]
    if not common:
        raise IncompatibleAdaptersError("the adapters have no module in common")
    n = len(adapters)
    gram = torch.zeros(n, n, dtype=torch.float64)
    per: dict[str, torch.Tensor] = {}
    for m in common:
        shapes = {a.info(m).shape for a in adapters}
        if len(shapes) > 1:
            raise IncompatibleAdaptersError(f"shapes differ: {sorted(shapes)} (adapters for different base models?)",
                                            module=m)
        fs = [factors_to(a[m], device) for a in adapters]
        g = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            for j in range(i, n):
                g[i, j] = g[j, i] = inner(fs[i], fs[j])
        per[m] = g
        gram += g
    return Similarity(names, common, gram, per)


def cosine(a: Adapter, b: Adapter) -> float:
    """Overall cosine similarity of two adapters."""
    return float(similarity([a, b]).cosine()[0, 1])


__all__ = ["Similarity", "cosine", "inner", "similarity"]


