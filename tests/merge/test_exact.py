"""Exact factor-space merges against float64 dense references, and the algebraic identities."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.factors import LoraFactors
from lorakit.ops.merge_exact import cat, svd, task_arithmetic
from lorakit.ops.rank_rules import rank_rule
from lorakit.ops.registry import resolve
from lorakit.testing import random_adapter, random_factors

from ._ref import svd_truncate

F64 = torch.float64


def make(out=24, inn=18, ranks=(3, 5, 4), scales=(0.5, 2.0, 1.0), seed=0, decay=None):
    g = torch.Generator().manual_seed(seed)
    return [random_factors(out, inn, r, scale=s, generator=g, dtype=F64, decay=decay) for r, s in zip(ranks, scales)]


def dense_sum(fs, ws):
    return sum(w * f.delta(F64) for f, w in zip(fs, ws))


def test_cat_equals_stacking_and_dense_sum():
    fs, ws = make(), [0.7, -0.3, 1.5]
    res = cat(fs, ws)
    assert res.factors.rank == sum(f.rank for f in fs) and res.error == 0.0
    torch.testing.assert_close(res.factors.delta(F64), dense_sum(fs, ws), rtol=1e-12, atol=1e-12)
    # stacking: A rows are the inputs' A, B columns their weighted, scaled B
    torch.testing.assert_close(res.factors.A, torch.cat([f.A for f in fs]))
    torch.testing.assert_close(res.factors.B[:, :3], fs[0].B * (0.7 * fs[0].scale))


@pytest.mark.parametrize("k", [1, 3, 5, 12])
def test_svd_is_the_eckart_young_truncation_of_the_exact_sum(k):
    fs, ws = make(decay=0.7), [1.0, 0.5, -0.25]
    res = svd(fs, ws, rank_rule=rank_rule(rank=k))
    target = dense_sum(fs, ws)
    best = svd_truncate(target, k)
    torch.testing.assert_close(res.factors.delta(F64), best, rtol=1e-9, atol=1e-10)
    err = float((target - best).norm() / target.norm())
    assert res.error == pytest.approx(err, rel=1e-7, abs=1e-12) and res.best_error == res.error


def test_svd_at_full_rank_equals_cat():
    fs, ws = make(), [0.3, 0.3, 0.4]
    full = svd(fs, ws, rank_rule=rank_rule(rank=12))
    torch.testing.assert_close(full.factors.delta(F64), cat(fs, ws).factors.delta(F64), rtol=1e-10, atol=1e-11)
    assert full.error < 1e-7


def test_svd_default_rank_is_the_largest_input_rank_and_rules_apply():
    fs = make(ranks=(3, 6), scales=(1.0, 1.0))
    assert svd(fs, [1, 1]).factors.rank == 6
    e = svd(fs, [1, 1], rank_rule=rank_rule(error=0.2))
    assert e.error <= 0.2
    en = svd(fs, [1, 1], rank_rule=rank_rule(energy=0.9))
    assert 1 - en.error**2 >= 0.9 - 1e-9


# one adapter at weight 1, weights scaling the result, every method listed: generated from the registry in
# test_contract.py (every registered operator, by what it declares)


@pytest.mark.parametrize("name", ["cat", "svd", "task_arithmetic", "knots", "core_space", "magnitude_prune",
                                  "breadcrumbs"])
def test_negation_cancels(name):
    """For the linear methods (KnOTS and Core Space with the linear inner merge). TIES-like elections pick one
    sign where the inputs cancel exactly, as the paper's rule says, so they are not expected to cancel."""
    (f,) = make(ranks=(4,), scales=(1.3,))
    spec = resolve(name)
    params = {"density": 0.5} if "density" in spec.params else {}
    if "inner" in spec.params:
        params["inner"] = "linear"
    res = spec.fn([f, f], [1.0, -1.0], **params)
    assert float(res.factors.delta(F64).norm()) < 1e-9 * f.norm()


