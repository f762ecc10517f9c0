"""The fused C loops (``lorakit.ops._native``) against the torch kernels they replace: the same values, ties,
signs and counts, for every prune mode and task count; and the whole delta merges with and without them."""

from __future__ import annotations

import platform

import pytest
import torch

from lorakit.factors import LoraFactors
from lorakit.ops import _kernels as K
from lorakit.ops import _native
from lorakit.ops import merge_delta as D
from lorakit.ops.rank_rules import RankRule

pytestmark = pytest.mark.skipif(_native.library() is None, reason="no C compiler to build lorakit's fused loops")


def _stack(n: int, seed: int, rows: int = 37, cols: int = 29) -> torch.Tensor:
    """Task tiles with many exact ties: small half-integers and zeros of both signs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (n, rows, cols), generator=g).float() * 0.5
    x[x == 0] = torch.where(torch.rand(int((x == 0).sum()), generator=g) < 0.5, -0.0, 0.0)
    return x


def _torch_prune(x: torch.Tensor, mode: str, lo, hi, mask) -> torch.Tensor:
    x = x.clone()
    if mode == "trim":
        K.trim_(x, lo)
    elif mode == "band":
        K.band(x, lo, hi)
    elif mode == "mask":
        x.mul_(mask)
    return x


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("mode", ["none", "trim", "band", "mask"])
@pytest.mark.parametrize("signed", [True, False])
def test_fused_merge_equals_the_torch_kernels(loops, n, mode, signed):
    x = _stack(n, seed=n)
    lo = torch.full((n,), 1.0) if mode != "band" else torch.full((n,), 0.5)
    hi = torch.full((n,), 1.5)
    mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(7)) < 0.6).float()
    want_signer, got_signer = K.SignedMerge(), K.SignedMerge()
    pruned = _torch_prune(x, mode, lo, hi, mask)
    if signed:
        want = want_signer.tile(0, pruned)
    else:
        want = K.chain_sum(pruned, torch.empty(x.shape[1:]))
    got = torch.empty(x.shape[1:])
    kw = {"mode": mode, "lo": lo, "hi": hi, "mask": mask if mode == "mask" else None}
    if signed:
        got_signer.native_tile(0, x, got, **kw)
    else:
        _native.merge(x, got, signed=False, **kw)
    assert torch.equal(got, want)  # ±0 compare equal; every nonzero value to the bit
    assert got_signer.sign_sum == want_signer.sign_sum
    assert len(got_signer.ties) == len(want_signer.ties)
    for a, b in zip(got_signer.ties, want_signer.ties):
        assert all(torch.equal(u, v) for u, v in zip(a[1:], b[1:]))
    if signed and n > 1 and mode in ("none", "mask"):
        assert got_signer.ties and got_signer.ties[0][1].numel() > 0  # the half-integers make sign ties


@pytest.fixture(params=["native", "scalar"])
def loops(request, monkeypatch, tmp_path):
    """The library as built for this CPU, and (on x86-64) one built without AVX-512: the scalar loops that
    CPUs without it run, which an AVX-512 machine would otherwise never test."""
    if request.param == "scalar":
        if platform.machine() not in ("x86_64", "AMD64"):
            pytest.skip("the scalar build is the native one off x86-64")
        monkeypatch.setattr(_native, "FLAGS", [*_native.FLAGS, "-mno-avx512f"])
        monkeypatch.setattr(_native, "_state", {})
        monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
        assert _native.library() is not None
    return request.param


@pytest.mark.parametrize("length", [1, 15, 16, 17, 10_003])
def test_fused_bracket_counts_and_collects_in_order(loops, length):
    # lengths around the 16-wide vector loop and its scalar tail; the bounds themselves, ±0, ±inf and NaN
    a = torch.randn(length, generator=torch.Generator().manual_seed(length))
    special = torch.tensor([0.5, -0.5, 1.25, -1.25, 0.0, -0.0, float("inf"), float("-inf"), float("nan")])
    a[torch.randperm(length, generator=torch.Generator().manual_seed(0))[:min(length, 9)]] = special[:min(length, 9)]
    out = torch.empty(length)
    m = a.abs()
    for lo, hi in [(0.5, 1.25), (0.5, float("inf")), (0.0, 0.5)]:
        n_lo, k = _native.bracket(a, lo, hi, out)
        assert n_lo == int((m >= lo).sum())
        assert torch.equal(out[:k], m[(m >= lo) & (m < hi)])


@pytest.mark.parametrize("cols", [1, 2, 3, 29, 2049, 4100])
def test_della_loop_equals_the_torch_path_ties_included(loops, monkeypatch, cols):
    """Ranks by the C radix sort against torch's stable integer argsort: magnitudes over every radix digit
    (tiny to huge), exact ties and zeros of both signs, so equal magnitudes must rank by column in both."""
    g = torch.Generator().manual_seed(cols)
    x = _stack(3, seed=cols, rows=5, cols=cols) * 2.0 ** torch.randint(-60, 60, (3, 5, cols), generator=g).float()
    x[:, :, ::3] = x[:, :, :1].clone()  # many equal magnitudes in every row
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(100))
    got = K.della_(x.clone(), 0.5, 0.2, u)
    monkeypatch.setitem(_native._state, "lib", None)
    want = K.della_(x.clone(), 0.5, 0.2, u)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # to the bit, signs of zeros included
    assert 0 < int((got != 0).sum()) < int((x != 0).sum())


DELTA_METHODS = ["ties", "magnitude_prune", "dare_ties", "dare_linear", "breadcrumbs", "della"]


def _delta_inputs() -> list[LoraFactors]:
    g = torch.Generator().manual_seed(3)
    return [LoraFactors(B=torch.randn(300, 6, generator=g).bfloat16(), A=torch.randn(6, 200, generator=g).bfloat16(),
                        scale=0.5) for _ in range(3)]


def _delta_merge(method: str) -> D.MergeResult:
    kw = {"density": 0.4} if method != "breadcrumbs" else {}
    return getattr(D, method)(_delta_inputs(), [1.0, 0.7, 1.3], rank_rule=RankRule("rank", 6), **kw)


@pytest.mark.parametrize("method", DELTA_METHODS)
def test_delta_merges_give_the_same_factors_with_and_without_the_fused_loops(monkeypatch, method):
    """The prune-and-merge loops: the same dense M to the bit, so the same factors (both runs take torch's
    products, which the next test compares with the C ones)."""
    monkeypatch.setattr(_native, "products_usable", lambda M: False)
    fused = _delta_merge(method)
    monkeypatch.setitem(_native._state, "lib", None)
    plain = _delta_merge(method)
    assert torch.equal(fused.factors.B, plain.factors.B) and torch.equal(fused.factors.A, plain.factors.A)
    assert fused.error == plain.error


@pytest.mark.skipif(not _native.products_usable(torch.zeros(1, 1)), reason="lorakit's C products need AVX-512")
@pytest.mark.parametrize("method", DELTA_METHODS)
def test_delta_merges_with_the_c_products_equal_torchs_to_float32_rounding(monkeypatch, method):
    fast = _delta_merge(method)
    monkeypatch.setattr(_native, "products_usable", lambda M: False)
    plain = _delta_merge(method)
    dW = lambda r: (r.factors.B.double() @ r.factors.A.double()) * r.factors.scale
    torch.testing.assert_close(dW(fast), dW(plain), rtol=1e-4, atol=1e-5 * float(dW(plain).abs().max()))
    assert fast.error == pytest.approx(plain.error, rel=1e-5, abs=1e-7)


@pytest.mark.skipif(not _native.products_usable(torch.zeros(1, 1)), reason="lorakit's C products need AVX-512")
@pytest.mark.parametrize("rows,cols,k", [(1, 1, 1), (7, 33, 1), (13, 17, 16), (9, 5, 17), (333, 77, 26),
                                         (1030, 513, 32), (50, 40, 33), (70, 1100, 70)])
def test_skinny_products_against_float64(rows, cols, k):
    """``M @ Z`` and ``Mᵀ @ Q`` by the AVX-512 kernels: every remainder (rows not a multiple of the 8-row
    blocks, columns of the 4-column unroll and 16-lane masks, ``k`` of one, two and three 32-column
    blocks, sums over more than one 512-term chunk) within float32 rounding of the float64 product."""
    g = torch.Generator().manual_seed(rows * 1000 + cols + k)
    M, Z, Q = (torch.randn(*s, generator=g) for s in [(rows, cols), (cols, k), (rows, k)])
    for got, want, n in [(_native.mm(M, Z), M.double() @ Z.double(), cols),
                         (_native.mtm(M, Q), M.double().T @ Q.double(), rows)]:
        assert got.shape == want.shape and got.dtype == torch.float32
        assert float((got.double() - want).abs().max()) <= 8 * n ** 0.5 * 2.0 ** -24 * max(1.0, float(want.abs().max()))
    Y = torch.full((rows, k), float("nan"))
    _native.mm(M, _native.padded(Z), out=Y)  # Z already padded, written in place
    torch.testing.assert_close(Y, _native.mm(M, Z), rtol=0, atol=0)


@pytest.mark.skipif(not _native.products_usable(torch.zeros(1, 1)), reason="lorakit's C products need AVX-512")
def test_skinny_products_split_over_threads_give_the_one_thread_bits(monkeypatch):
    monkeypatch.setattr(_native, "PARALLEL_MIN", 1)
    g = torch.Generator().manual_seed(0)
    M, Z, Q = torch.randn(301, 203, generator=g), torch.randn(203, 26, generator=g), torch.randn(301, 26, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _native.mm(M, Z), _native.mtm(M, Q)
        torch.set_num_threads(3)
        three = _native.mm(M, Z), _native.mtm(M, Q)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, three))


@pytest.mark.parametrize("n", [1, 2, 4])
def test_torch_election_is_the_papers_disjoint_mean(n):
    """The torch tile kernel (the path without the C loop, and the one on CUDA) against the formula, tie-free."""
    x = torch.randn(n, 41, 23, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    x[x.abs() < 0.3] = 0.0
    want = K.disjoint_mean(x, K.elect_sign(x))
    torch.testing.assert_close(K.SignedMerge().tile(0, x), want, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("seed", [0, 1, 5489, 2 ** 31 + 7, 2 ** 32 - 1, 123456789])
@pytest.mark.parametrize("n", [1, 623, 624, 625, 5000, 1 << 16])
def test_the_c_generator_is_torchs_rand_stream(seed, n):
    """DARE's and DELLA's documented stream, ``torch.rand(n, generator=manual_seed(seed))`` in float32, drawn
    by the C MT19937: the same values (state regenerations at 624 words, partial blocks), and DARE's mask is
    ``rand < density`` as 0/1 floats."""
    assert _native.stream_usable(torch.empty(1))
    want = torch.rand(n, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(_native.uniform_(torch.empty(n), seed), want)
    assert torch.equal(_native.uniform_(torch.empty(n), seed, keep=0.3), torch.lt(want, 0.3).float())
    assert torch.equal(K.tile_uniform_(torch.empty(n, dtype=torch.float64), seed),
                       torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))


def test_a_c_generator_that_does_not_reproduce_torch_is_not_used(monkeypatch):
    monkeypatch.setitem(_native._stream, "ok", False)
    assert not _native.stream_usable(torch.empty(3))
    want = torch.rand(700, generator=torch.Generator().manual_seed(9))
    assert torch.equal(K.tile_uniform_(torch.empty(700), 9), want)  # torch's own draw


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 70_001])
def test_radix_selection_is_kthvalue(n):
    """The k-th largest by the C radix selection against ``torch.kthvalue``: magnitudes over many binades, exact
    ties, zeros and negative values, every k at the ends and inside."""
    g = torch.Generator().manual_seed(n)
    v = torch.randn(n, generator=g) * 2.0 ** torch.randint(-40, 40, (n,), generator=g).float()
    v[::5] = v[0].item()
    if n > 2:
        v[1], v[2] = 0.0, -3.0
    for k in sorted(k for k in {1, 2, n // 3, n // 2, n - 1, n} if 1 <= k <= n):
        assert _native.kth_largest(v, k) == float(torch.kthvalue(v, n - k + 1).values)
        assert K.kth_largest(v, k) == float(torch.kthvalue(v, n - k + 1).values)
