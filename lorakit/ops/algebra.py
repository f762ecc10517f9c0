"""Exact factor-space algebra: weighted sums by rank concatenation.

``cat([a, b], [w_a, w_b])`` has, for every module, ``ΔW = w_a·ΔW_a + w_b·ΔW_b`` exactly:

    A = [A_a; A_b]  (r_a + r_b, in)      B = [w_a·s_a·B_a, w_b·s_b·B_b]  (out, r_a + r_b)      scale = 1

Cost: O((out + in)·Σr) memory and time per module; no dense ΔW. Bias updates (PEFT ``lora_bias``) add up with
the same weights (:func:`bias_sum`); whole module tensors (``modules_to_save``) merge only where the result does
not depend on the base weights (:func:`merge_full_tensors`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch

from lorakit.adapter import Adapter, FullTensor, ModuleInfo
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
    bias = bias_sum(factors, weights)
    return LoraFactors(A, B, 1.0, first.kernel, first.kind, mags[0] if len(mags) == len(factors) == 1 else None,
                       {"bias": bias} if bias is not None else {})


def bias_sum(factors: Sequence[LoraFactors], weights: Sequence[float]) -> torch.Tensor | None:
    """``Σ w_i·Δb_i`` over the inputs that have a bias update (PEFT ``lora_bias``; an input without one adds 0),
    exact: the bias update is linear in the adapter. ``None`` when no input has one. Computed in float32 or wider,
    stored in the first bias's dtype."""
    biases = [(f.bias, w) for f, w in zip(factors, weights) if f.bias is not None]
    if not biases:
        return None
    dt = torch.float32
    for b, _ in biases:
        dt = torch.promote_types(dt, b.dtype)
    total = sum((b.to(dt) * float(w) for b, w in biases), torch.zeros_like(biases[0][0], dtype=dt))
    return total.to(biases[0][0].dtype)


def merge_full_tensors(adapters: Sequence[Adapter], weights: Sequence[float],
                       labels: Sequence[str] | None = None) -> dict[str, FullTensor]:
    """The whole module tensors (PEFT ``modules_to_save``) of a weighted sum of adapters.

    Each saved tensor ``T_i`` updates the base tensor ``W`` by ``T_i − W``, so the weighted sum is
    ``W + Σ w_i·(T_i − W)``, which does not depend on ``W`` exactly when ``Σ w_i = 1``: then it is ``Σ w_i·T_i``
    (``T`` itself when every input saved the same tensor). Any other case would need the base weights, and is
    refused rather than guessed. Lazy: tensors are read when the writer asks.

    Raises:
        IncompatibleAdaptersError: some inputs save a tensor that others do not, shapes differ, or the weights
            do not sum to 1.
    """
    labels = list(labels) if labels is not None else [a.meta.source_path or f"#{i}" for i, a in enumerate(adapters)]
    names = list(dict.fromkeys(n for a in adapters for n in a.meta.full_tensors))
    if not names:
        return {}
    for label, a in zip(labels, adapters):
        missing = [n for n in names if n not in a.meta.full_tensors]
        if missing:
            raise IncompatibleAdaptersError(
                f"saves no whole tensor for {missing[0]} (modules_to_save) while another input does: merging "
                "them would need the base model's weights", file=label,
                hint="merge adapters that save the same modules, or apply each to the base model in turn",
            )
    total = math.fsum(weights)
    if abs(total - 1.0) > 1e-9:
        raise IncompatibleAdaptersError(
            f"the inputs save whole module tensors (modules_to_save, e.g. {names[0]}) and the weights sum to "
            f"{total:g}: W + Σ w_i·(T_i − W) needs the base weights unless the weights sum to 1", file=labels[0],
            hint="give weights that sum to 1 (e.g. --weights 0.5 0.5), or apply each adapter to the base model",
        )
    out: dict[str, FullTensor] = {}
    for n in names:
        parts = [a.meta.full_tensors[n] for a in adapters]
        for label, t in zip(labels, parts):
            if t.shape != parts[0].shape:
                raise IncompatibleAdaptersError(
                    f"saved tensor {n} has shape {list(t.shape)} here but {list(parts[0].shape)} in {labels[0]}",
                    file=label)

        def load(parts: list[FullTensor] = parts) -> torch.Tensor:
            tensors = [t.load() for t in parts]
            if all(torch.equal(t, tensors[0]) for t in tensors[1:]):
                return tensors[0]
            dt = torch.promote_types(torch.float32, tensors[0].dtype)
            acc = torch.zeros(tensors[0].shape, dtype=dt)
            for t, w in zip(tensors, weights):
                acc += float(w) * t.to(dt)
            return acc.to(tensors[0].dtype)

        out[n] = FullTensor(parts[0].shape, parts[0].dtype, load, parts[0].key)
    return out


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
    dora = next(((a, n) for a in adapters for n in names if a.info(n).has_magnitude), None)
    if dora is not None and len(adapters) > 1:
        raise IncompatibleAdaptersError(
            "DoRA modules have no exact sum without the base weights: adding would drop the magnitude",
            file=dora[0].meta.source_path, module=dora[1], hint="fold DoRA adapters into the base (lorakit apply)",
        )
    full = merge_full_tensors(adapters, weights)
    infos = {}
    for n in names:
        i0 = adapters[0].info(n)
        infos[n] = ModuleInfo(
            n, i0.out_features, i0.in_features, sum(a.info(n).rank for a in adapters), 1.0,
            torch.float32, i0.kind, i0.kernel, has_bias=any(a.info(n).has_bias for a in adapters),
        )

    def one(n: str) -> LoraFactors:
        return cat_factors([a[n] for a in adapters], weights, module=n)

    meta = adapters[0].meta.with_(passthrough={}, full_tensors=full)
    return Adapter({n: partial(one, n) for n in names}, meta, infos)