@pytest.mark.parametrize("name", ["cat", "svd", "task_arithmetic", "knots", "core_space"])
def test_scale_folding_and_gauge_invariance(name):
    """The same ΔW with the scale in B, in A, split √s/√s, or under (BG, G⁻¹A) merges to the same ΔW."""
    fs = make(ranks=(3, 4), scales=(2.5, 0.4), decay=0.8)
    spec = resolve(name)
    kw = {"inner": "linear"} if name == "core_space" else {}
    ref = spec.fn(fs, [0.6, 0.4], **kw).factors.delta(F64)
    g = torch.Generator().manual_seed(5)
    variants = []
    for f in fs:
        G = torch.randn(f.rank, f.rank, generator=g, dtype=F64) + 3 * torch.eye(f.rank, dtype=F64)
        variants.append(LoraFactors(torch.linalg.solve(G, f.A), f.B @ G * f.scale, 1.0))
    torch.testing.assert_close(spec.fn(variants, [0.6, 0.4], **kw).factors.delta(F64), ref, rtol=1e-8, atol=1e-9)
    folded = [f.folded() for f in fs]
    torch.testing.assert_close(spec.fn(folded, [0.6, 0.4], **kw).factors.delta(F64), ref, rtol=1e-8, atol=1e-9)


def test_python_algebra_is_exact():
    shapes = {"q": (16, 12), "v": (8, 12)}
    a = random_adapter(shapes, 3, scale=0.5, seed=1, dtype=F64)
    b = random_adapter(shapes, 5, scale=2.0, seed=2, dtype=F64)
    for expr, want in [(a + b, lambda n: a[n].delta(F64) + b[n].delta(F64)),
                       (0.5 * a, lambda n: 0.5 * a[n].delta(F64)),
                       (a - b, lambda n: a[n].delta(F64) - b[n].delta(F64)),
                       (-a, lambda n: -a[n].delta(F64))]:
        for n in shapes:
            torch.testing.assert_close(expr[n].delta(F64), want(n), rtol=1e-12, atol=1e-12)
    assert float((a - a)["q"].delta(F64).norm()) < 1e-12


@settings(max_examples=25, deadline=None)
@given(w1=st.floats(-3, 3), w2=st.floats(-3, 3), r1=st.integers(1, 5), r2=st.integers(1, 5),
       seed=st.integers(0, 10**6))
def test_cat_and_svd_laws(w1, w2, r1, r2, seed):
    fs = make(out=10, inn=7, ranks=(r1, r2), scales=(0.5, 1.5), seed=seed)
    target = dense_sum(fs, [w1, w2])
    torch.testing.assert_close(cat(fs, [w1, w2]).factors.delta(F64), target, rtol=1e-10, atol=1e-10)
    full = svd(fs, [w1, w2], rank_rule=rank_rule(rank=7)).factors.delta(F64)
    torch.testing.assert_close(full, target, rtol=1e-8, atol=1e-9)
    # commutativity
    torch.testing.assert_close(cat(fs[::-1], [w2, w1]).factors.delta(F64), target, rtol=1e-10, atol=1e-10)


def test_task_arithmetic_lambda():
    fs, ws = make(), [1.0, 1.0, 1.0]
    got = task_arithmetic(fs, ws, lam=0.4).factors.delta(F64)
    torch.testing.assert_close(got, 0.4 * dense_sum(fs, ws), rtol=1e-12, atol=1e-12)


def test_core_space_with_an_elementwise_inner_merge_depends_on_the_gauge():
    """Core Space bases come from the SVDs of the stacked B's and A's, which change under (BG, G⁻¹A); with TIES in
    the core the result changes too (KnOTS, whose basis comes from the ΔW's themselves, does not). Documented."""
    fs = make(ranks=(3, 4), scales=(2.5, 0.4), decay=0.8)
    g = torch.Generator().manual_seed(5)
    moved = []
    for f in fs:
        G = torch.randn(f.rank, f.rank, generator=g, dtype=F64) + 3 * torch.eye(f.rank, dtype=F64)
        moved.append(LoraFactors(torch.linalg.solve(G, f.A), f.B @ G, f.scale))
    core = resolve("core_space").fn
    a = core(fs, [1, 1], inner="ties", density=0.5).factors.delta(F64)
    b = core(moved, [1, 1], inner="ties", density=0.5).factors.delta(F64)
    assert float((a - b).norm()) > 1e-6 * float(a.norm())
    kn = resolve("knots").fn
    torch.testing.assert_close(kn(fs, [1, 1], density=0.5).factors.delta(F64),
                               kn(moved, [1, 1], density=0.5).factors.delta(F64), rtol=1e-7, atol=1e-9)
