"""Quantizing adapters: canonical form, per-direction precision, factored error, the file format and its use by
every reader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lorakit
from lorakit.errors import CorruptFileError, FormatError, OperatorParameterError
from lorakit.quant.knapsack import choose_one_per_item
from lorakit.quant.mixed import allocate, candidate_configs, direction_table
from lorakit.quant.module import factored_error, runs, to_canonical
from lorakit.quant.quantize import quantize_module
from lorakit.testing import random_adapter, random_factors
from lorakit.verbs.quantize import quantize_adapter

SHAPES = {"layers.0.q_proj": (128, 64), "layers.0.v_proj": (64, 192), "layers.1.q_proj": (128, 64)}


@pytest.fixture
def adapter():
    return random_adapter(SHAPES, rank=8, scale=1.5, decay=0.75, seed=1)


def dense_rel_error(f, g):
    d, dh = f.delta(torch.float64), g.delta(torch.float64)
    return float((d - dh).norm() / d.norm())


def test_factored_error_equals_dense_error():
    g = torch.Generator().manual_seed(0)
    f = random_factors(96, 64, 6, scale=0.7, generator=g)
    h = random_factors(96, 64, 4, scale=-1.3, generator=g)
    dense = float((f.delta(torch.float64) - h.delta(torch.float64)).norm())
    assert factored_error(f, h) == pytest.approx(dense, rel=1e-9)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_reported_error_is_the_true_delta_error(adapter, bits):
    f = adapter["layers.0.v_proj"]
    q, rel = quantize_module("m", f, bits=bits)
    assert rel == pytest.approx(dense_rel_error(f, q.factors()), rel=1e-5)
    assert q.bits == [bits] * 8


def test_errors_fall_with_bits(adapter):
    f = adapter["layers.0.q_proj"]
    errs = [quantize_module("m", f, bits=b)[1] for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < 0.02


def test_eight_bits_reproduces_within_int8_precision(adapter):
    f = adapter["layers.0.q_proj"]
    q, rel = quantize_module("m", f, bits=8, double=False)
    canon = to_canonical(f)
    fh = q.factors()
    # Each element of the canonical factors within half an int8 step of its block's absmax.
    for got, ref in ((fh.B.T, canon.B.T), (fh.A, canon.A)):
        a = ref.reshape(-1, 64).abs().amax(1, keepdim=True)
        err = (got - ref).reshape(-1, 64).abs()
        assert bool((err <= a / 127 / 2 * (1 + 1e-5) + 1e-7).all())
    assert rel < 1e-2


def test_canonical_split_reproduces_the_module(adapter):
    f = adapter["layers.0.v_proj"]
    canon = to_canonical(f)
    torch.testing.assert_close(canon.delta(torch.float64), f.delta(torch.float64), atol=1e-5, rtol=1e-5)
    assert runs([8, 8, 4, 4, 4, 0, 2]) == [(0, 2, 8), (2, 3, 4), (6, 1, 2)]


def test_knapsack_matches_brute_force():
    rng = np.random.default_rng(0)
    values = rng.random((4, 3))
    weights = rng.integers(1, 6, (4, 3)).astype(float)
    cap = 10.0
    best = min(
        (sum(values[i, c[i]] for i in range(4)), c)
        for c in np.ndindex(3, 3, 3, 3)
        if sum(weights[i, c[i]] for i in range(4)) <= cap
    )
    choice = choose_one_per_item(values, weights, cap)
    assert sum(weights[i, choice[i]] for i in range(4)) <= cap
    assert sum(values[i, choice[i]] for i in range(4)) == pytest.approx(best[0])
    with pytest.raises(OperatorParameterError, match="cannot be met"):
        choose_one_per_item(values, weights, 1.0)


def test_mixed_precision_meets_the_average_bit_budget_and_favours_top_directions(adapter):
    f = adapter["layers.0.v_proj"]
    for avg in (2.5, 3.0, 5.0):
        q, _ = quantize_module("m", f, bits=None, avg_bits=avg)
        assert q.storage_bits <= avg * q.num_params
        assert q.bits == sorted(q.bits, reverse=True)
        assert q.bits[0] >= 2
    # More budget, less error.
    errs = [quantize_module("m", f, bits=None, avg_bits=b)[1] for b in (2.5, 4.5, 8.2)]
    assert errs == sorted(errs, reverse=True)


@pytest.mark.parametrize("target", [0.02, 0.08, 0.3])
def test_mixed_precision_meets_the_error_target(adapter, target):
    f = adapter["layers.0.q_proj"]
    q, rel = quantize_module("m", f, bits=None, error=target)
    assert rel <= target
    assert rel == pytest.approx(dense_rel_error(f, q.factors()), rel=1e-5)


def test_direction_table_errors_are_exact_per_direction(adapter):
    f = adapter["layers.0.q_proj"]
    canon = to_canonical(f)
    configs = candidate_configs(64, True)
    options, errors, costs = direction_table(canon, configs)
    assert options == [0, 2, 3, 4, 8]
    s = torch.linalg.svdvals(f.delta(torch.float64))[:8]
    np.testing.assert_allclose(errors[:, 0], (s**2).numpy(), rtol=1e-4)
    chosen = allocate(options, errors, costs, 192, avg_bits=3.0)
    assert len(chosen) == 8


def test_file_round_trip_and_transparent_loading(adapter, tmp_path):
    src = tmp_path / "a.safetensors"
    lorakit.save(adapter, src, format="peft")
    out = tmp_path / "q.safetensors"
    report = quantize_adapter(lorakit.load(src), out, bits=4, inputs=(src,))
    q = lorakit.load(out)
    assert q.meta.source_format == "quantized"
    assert set(q) == set(adapter)
    # What was measured is what the file gives back.
    rows = {r[0]: r for r in report.rows}
    for n in adapter:
        assert rows[n][6] == pytest.approx(dense_rel_error(adapter[n], q[n]), rel=1e-5)
    # Exact algebra works on quantized inputs like on any other.
    both = q + (-1.0 * q)
    assert both["layers.0.q_proj"].norm() < 1e-5 * q["layers.0.q_proj"].norm()
    assert report.summary["file_bytes"] == out.stat().st_size
    assert report.summary["file_bytes"] < 0.4 * src.stat().st_size


@pytest.mark.parametrize("to", ["peft", "kohya"])
def test_dequantize_writes_an_ordinary_adapter(adapter, tmp_path, to):
    from lorakit.verbs.quantize import dequantize_file

    out = tmp_path / "q.safetensors"
    quantize_adapter(adapter, out, bits=8)
    dq = tmp_path / ("d" if to == "peft" else "d.safetensors")
    dequantize_file(out, dq, to_format=to)
    back = lorakit.load(dq)
    assert back.meta.source_format == to
    keymap = {n: n for n in adapter}
    if to == "kohya":
        keymap = dict(zip(sorted(adapter), sorted(back)))
    q = lorakit.load(out)
    for n in adapter:
        assert dense_rel_error(adapter[n], back[keymap[n]]) < 1e-2
        # The written factors are exactly the dequantized ones (same ΔW up to float rounding).
        torch.testing.assert_close(
            back[keymap[n]].delta(torch.float64), q[n].delta(torch.float64), rtol=1e-5, atol=1e-6
        )


def test_quantizing_a_quantized_adapter_is_refused(adapter, tmp_path):
    out = tmp_path / "q.safetensors"
    quantize_adapter(adapter, out, bits=4)
    with pytest.raises(FormatError, match="already quantized"):
        quantize_adapter(lorakit.load(out), tmp_path / "qq.safetensors", bits=4)


def _rewrite(path, tensors, metadata):
    from lorakit.io.writer import write_safetensors

    write_safetensors(path, tensors, metadata)


def test_corrupted_codes_are_detected(adapter, tmp_path):
    from safetensors.torch import load_file

    from lorakit.io.safetensors_file import SafetensorsFile

    out = tmp_path / "q.safetensors"
    quantize_adapter(adapter, out, bits=4)
    meta = SafetensorsFile(out).metadata
    tensors = load_file(str(out))
    key = "layers.0.v_proj.q0.A.codes"
    flipped = tensors[key].clone()
    flipped[5] ^= 0x11
    tensors[key] = flipped
    bad = tmp_path / "bad.safetensors"
    _rewrite(bad, tensors, meta)
    q = lorakit.load(bad)
    q["layers.0.q_proj"]  # an intact module still reads
    with pytest.raises(CorruptFileError, match="checksum") as e:
        q["layers.0.v_proj"]
    assert e.value.module == "layers.0.v_proj" and str(bad) in str(e.value)
    # A truncated codes tensor fails on its size.
    tensors[key] = flipped[:-3]
    _rewrite(bad, tensors, meta)
    with pytest.raises(CorruptFileError, match="codes holds"):
        lorakit.load(bad)["layers.0.v_proj"]


def test_schema_version_is_checked(adapter, tmp_path):
    from safetensors.torch import load_file

    from lorakit.io.safetensors_file import SafetensorsFile

    out = tmp_path / "q.safetensors"
    quantize_adapter(adapter, out, bits=4)
    meta = dict(SafetensorsFile(out).metadata)
    schema = json.loads(meta["lorakit.quantized"])
    assert schema["schema"] == "lorakit.quantized" and schema["version"] == 1
    schema["version"] = 99
    meta["lorakit.quantized"] = json.dumps(schema)
    bad = tmp_path / "v99.safetensors"
    _rewrite(bad, load_file(str(out)), meta)
    with pytest.raises(FormatError, match="version 99"):
        lorakit.load(bad)
    # A schema naming something that is not a dtype is corrupt, not a torch attribute to call.
    schema["version"] = 1
    schema["modules"]["layers.0.q_proj"]["dtype"] = "save"
    meta["lorakit.quantized"] = json.dumps(schema)
    _rewrite(bad, load_file(str(out)), meta)
    with pytest.raises(CorruptFileError, match="unknown dtype 'save'"):
        lorakit.load(bad)


def test_block_not_dividing_a_row_is_refused_before_writing(tmp_path):
    a = random_adapter({"m": (100, 64)}, rank=4)
    out = tmp_path / "q.safetensors"
    with pytest.raises(OperatorParameterError, match="does not divide the row length 100"):
        quantize_adapter(a, out, bits=4)
    assert not out.exists()
    quantize_adapter(a, out, bits=4, pad=True)
    assert dense_rel_error(a["m"], lorakit.load(out)["m"]) < 0.2


@given(st.integers(-5, 5), st.sampled_from([2, 3, 4, 8]), st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_quantization_commutes_with_positive_scaling(k, bits, seed):
    """Q(c·ΔW) = c·Q(ΔW) for c > 0: each factor's block constants scale by √c and the codes do not change.
    c = 4^k keeps every floating-point step exact, so the codes must be identical."""
    c = 4.0**k
    f = random_factors(64, 128, 4, scale=1.0, decay=0.7, generator=torch.Generator().manual_seed(seed))
    q1, rel1 = quantize_module("m", f, bits=bits)
    q2, rel2 = quantize_module("m", f.scaled(c), bits=bits)
    assert rel2 == pytest.approx(rel1, rel=1e-6, abs=1e-9)
    for s1, s2 in zip(q1.segments, q2.segments, strict=True):
        assert torch.equal(s1.B.codes, s2.B.codes) and torch.equal(s1.A.codes, s2.A.codes)
    torch.testing.assert_close(
        q2.factors().delta(torch.float64), c * q1.factors().delta(torch.float64), rtol=1e-6, atol=0
    )
