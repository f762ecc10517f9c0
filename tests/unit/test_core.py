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
