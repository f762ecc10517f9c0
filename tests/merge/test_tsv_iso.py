"""TSV-M, Iso-C and Iso-CTS against their float64 dense references, identities and algebraic laws."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.errors import OperatorParameterError
from lorakit.factors import LoraFactors
from lorakit.ops.iso import iso_c, iso_cts
from lorakit.ops.rank_rules import rank_rule
from lorakit.ops.registry import resolve
from lorakit.ops.tsv import polar, split_rank, tsv
from lorakit.testing import random_factors

from . import _ref

F64 = torch.float64


def make(out=30, inn=22, ranks=(4, 4, 4), scales=(0.5, 2.0, 1.0), seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return [random_factors(out, inn, r, scale=s, generator=g, dtype=dtype, decay=0.8)
            for r, s in zip(ranks, scales)]


def taus(fs, ws):
    return [w * f.delta(F64) for f, w in zip(fs, ws)]


def close(a, b, tol=1e-9):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))


@pytest.mark.parametrize("K", [3, 6, 12])
def test_tsv_matches_the_dense_reference(K):
    fs, ws = make(), [0.7, -0.4, 1.1]
    res = tsv(fs, ws, rank_rule=rank_rule(rank=K), lam=0.8)
    ks = list(res.info["per_task"])
    assert sum(ks) == K == res.factors.rank and ks == split_rank(K, [4, 4, 4])
    close(res.factors.delta(F64), 0.8 * _ref.tsv(taus(fs, ws), ks))


def test_tsv_default_rank_and_float32_precision():
    fs, ws = make(ranks=(6, 6)), [1.0, 1.0]
    res = tsv([f.to(dtype=torch.float32) for f in fs], ws)
    assert res.factors.rank == 6 and res.info["per_task"] == [3, 3] and res.factors.dtype == torch.float32
    close(res.factors.delta(F64), _ref.tsv(taus(fs, ws), [3, 3]), tol=1e-5)


def test_tsv_identities():
    (f,) = make(ranks=(5,))
    torch.testing.assert_close(tsv([f], [1.0]).factors.delta(F64), f.delta(F64), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tsv([f], [0.5]).factors.delta(F64), 0.5 * f.delta(F64), rtol=1e-10, atol=1e-12)
    # tasks in orthogonal subspaces (disjoint rows and columns): nothing interferes, TSV-M at full rank is the sum
    a = LoraFactors(torch.randn(3, 10, dtype=F64), torch.cat([torch.randn(6, 3, dtype=F64), torch.zeros(6, 3, dtype=F64)]))
    b = LoraFactors(torch.randn(2, 10, dtype=F64), torch.cat([torch.zeros(6, 2, dtype=F64), torch.randn(6, 2, dtype=F64)]))
    b = b.with_(A=torch.cat([torch.zeros(2, 5, dtype=F64), b.A[:, 5:]], 1))
    a = a.with_(A=torch.cat([a.A[:, :5], torch.zeros(3, 5, dtype=F64)], 1))
    res = tsv([a, b], [1.0, 1.0], rank_rule=rank_rule(rank=5))
    torch.testing.assert_close(res.factors.delta(F64), a.delta(F64) + b.delta(F64), rtol=1e-10, atol=1e-12)
    assert res.error < 1e-6  # from ‖X‖² − 2⟨X,T⟩ + ‖T‖²: cancellation leaves ~√eps


def test_tsv_reports_the_distance_to_the_sum():
    fs, ws = make(), [1.0, 1.0, 1.0]
    res = tsv(fs, ws, rank_rule=rank_rule(rank=6))
    target = sum(taus(fs, ws))
    want = float((res.factors.delta(F64) - target).norm() / target.norm())
    assert res.error == pytest.approx(want, rel=1e-8)
    best = float((_ref.svd_truncate(target, 6) - target).norm() / target.norm())
    assert res.best_error == pytest.approx(best, rel=1e-8) and res.error >= res.best_error - 1e-12


def test_polar_is_the_nearest_orthonormal_matrix():
    X = torch.randn(12, 4, dtype=F64)
    P = polar(X)
    torch.testing.assert_close(P.T @ P, torch.eye(4, dtype=F64), rtol=0, atol=1e-12)
    Q, _ = torch.linalg.qr(X)  # another orthonormal basis of the same span is farther from X
    assert float((P - X).norm()) <= float((Q - X).norm()) + 1e-12


@pytest.mark.parametrize("K", [None, 5, 12])
def test_iso_c_matches_the_dense_reference(K):
    fs, ws = make(), [0.7, -0.4, 1.1]
    rule = rank_rule(rank=K) if K else None
    res = iso_c(fs, ws, rank_rule=rule, lam=1.3)
    assert res.factors.rank == (K or 12)
    got = res.factors.delta(F64)
    close(got, 1.3 * _ref.iso_c(taus(fs, ws), K))
    S = torch.linalg.svdvals(got)[: res.factors.rank]
    torch.testing.assert_close(S, torch.full_like(S, float(S.mean())), rtol=1e-9, atol=0)  # isotropic


def test_iso_c_keeps_an_isotropic_sum_and_the_trace_norm():
    # a sum whose spectrum is already flat is returned as is; otherwise Σσ (the trace norm) is kept
    U, _ = torch.linalg.qr(torch.randn(20, 4, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(16, 4, dtype=F64))
    flat = LoraFactors(V.T * 2.0, U)
    torch.testing.assert_close(iso_c([flat], [1.0]).factors.delta(F64), flat.delta(F64), rtol=1e-10, atol=1e-12)
    fs, ws = make(), [1.0, 1.0, 1.0]
    nuclear = float(torch.linalg.svdvals(sum(taus(fs, ws))).sum())
    got = float(torch.linalg.svdvals(iso_c(fs, ws).factors.delta(F64)).sum())
    assert got == pytest.approx(nuclear, rel=1e-9)


@pytest.mark.parametrize("K,frac", [(None, 0.8), (8, 0.5), (6, 0.0), (12, 1.0)])
def test_iso_cts_matches_the_dense_reference(K, frac):
    fs, ws = make(), [0.7, -0.4, 1.1]
    res = iso_cts(fs, ws, rank_rule=rank_rule(rank=K) if K else None, common_fraction=frac, lam=0.9)
    kc, s = res.info["common"], res.info["per_task"]
    assert kc + 3 * s == res.factors.rank == (K or 12)
    close(res.factors.delta(F64), 0.9 * _ref.iso_cts(taus(fs, ws), 0, kc, s))


def test_iso_cts_with_the_whole_budget_common_is_iso_c():
    fs, ws = make(), [1.0, 0.5, 2.0]
    a = iso_cts(fs, ws, rank_rule=rank_rule(rank=6), common_fraction=1.0).factors.delta(F64)
    b = iso_c(fs, ws, rank_rule=rank_rule(rank=6)).factors.delta(F64)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_iso_cts_rejects_a_fraction_out_of_range():
    with pytest.raises(OperatorParameterError, match="common_fraction"):
        iso_cts(make(), [1.0] * 3, common_fraction=1.5)


def test_registered_with_typed_parameters():
    for name in ("tsv", "iso_c", "iso_cts"):
        spec = resolve(name)
        assert not spec.exact and spec.space == "factors" and "rank_rule" in spec.params
    assert resolve("iso_cts").validate({"common_fraction": "0.6"}) == {"common_fraction": 0.6}


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), c=st.floats(0.1, 5.0), method=st.sampled_from(["tsv", "iso_c", "iso_cts"]))
def test_homogeneous_and_order_free(seed, c, method):
    """Scaling every input by c > 0 scales the merge by c; permuting the inputs (equal ranks) changes nothing."""
    fn = resolve(method).fn
    fs = make(ranks=(3, 3), seed=seed)
    rule = rank_rule(rank=4)
    base = fn(fs, [1.0, 1.0], rank_rule=rule).factors.delta(F64)
    scaled = fn(fs, [c, c], rank_rule=rule).factors.delta(F64)
    torch.testing.assert_close(scaled, c * base, rtol=1e-7, atol=1e-9 * c * float(base.abs().max()))
    swapped = fn(fs[::-1], [1.0, 1.0], rank_rule=rule).factors.delta(F64)
    torch.testing.assert_close(swapped, base, rtol=1e-7, atol=1e-9 * float(base.abs().max()))
