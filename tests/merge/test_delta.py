"""Delta-space merges against float64 dense implementations of the papers' formulas (tests/merge/_ref.py)."""

from __future__ import annotations

import pytest
import torch

from lorakit.errors import OperatorParameterError
from lorakit.ops import _kernels as K
from lorakit.ops import merge_delta as D
from lorakit.ops.rank_rules import rank_rule
from lorakit.testing import random_factors

from . import _ref

F64 = torch.float64


def make(out=30, inn=20, ranks=(3, 5, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [random_factors(out, inn, r, scale=s, generator=g, dtype=F64) for r, s in zip(ranks, (0.5, 2.0, 1.0))]


def taus(fs, ws):
    return [w * f.delta(F64) for f, w in zip(fs, ws)]


FULL = rank_rule(rank=20)  # min(shape): the randomized SVD then reproduces the dense result exactly


@pytest.fixture(params=["one-tile", "many-tiles", "cache-tiles"])
def tiling(request, monkeypatch):
    if request.param == "many-tiles":  # 3 rows per tile: thresholds and merges must not depend on the tiling
        monkeypatch.setattr(K, "TILE_ELEMENTS", 60)
    if request.param == "cache-tiles":  # CPU tiles of 2, 2, 1 rows inside 5-row random-stream tiles
        monkeypatch.setattr(K, "TILE_ELEMENTS", 100)
        monkeypatch.setattr(K, "CPU_TILE_ELEMENTS", 40)
    return request.param != "one-tile"


@pytest.mark.parametrize("density", [0.1, 0.3, 0.75, 1.0])
def test_ties_matches_the_paper(density, tiling):
    fs, ws = make(), [0.7, -0.4, 1.1]
    got = D.ties(fs, ws, density=density, lam=0.8, rank_rule=FULL)
    want = 0.8 * _ref.ties(taus(fs, ws), density)
    torch.testing.assert_close(got.factors.delta(F64), want, rtol=1e-8, atol=1e-10)
    assert got.error < 1e-7


def test_magnitude_prune_and_breadcrumbs_match_the_formulas(tiling):
    fs, ws = make(), [1.0, 0.5, -0.5]
    got = D.magnitude_prune(fs, ws, density=0.25, rank_rule=FULL).factors.delta(F64)
    torch.testing.assert_close(got, _ref.magnitude_prune(taus(fs, ws), 0.25), rtol=1e-8, atol=1e-10)
    got = D.breadcrumbs(fs, ws, density=0.6, gamma=0.05, rank_rule=FULL).factors.delta(F64)
    torch.testing.assert_close(got, _ref.breadcrumbs(taus(fs, ws), 0.6, 0.05), rtol=1e-8, atol=1e-10)


def _masks(shape, density, seed, n, module):
    """The Bernoulli keep masks, drawn tile by tile with the documented per-(task, module, tile) RNG."""
    rows = K.tile_rows(*shape)
    out = []
    for i in range(n):
        parts = [torch.rand(min(rows, shape[0] - r0), shape[1], generator=K.tile_generator(seed, i, module, r0))
                 < density for r0 in range(0, shape[0], rows)]
        out.append(torch.cat(parts))
    return out


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_matches_the_formula(method, tiling):
    fs, ws, d = make(), [0.7, -0.4, 1.1], 0.4
    got = getattr(D, method)(fs, ws, density=d, seed=3, module="m", rank_rule=FULL).factors.delta(F64)
    dropped = [m * t / d for m, t in zip(_masks((30, 20), d, 3, 3, "m"), taus(fs, ws))]
    want = sum(dropped) if method == "dare_linear" else _ref._disjoint(torch.stack(dropped))
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_della_matches_the_formula():
    fs, ws, d, eps = make(), [0.7, -0.4, 1.1], 0.5, 0.2
    got = D.della(fs, ws, density=d, epsilon=eps, seed=1, module="m", rank_rule=FULL).factors.delta(F64)
    kept = []
    for i, t in enumerate(taus(fs, ws)):
        ranks = torch.empty_like(t)
        for r in range(t.shape[0]):  # rank of |τ| inside its row, 0 = smallest, ties by column
            ranks[r, t[r].abs().argsort(stable=True)] = torch.arange(t.shape[1], dtype=F64)
        p = d - eps + 2 * eps * ranks / (t.shape[1] - 1)
        u = torch.rand(t.shape, generator=K.tile_generator(1, i, "m", 0), dtype=F64)
        kept.append(torch.where(u < p, t / p, 0.0))
    torch.testing.assert_close(got, _ref._disjoint(torch.stack(kept)), rtol=1e-8, atol=1e-10)


def test_dare_is_unbiased_and_seeded():
    (f,) = make(ranks=(4,))
    runs = [D.dare_linear([f], [1.0], density=0.3, seed=s, rank_rule=FULL).factors.delta(F64) for s in range(400)]
    mean = torch.stack(runs).mean(0)
    assert float((mean - f.delta(F64)).norm() / f.delta(F64).norm()) < 0.15  # Monte-Carlo mean → τ
    again = D.dare_linear([f], [1.0], density=0.3, seed=7, rank_rule=FULL).factors
    assert torch.equal(again.A, D.dare_linear([f], [1.0], density=0.3, seed=7, rank_rule=FULL).factors.A)
    assert not torch.equal(runs[0], runs[1])


def test_ties_full_density_unanimous_entries_get_the_plain_mean_and_order_does_not_matter():
    g = torch.Generator().manual_seed(2)
    base = random_factors(12, 9, 3, generator=g, dtype=F64)
    fs = [base.scaled(1.0), base.scaled(3.0)]  # same signs everywhere
    got = D.ties(fs, [1.0, 1.0], density=1.0, rank_rule=rank_rule(rank=9)).factors.delta(F64)
    torch.testing.assert_close(got, 2.0 * base.delta(F64), rtol=1e-9, atol=1e-11)
    more = make(out=12, inn=9)
    a = D.ties(more, [1, 2, 3], density=0.4, rank_rule=rank_rule(rank=9)).factors.delta(F64)
    b = D.ties(more[::-1], [3, 2, 1], density=0.4, rank_rule=rank_rule(rank=9)).factors.delta(F64)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_kth_largest_is_exact_across_tiles(monkeypatch):
    monkeypatch.setattr(K, "TILE_ELEMENTS", 100)
    x = torch.randn(3, 50, 40, generator=torch.Generator().manual_seed(0), dtype=F64)
    rows = K.tile_rows(50, 40)
    tiles = lambda: ((r0, x[:, r0:r0 + rows]) for r0 in range(0, 50, rows))
    ks = torch.tensor([[1, 17, 1999], [0, 2000, 600], [5, 5, 3000]])
    got = K.kth_largest_abs(tiles, ks, x.abs().flatten(1).max(1).values * 2)
    for i in range(3):
        s = x[i].abs().flatten().sort(descending=True).values
        for j in range(3):
            k = int(ks[i, j])
            want = float("inf") if k <= 0 else (0.0 if k >= 2000 else float(s[k - 1]))
            assert float(got[i, j]) == want


def test_rank_rules_and_reported_error_are_exact():
    fs, ws = make(), [1.0, 1.0, 1.0]
    full = D.ties(fs, ws, density=0.3, rank_rule=FULL).factors.delta(F64)
    for rule in (rank_rule(rank=4), rank_rule(error=0.3), rank_rule(energy=0.8)):
        res = D.ties(fs, ws, density=0.3, rank_rule=rule)
        err = float((res.factors.delta(F64) - full).norm() / full.norm())
        assert res.error == pytest.approx(err, rel=1e-6)
        assert err >= float((_ref.svd_truncate(full, res.factors.rank) - full).norm() / full.norm()) - 1e-12
    assert D.ties(fs, ws, density=0.3, rank_rule=rank_rule(error=0.3)).error <= 0.3 + 1e-9


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_density_outside_the_unit_interval_is_refused(bad):
    with pytest.raises(OperatorParameterError, match="density"):
        D.ties(make(), [1, 1, 1], density=bad)


def _sorted_kth(x, k):
    s = x.abs().flatten().sort(descending=True).values
    return float("inf") if k <= 0 else (0.0 if k >= x.numel() else float(s[k - 1]))


@pytest.mark.parametrize("sample", ["drawn", "misleading-low", "misleading-high", "tiny"])
def test_bracketed_threshold_is_exact_with_ties_at_the_threshold(monkeypatch, sample):
    """Sampled bracket + counting pass: exact k-th largest, also where many entries equal the threshold and
    where the sample is wrong (the histogram fallback then answers)."""
    monkeypatch.setattr(K, "TILE_ELEMENTS", 120)
    g = torch.Generator().manual_seed(4)
    x = torch.randint(-6, 7, (2, 60, 40), generator=g).to(F64) * 0.25  # 13 distinct magnitudes: heavy ties
    rows = K.tile_rows(60, 40)
    tiles = lambda: ((r0, x[:, r0:r0 + rows].clone()) for r0 in range(0, 60, rows))
    ks = torch.tensor([[1, 300, 1199, 2400], [0, 1000, 2399, 7]])
    drawn = x.abs().flatten(1)[:, torch.randint(2400, (512,), generator=g)]
    s = {"drawn": drawn, "misleading-low": torch.zeros(2, 512, dtype=F64),
         "misleading-high": torch.full((2, 512), 1e9, dtype=F64), "tiny": drawn[:, :3]}[sample]
    got = K.kth_largest_abs_bracketed(tiles, ks, s, 2400)
    for i in range(2):
        for j in range(4):
            assert float(got[i, j]) == _sorted_kth(x[i], int(ks[i, j]))


def test_sign_ties_follow_the_majority_sign(tiling):
    """Entries where the trimmed tasks cancel exactly (Σ τ̂ = 0, some nonzero) take the module's majority sign."""
    g = torch.Generator().manual_seed(5)
    f = random_factors(30, 20, 3, generator=g, dtype=F64)
    h = random_factors(30, 20, 2, generator=g, dtype=F64)
    for wh in (1.0, -1.0, 0.3):
        fs, ws = [f, f.scaled(-1.0), h], [1.0, 1.0, wh]
        got = D.ties(fs, ws, density=0.3, rank_rule=FULL).factors.delta(F64)
        torch.testing.assert_close(got, _ref.ties(taus(fs, ws), 0.3), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method", ["ties", "magnitude_prune", "dare_ties", "della", "breadcrumbs"])
def test_float32_module_matches_float64_reference_and_batching_of_rows(method, tiling):
    """16-bit inputs compute in float32 (no float64 pass): the result matches the float64 method to float32
    accuracy (thresholds are exact in float32, so the same entries are kept)."""
    fs64 = make(out=40, inn=24)
    fs32 = [type(f)(f.A.float(), f.B.float(), f.scale) for f in fs64]
    kw = {"density": 0.4, "seed": 2, "rank_rule": rank_rule(rank=24)}
    if method in ("dare_ties", "della"):
        kw["module"] = "m"
    a = getattr(D, method)(fs32, [0.7, -0.4, 1.1], **kw).factors.delta(F64)
    b = getattr(D, method)(fs64, [0.7, -0.4, 1.1], **kw).factors.delta(F64)
    if method in ("ties", "magnitude_prune", "breadcrumbs", "dare_ties"):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    else:  # DELLA draws its uniforms in the compute dtype: a different stream, the same law
        assert a.shape == b.shape and torch.isfinite(a).all()


@pytest.mark.parametrize("zero", [False, True])
def test_task_thresholds_equal_kthvalue_on_the_dense_bf16_module(monkeypatch, zero):
    """The sampled-bracket threshold of 16-bit factors (float32 tiles) is the k-th largest |τ| of the dense
    float32 matrix, to the bit; an all-zero module gives 0 (every entry kept)."""
    monkeypatch.setattr(K, "TILE_ELEMENTS", 700)
    g = torch.Generator().manual_seed(9)
    fs = [random_factors(90, 40, 4, generator=g, dtype=torch.bfloat16) for _ in range(2)]
    if zero:
        fs = [f.with_(B=torch.zeros_like(f.B)) for f in fs]
    tiles = D.TaskTiles(fs, [1.0, -0.5])
    counts = [1, 7, D.keep_count(0.5, tiles.numel), tiles.numel - 1]
    got = tiles.thresholds(counts, seed=3)
    assert got.dtype == torch.float32
    formed = torch.cat([x.clone() for _, x in tiles()], dim=1)  # the tiles' own values (C or torch GEMM)
    for i, (B, A) in enumerate(zip(tiles.Bs, tiles.As)):
        torch.testing.assert_close(formed[i], B @ A, rtol=1e-5, atol=1e-6)
        dense = formed[i].abs().flatten()
        for j, k in enumerate(counts):
            assert float(got[i, j]) == float(torch.kthvalue(dense, dense.numel() - k + 1).values)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_entry_changes_update_the_probe_product_and_norm(dtype):
    """``_apply`` (the sign-tie fix-ups' update of ``Y = MΩ`` and ``‖M‖²``), with changes out of row order,
    split over several lists, and an empty one: the same as recomputing from the changed ``M``."""
    g = torch.Generator().manual_seed(7)
    M = torch.randn(50, 30, generator=g, dtype=dtype)
    omega = torch.randn(30, 6, generator=g, dtype=dtype)
    Y, norm2 = M @ omega, float((M.double() ** 2).sum())
    flat = torch.randperm(M.numel(), generator=g)[:200]
    r, c = flat // 30, flat % 30
    old = M[r, c].clone()
    new = torch.randn(200, generator=g, dtype=dtype)
    M[r, c] = new
    changes = [(r[:120], c[:120], old[:120], new[:120]), (r[:0], c[:0], old[:0], new[:0]),
               (r[120:], c[120:], old[120:], new[120:])]
    norm2 += D._apply(Y, omega, changes)
    tol = 1e-12 if dtype == F64 else 1e-4
    torch.testing.assert_close(Y, M @ omega, rtol=tol, atol=tol)
    assert abs(norm2 - float((M.double() ** 2).sum())) < tol * norm2


def test_cache_sized_tiles_only_with_one_torch_thread():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = K.tile_rows(4096, 4096, cached=True)
        torch.set_num_threads(2)
        two = K.tile_rows(4096, 4096, cached=True)
    finally:
        torch.set_num_threads(threads)
    assert one == K.CPU_TILE_ELEMENTS // 4096 < two == K.tile_rows(4096, 4096) == K.TILE_ELEMENTS // 4096


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della"])
@pytest.mark.parametrize("budget", [1 << 30, 2 * 64 * 48 * 4])
def test_modules_merged_concurrently_are_the_one_thread_results(method, budget, monkeypatch):
    """With two torch threads the delta merges run two modules at a time, each on one thread
    (:mod:`lorakit.threads`): every module equals a one-thread run to the bit, whatever the threads. Modules
    whose dense merges do not fit the budget two at a time go one at a time."""
    from lorakit import Adapter, LoraFactors
    from lorakit import threads as T
    from lorakit.pipeline import merge_adapters

    g = torch.Generator().manual_seed(5)
    shapes = {f"m{i}": s for i, s in enumerate([(64, 48), (16, 48), (200, 48), (64, 200), (16, 48)])}
    adapters = [Adapter({n: LoraFactors((torch.randn(4, i, generator=g) * 0.1).bfloat16(),
                                        (torch.randn(o, 4, generator=g) * 0.1).bfloat16(), 2.0)
                         for n, (o, i) in shapes.items()}) for _ in range(2)]
    used = []
    parallel_map = T.parallel_map
    monkeypatch.setattr("lorakit.pipeline.parallel_map", lambda fn, xs: used.append(len(xs)) or parallel_map(fn, xs))
    monkeypatch.setattr("lorakit.pipeline.CONCURRENT_DENSE_BYTES", budget)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = merge_adapters(adapters, [1.0, 0.8], method, density=0.5, rank=4)
        torch.set_num_threads(2)
        two, _ = merge_adapters(adapters, [1.0, 0.8], method, density=0.5, rank=4)
    finally:
        torch.set_num_threads(threads)
    # one window of every module, at two threads only; under the small budget, the (200, 48) and (64, 200)
    # modules are the ones merged alone
    assert used == [len(shapes) if budget > 1 << 20 else 3]
    for n in shapes:
        assert torch.equal(one[n].A, two[n].A) and torch.equal(one[n].B, two[n].B), n
