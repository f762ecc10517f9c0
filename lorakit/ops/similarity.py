"""Similarity between adapters in factored form: inner products, cosines and norm ratios, no dense ΔW.

For ``ΔW_a = s_a B_a A_a`` and ``ΔW_b = s_b B_b A_b``::

    ⟨ΔW_a, ΔW_b⟩_F = s_a s_b · Σ (B_aᵀ B_b) ⊙ (A_a A_bᵀ)        O((out + in)·r_a·r_b)

so the cosine ``⟨a, b⟩/(‖a‖‖b‖)`` per module and overall (inner products and squared norms summed over the
common modules) cost no more than reading the factors. This module is the math: one module's Gram matrix
(:func:`module_gram`) and the facts drawn from the Grams (:class:`Similarity`); the loop over the modules of
whole adapters is the verb's (:func:`lorakit.verbs.similarity.similarity`, through the engine's module stream).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorakit.factors import LoraFactors, frobenius_inner

inner = frobenius_inner  # ⟨ΔW_a, ΔW_b⟩_F in factored form (float64)


def module_gram(factors: Sequence[LoraFactors]) -> torch.Tensor:
    """``(n, n)`` float64 Gram matrix ``G_ij = ⟨ΔW_i, ΔW_j⟩_F`` of one module's ``n`` factor sets (same shape),
    on CPU; ``n(n+1)/2`` factored inner products, O((out + in)·r_i·r_j) each, on the factors' device."""
    n = len(factors)
    g = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            g[i, j] = g[j, i] = inner(factors[i], factors[j])
    return g


@dataclass(frozen=True)
class Similarity:
    """Pairwise facts about ``n`` adapters over their common modules.

    Attributes:
        names: the adapters' labels.
        modules: the common module names.
        gram: ``(n, n)`` summed inner products ``Σ_modules ⟨ΔW_i, ΔW_j⟩`` (summed in ``modules`` order).
        per_module: module → ``(n, n)`` Gram matrix of that module (:func:`module_gram`).
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


__all__ = ["Similarity", "inner", "module_gram"]
