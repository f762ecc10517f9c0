"""Exact factor-space algebra: weighted sums by rank concatenation.

``cat([a, b], [w_a, w_b])`` has, for every module, ``ΔW = w_a·ΔW_a + w_b·ΔW_b`` exactly:

    A = [A_a; A_b]  (r_a + r_b, in)      B = [w_a·s_a·B_a, w_b·s_b·B_b]  (out, r_a + r_b)      scale = 1

Cost: O((out + in)·Σr) memory and time per module; no dense ΔW.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorakit.adapter import Adapter, ModuleInfo
from lorakit.errors import IncompatibleAdaptersError, ShapeMismatchError
from lorakit.factors import LoraFactors


def cat_factors(factors: Sequence[LoraFactors], weights: Sequence[float], *, module: str | None = None) -> LoraFactors:
    """Exact weighted sum of one module's factors by rank concatenation (scales folded into B)."""
    first = factors[0]
    for f in factors[1:]:
        if f.shape != first.shape:
            raise ShapeMismatchError(
                f"shapes differ between adapters: {first.shape} vs {f.shape} (different base models?)", module=module
            )
    dtype = torch.promote_types(torch.float32, first.dtype)
    for f in factors:
        dtype = torch.promote_types(dtype, f.dtype)
    A = torch.cat([f.A.to(dtype) for f in factors], dim=0)
    B = torch.cat([f.B.to(dtype) * (w * f.scale) for f, w in zip(factors, weights)], dim=1)
    mags = [f.magnitude for f in factors if f.magnitude is not None]
    return LoraFactors(A, B, 1.0, first.kernel, first.kind, mags[0] if len(mags) == len(factors) == 1 else None)


def cat(adapters: Sequence[Adapter], weights: Sequence[float] | None = None) -> Adapter:
    """Exact weighted sum of adapters over the same module set, lazily, by rank concatenation."""
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    names = list(adapters[0])
    for a in adapters[1:]:
        if set(a) != set(names):
            missing = sorted(set(names) - set(a))[:3]
            extra = sorted(set(a) - set(names))[:3]
            raise IncompatibleAdaptersError(
                f"module sets differ (missing {missing}, unexpected {extra})", missing=missing, unexpected=extra
            )
    infos = {}
    for n in names:
        i0 = adapters[0].info(n)
        infos[n] = ModuleInfo(
            n, i0.out_features, i0.in_features, sum(a.info(n).rank for a in adapters), 1.0,
            torch.float32, i0.kind, i0.kernel,
        )

    def one(n: str) -> LoraFactors:
        return cat_factors([a[n] for a in adapters], weights, module=n)

    return Adapter({n: (lambda n=n: one(n)) for n in names}, adapters[0].meta.with_(passthrough={}), infos)
