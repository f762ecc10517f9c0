import torch

import lorakit
from lorakit import Adapter, LoraFactors
from lorakit.testing import assert_adapters_close, random_adapter


def test_algebra_is_exact():
    a = random_adapter({"m": (12, 10)}, rank=3, seed=1)
    b = random_adapter({"m": (12, 10)}, rank=5, seed=2)
    c = 0.5 * a + b - 2 * a
    ref = -1.5 * a["m"].delta(torch.float64) + b["m"].delta(torch.float64)
    torch.testing.assert_close(c["m"].delta(torch.float64), ref, rtol=1e-5, atol=1e-6)
    assert c.info("m").rank == 3 + 5 + 3


def test_factored_norm_matches_dense():
    f = LoraFactors(torch.randn(4, 9, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64), -0.3)
    assert abs(f.norm() - float(torch.linalg.norm(f.delta(torch.float64)))) < 1e-9


def test_save_load_roundtrip(tmp_path):
    a = random_adapter({"model.layers.0.q": (8, 6)}, rank=2, scale=0.25)
    for fmt in ("peft", "kohya"):
        out = tmp_path / f"x-{fmt}.safetensors"
        lorakit.save(a, out, format=fmt)
        assert_adapters_close(lorakit.load(out), a)
    assert isinstance(a, Adapter)


def test_membership_does_not_read_a_lazy_module():
    from lorakit.adapter import ModuleInfo

    reads = []
    f = LoraFactors(torch.randn(2, 6), torch.randn(5, 2), 1.0)
    lazy = Adapter({"m": lambda: reads.append("m") or f}, infos={"m": ModuleInfo.of("m", f)})
    assert "m" in lazy and "x" not in lazy and 3 not in lazy
    assert reads == []  # Mapping's default __contains__ would have loaded the tensors
    assert lazy["m"] is f and reads == ["m"]


def test_all_finite_is_exact_on_nan_inf_and_overflowing_sums():
    from lorakit.factors import all_finite

    big = torch.full((4,), 3e38)  # every value finite; the float32 sum overflows
    assert all_finite(big) and all_finite(big.double()) and all_finite(torch.zeros(0))
    assert all_finite(torch.arange(5))  # integers cannot hold NaN
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for bad in (float("nan"), float("inf"), -float("inf")):
            t = torch.randn(7, 3).to(dtype)
            t[5, 1] = bad
            assert not all_finite(t), (dtype, bad)
        assert all_finite(torch.randn(7, 3).to(dtype))
    mixed = torch.tensor([float("inf"), -float("inf")])  # sums to NaN, never to a finite number
    assert not all_finite(mixed)


def test_cat_built_in_the_stored_16_bit_dtype_has_the_bits_of_the_float32_route():
    """``cat_factors(..., stored_dtype=d)`` with every input in ``d`` skips the float32 round trip; stored in ``d``,
    the result is bit for bit the float32 result (weights and scales that round, overflow and underflow)."""
    from lorakit.algebra import cat_factors

    g = torch.Generator().manual_seed(0)
    for dt in (torch.bfloat16, torch.float16):
        fs = [LoraFactors((torch.randn(r, 33, generator=g) * 10.0 ** torch.randint(-6, 4, (r, 33), generator=g)).to(dt),
                          (torch.randn(29, r, generator=g) * 10.0 ** torch.randint(-6, 4, (29, r), generator=g)).to(dt),
                          scale) for r, scale in [(3, 2.0), (5, 1 / 3), (2, 7777.7)]]
        for weights in ([1.0, 1.0, 1.0], [0.3, -1.7, 1e-5], [123.4, 0.0, 2.5]):
            want = cat_factors(fs, weights)
            got = cat_factors(fs, weights, stored_dtype=dt)
            assert want.dtype == torch.float32 and got.dtype == dt and got.scale == want.scale == 1.0
            assert torch.equal(got.A, want.A.to(dt)) and torch.equal(got.B, want.B.to(dt))
        # an input of another dtype, or a wider stored dtype: built in float32 as before
        mixed = [fs[0], fs[1].with_(A=fs[1].A.float(), B=fs[1].B.float())]
        assert cat_factors(mixed, [1.0, 1.0], stored_dtype=dt).dtype == torch.float32
        assert cat_factors(fs, [1.0] * 3, stored_dtype=torch.float32).dtype == torch.float32
