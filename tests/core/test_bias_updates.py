"""Bias updates (PEFT ``lora_bias``) are linear in the adapter, like ΔW: scaling, weighted sums and
re-factorisations act on ``Δb`` exactly as on ΔW (float64 references)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.adapter import Adapter, AdapterMeta, FullTensor, cat, merge_full_tensors
from lorakit.algebra import cat_factors
from lorakit.errors import IncompatibleAdaptersError
from lorakit.factors import LoraFactors
from lorakit.linalg import canonical

weights = st.floats(min_value=-3, max_value=3, allow_nan=False, allow_infinity=False)


def factors(seed: int, bias: bool = True) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    extras = {"bias": torch.randn(5, generator=g, dtype=torch.float64)} if bias else {}
    return LoraFactors(torch.randn(3, 4, generator=g, dtype=torch.float64),
                       torch.randn(5, 3, generator=g, dtype=torch.float64), 0.7 + seed, extras=extras)


@settings(max_examples=30, deadline=None)
@given(weights, weights, st.booleans())
def test_weighted_sum_of_bias_updates(wa, wb, b_has_bias):
    a, b = factors(1), factors(2, bias=b_has_bias)
    out = cat_factors([a, b], [wa, wb])
    want = wa * a.bias + (wb * b.bias if b_has_bias else 0)
    torch.testing.assert_close(out.bias, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.delta(torch.float64), wa * a.delta(torch.float64) + wb * b.delta(torch.float64))


@settings(max_examples=30, deadline=None)
@given(weights)
def test_scaling_scales_the_bias_update_and_refactoring_keeps_it(w):
    f = factors(3)
    torch.testing.assert_close(f.scaled(w).bias, w * f.bias, rtol=1e-12, atol=0)
    assert torch.equal(f.folded().bias, f.bias)
    assert torch.equal(canonical(f).bias, f.bias)


def saved(values: list[float]) -> list[Adapter]:
    return [Adapter({"m": factors(i)}, AdapterMeta(full_tensors={"head.weight": FullTensor(
        (2,), torch.float64, lambda v=v: torch.full((2,), v, dtype=torch.float64), "k")})) for i, v in enumerate(values)]


def test_saved_tensors_are_a_convex_combination_or_refused():
    a, b = saved([1.0, 3.0])
    full = merge_full_tensors([a, b], [0.25, 0.75])
    torch.testing.assert_close(full["head.weight"].load(), torch.full((2,), 2.5, dtype=torch.float64))
    with pytest.raises(IncompatibleAdaptersError, match="sum to"):
        cat([a, b])
    with pytest.raises(IncompatibleAdaptersError, match="modules_to_save"):
        merge_full_tensors([a, Adapter({"m": factors(5)})], [0.5, 0.5])
