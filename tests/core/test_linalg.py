"""The factored (QR-core) SVD, its batched form and the randomized SVD against float64 dense references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.factors import LoraFactors
from lorakit.linalg import (
    adapter_spectra,
    adapter_svds,
    canonical,
    core_svd,
    effective_rank,
    factored_svd,
    group_by_shape,
    randomized_svd,
    svd_of,
)
from lorakit.testing import random_adapter, random_factors

CASES = [  # (out, in, r, decay, deficient rank or None)
    (48, 40, 8, None, None),
    (48, 40, 8, 0.6, None),
    (64, 32, 12, 0.8, 5),  # rank-deficient: B@A has rank 5 < r
    (6, 40, 10, None, None),  # out < r
    (40, 5, 10, 0.7, None),  # in < r
    (7, 9, 16, None, None),  # out, in < r
]


def _factors(out: int, inn: int, r: int, decay: float | None, deficient: int | None, seed: int) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    f = random_factors(out, inn, r, scale=1.7, decay=decay, generator=g) if r <= min(out, inn) else \
        LoraFactors(torch.randn(r, inn, generator=g), torch.randn(out, r, generator=g), 1.7)
    if deficient is not None:  # make B's columns span only `deficient` directions
        mix = torch.randn(deficient, r, generator=g)
        f = f.with_(B=f.B[:, :deficient] @ mix)
    return f


@pytest.mark.parametrize("case", CASES)
def test_factored_svd_matches_dense_float64(case):
    f = _factors(*case, seed=1)
    dense = f.delta(torch.float64)
    ref = torch.linalg.svdvals(dense)
    svd = svd_of(f)  # float32 compute
    assert svd.S.dtype == torch.float32
    n = min(svd.rank, ref.numel())
    assert svd.rank == min(f.shape[0], f.shape[1], f.rank)
    top = float(ref[0])
    assert torch.allclose(svd.S[:n].double(), ref[:n], rtol=0, atol=1e-6 * top)
    # truncated ΔW equals the dense truncation (where the kept σ are separated from the dropped ones)
    for k in range(1, n + 1):
        if k < n and float(ref[k - 1] - ref[k]) < 1e-3 * top:
            continue  # the rank-k truncation is not unique
        U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
        dense_k = (U[:, :k] * S[:k]) @ Vh[:k]
        t = svd.truncate(k)
        ours = (t.U.double() * t.S.double()) @ t.Vh.double()
        err = torch.linalg.norm(ours - dense_k) / torch.linalg.norm(dense)
        assert float(err) < 1e-6
        assert abs(svd.tail_error(k) - float(torch.linalg.norm(dense - dense_k) / torch.linalg.norm(dense))) < 1e-6


@pytest.mark.parametrize("case", CASES)
def test_float64_agrees_to_1e10(case):
    f = _factors(*case, seed=2).to(dtype=torch.float64)
    svd = svd_of(f)
    ref = torch.linalg.svdvals(f.delta(torch.float64))
    n = svd.rank
    assert torch.allclose(svd.S, ref[:n], rtol=0, atol=1e-10 * float(ref[0]))
    eye = torch.eye(n, dtype=torch.float64)
    assert torch.allclose(svd.U.T @ svd.U, eye, atol=1e-10)
    assert torch.allclose(svd.Vh @ svd.Vh.T, eye, atol=1e-10)
    assert torch.allclose(svd.dense(), f.delta(torch.float64), atol=1e-10 * float(ref[0]))


def test_full_rank_truncation_is_lossless_and_idempotent():
    f = _factors(30, 20, 6, 0.5, None, seed=3).to(dtype=torch.float64)
    svd = svd_of(f)
    assert svd.truncate(svd.rank) is svd and svd.tail_error(svd.rank) == 0.0
    once = svd.to_factors()
    again = svd_of(once).to_factors()
    assert torch.allclose(once.delta(torch.float64), f.delta(torch.float64), atol=1e-12)
    assert torch.allclose(again.A, once.A, atol=1e-10) or torch.allclose(again.delta(), once.delta(), atol=1e-10)
    assert torch.allclose(again.delta(torch.float64), once.delta(torch.float64), atol=1e-12)


def test_canonical_form_is_orthogonal_and_same_delta():
    f = _factors(40, 24, 6, 0.7, None, seed=4).to(dtype=torch.float64)
    c = canonical(f)
    gb, ga = c.B.T @ c.B, c.A @ c.A.T
    assert torch.allclose(gb, torch.diag(torch.diag(gb)), atol=1e-10)
    assert torch.allclose(ga, gb, atol=1e-10)  # σ folded evenly: BᵀB = AAᵀ = Σ
    assert c.scale == 1.0
    assert torch.allclose(c.delta(torch.float64), f.delta(torch.float64), atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 6), st.integers(0, 10_000))
def test_gauge_invariance(r, seed):
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(r, 11, generator=g, dtype=torch.float64), torch.randn(13, r, generator=g, dtype=torch.float64)
    G = torch.randn(r, r, generator=g, dtype=torch.float64) + 3 * torch.eye(r, dtype=torch.float64)
    s1 = factored_svd(B, A).S
    s2 = factored_svd(B @ G, torch.linalg.solve(G, A)).S
    assert torch.allclose(s1, s2, rtol=1e-8, atol=1e-10 * float(s1[0]))


def test_sum_of_terms_matches_dense():
    fs = [_factors(20, 16, r, None, None, seed=s).to(dtype=torch.float64) for s, r in ((5, 3), (6, 4))]
    svd = factored_svd([f.B for f in fs], [f.A for f in fs], [0.5 * fs[0].scale, -2.0 * fs[1].scale])
    dense = 0.5 * fs[0].delta(torch.float64) - 2.0 * fs[1].delta(torch.float64)
    assert torch.allclose(svd.S, torch.linalg.svdvals(dense)[:7], atol=1e-10)


def test_adapter_svds_batched_equals_one_by_one():
    shapes = {"a": (24, 16), "b": (24, 16), "c": (8, 16), "d": (24, 16)}
    ad = random_adapter(shapes, rank={"a": 4, "b": 4, "c": 4, "d": 6}, scale=0.3, decay=0.8, seed=7)
    assert group_by_shape(ad.infos()) == {(24, 16, 4): ["a", "b"], (8, 16, 4): ["c"], (24, 16, 6): ["d"]}
    spectra = dict(adapter_spectra(ad, device="cpu"))
    got = dict(adapter_svds(ad, device="cpu", max_batch_bytes=1))  # batches of one
    got2 = dict(adapter_svds(ad, device="cpu"))
    for n in shapes:
        ref = torch.linalg.svdvals(ad[n].delta(torch.float64))
        assert torch.allclose(spectra[n], ref[: spectra[n].numel()], atol=1e-6 * float(ref[0]))
        for g in (got, got2):
            assert torch.allclose(g[n].S.double(), ref[: g[n].rank], atol=1e-6 * float(ref[0]))
            assert torch.allclose(g[n].dense().double(), ad[n].delta(torch.float64), atol=1e-6 * float(ref[0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_adapter_svds_on_cuda_matches_cpu():
    ad = random_adapter({"a": (64, 48), "b": (64, 48)}, rank=8, decay=0.8)
    cpu = dict(adapter_svds(ad, device="cpu"))
    gpu = dict(adapter_svds(ad, device="cuda"))
    for n in ad:
        assert torch.allclose(cpu[n].S, gpu[n].S, atol=1e-5)


def test_randomized_svd_exact_when_probes_cover_the_rank():
    f = _factors(60, 50, 7, 0.6, None, seed=8).to(dtype=torch.float64)
    M = f.delta(torch.float64)
    svd = randomized_svd(M, 7, oversample=3, n_iter=1, dtype=torch.float64)
    assert torch.allclose(svd.dense(), M, atol=1e-10)


def test_randomized_svd_mean_error_within_hmt_bound():
    # geometric spectrum: E‖A − QQᵀA‖_F ≤ (1 + t/(p−1))^½ · tail, without power iterations (HMT 10.5).
    g = torch.Generator().manual_seed(9)
    m, n, t, p = 80, 60, 5, 4
    U, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = 0.8 ** torch.arange(n, dtype=torch.float64)
    M = (U * s) @ V.T
    tail = float(s[t:].square().sum().sqrt())
    errs = []
    for seed in range(50):
        svd = randomized_svd(M, t + p, oversample=0, n_iter=0, seed=seed, dtype=torch.float64)
        errs.append(float(torch.linalg.norm(M - svd.dense())))
    assert sum(errs) / len(errs) <= math.sqrt(1 + t / (p - 1)) * tail
    # with power iterations the rank-t truncation is near optimal
    svd = randomized_svd(M, t, oversample=10, n_iter=4, dtype=torch.float64)
    assert float(torch.linalg.norm(M - svd.dense())) <= 1.01 * tail


def test_effective_rank():
    assert effective_rank(torch.tensor([3.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.ones(5)) == pytest.approx(5.0)
    assert effective_rank(torch.zeros(3)) == 0.0
    assert effective_rank(2 * torch.tensor([3.0, 1.0])) == pytest.approx(effective_rank(torch.tensor([3.0, 1.0])))


def test_non_finite_factors_are_refused():
    from lorakit.errors import NumericalError

    B, A = torch.randn(6, 2), torch.randn(2, 5)
    B[3, 1] = float("nan")
    with pytest.raises(NumericalError):
        factored_svd(B, A)
    A[0, 0], B[3, 1] = float("inf"), 1.0
    with pytest.raises(NumericalError):
        factored_svd(B, A)


@pytest.mark.parametrize("case", CASES)
def test_leading_triplets_equal_the_full_svd_truncated(case):
    f = _factors(*case, seed=5).to(dtype=torch.float64)
    core = core_svd([f.B], [f.A], [f.scale])
    full = factored_svd([f.B], [f.A], [f.scale])
    assert torch.equal(core.S, full.S)  # the spectrum is complete before any rotation
    for k in range(1, core.rank + 1):
        lead, ref = core.leading(k), full.truncate(k)
        assert lead.rank == k
        for ours, theirs in ((lead.U, ref.U), (lead.S, ref.S), (lead.Vh, ref.Vh)):
            assert torch.allclose(ours, theirs, rtol=0, atol=1e-12)
        assert core.tail_error(k) == pytest.approx(full.tail_error(k), abs=1e-15)


def test_core_and_rotations_are_float64_unless_the_result_is_stored_in_16_bits():
    g = torch.Generator().manual_seed(0)
    f = random_factors(64, 48, 8, decay=0.7, generator=g)
    assert core_svd(f.B, f.A).core_dtype == torch.float64
    half = f.to(dtype=torch.bfloat16)
    core = core_svd(half.B, half.A)
    assert core.core_dtype == torch.float32  # float64 digits would be rounded away by bf16 storage
    assert core_svd(half.B, half.A, storage_dtype=torch.float32).core_dtype == torch.float64
    # float32 rotations stay far inside bf16's rounding (2^-8 relative)
    dense = half.delta(torch.float64)
    svd = core.leading()
    assert float(torch.linalg.norm(svd.dense().double() - dense) / torch.linalg.norm(dense)) < 1e-5


def test_batched_core_indexes_to_each_module():
    g = torch.Generator().manual_seed(1)
    B, A = torch.randn(3, 20, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, 10, generator=g,
                                                                                 dtype=torch.float64)
    core = core_svd(B, A)
    for i in range(3):
        one = core[i].leading(2)
        assert torch.allclose(one.dense(), factored_svd(B[i], A[i]).truncate(2).dense(), atol=1e-12)


def test_next_window_takes_the_asked_name_then_undone_ones_up_to_the_limit():
    from lorakit.linalg import next_window

    order = ["a", "b", "c", "d", "e"]
    size = {"a": 3, "b": 3, "c": 3, "d": 3, "e": 3}.__getitem__
    assert next_window(order, 0, size, 1, set()) == ["a"]  # one module at a time
    assert next_window(order, 0, size, 7, set()) == ["a", "b", "c"]  # stops once the limit is reached
    assert next_window(order, 1, size, 100, {"c"}) == ["b", "d", "e"]  # done modules are skipped
    assert next_window(order, 2, size, 100, {"c"}) == ["c", "d", "e"]  # asked again: computed again
