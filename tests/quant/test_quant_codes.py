"""Code values, bit packing, block-wise quantization bounds and double quantization, against float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.errors import CorruptFileError, OperatorParameterError
from lorakit.quant.blockwise import (
    QuantConfig,
    dequantize_tensor,
    error_bound,
    pack,
    quantize_tensor,
    storage_bits_formula,
    unpack,
)
from lorakit.quant.codebooks import codebook, int_code, max_gap, nearest, nf_code
from lorakit.quant.double import dequantize_constants, quantize_constants

# bitsandbytes' hard-coded NF4 table (functional.py), as quoted in algorithms.md §3.1.
NF4_BNB = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def test_nf4_matches_bitsandbytes_table():
    code = nf_code(4)
    assert code.shape == (16,)
    torch.testing.assert_close(code.double(), torch.tensor(NF4_BNB, dtype=torch.float64), atol=1e-6, rtol=0)
    assert code[7].item() == 0.0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_nf_codes_are_sorted_with_exact_zero_and_unit_extremes(bits):
    code = nf_code(bits)
    assert code.numel() == 2**bits
    assert bool((code[1:] > code[:-1]).all())
    assert code[0].item() == -1.0 and code[-1].item() == 1.0
    assert code[2 ** (bits - 1) - 1].item() == 0.0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("name", ["nf", "int"])
def test_every_code_value_round_trips_and_zero_maps_to_zero(bits, name):
    code = codebook(name, bits)
    idx = nearest(code, code)
    assert torch.equal(idx, torch.arange(code.numel()))
    assert code[nearest(torch.zeros(3), code)].eq(0).all()


def test_int8_code_is_k_over_127():
    code = int_code(8)
    assert code.numel() == 255
    torch.testing.assert_close(
        code.double() * 127, torch.arange(-127, 128, dtype=torch.float64), atol=1e-5, rtol=0
    )


def test_unsupported_bits_are_refused():
    for bits in (0, 1, 5, 16):
        with pytest.raises(OperatorParameterError, match="not supported"):
            QuantConfig(bits)


def test_double_quantization_bit_count_is_4_127_at_the_qlora_configuration():
    cfg = QuantConfig(4, "nf", 64, double=True)
    assert cfg.bits_per_parameter == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))
    assert round(cfg.bits_per_parameter, 3) == 4.127
    assert QuantConfig(4, "nf", 64, double=False).bits_per_parameter == 4.5
    # The stored tensors add up to the formula exactly (rows divisible by 64, blocks by 256).
    x = torch.randn(256, 4096)  # 16384 blocks of 64, 64 groups of 256
    q = quantize_tensor(x, cfg)
    assert q.storage_bits == storage_bits_formula(x.numel(), cfg)


@given(st.integers(min_value=1, max_value=300), st.sampled_from([2, 3, 4, 8]), st.integers(0, 2**31 - 1))
@settings(max_examples=60, deadline=None)
def test_pack_unpack_are_inverse(n, bits, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 2**bits, (n,), generator=g)
    packed = pack(idx, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack(packed, bits, n), idx)


def test_four_bit_packing_puts_the_first_element_in_the_high_nibble():
    assert pack(torch.tensor([0x3, 0xA]), 4).tolist() == [0x3A]
    assert pack(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b01101100]
    # 3 bits: 101 011 1(00 padding) → 10101110 → 0xAE
    assert pack(torch.tensor([5, 3, 4]), 3).tolist() == [0b10101110, 0b00000000]


@pytest.mark.parametrize("bits,name", [(2, "nf"), (3, "nf"), (4, "nf"), (8, "nf"), (4, "int"), (8, "int")])
@pytest.mark.parametrize("double", [False, True])
def test_every_element_is_within_the_block_bound(bits, name, double):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(12, 256, generator=g) * torch.logspace(-3, 1, 12).unsqueeze(1)
    x[3, :64] = 0  # an all-zero block
    q = quantize_tensor(x, QuantConfig(bits, name, 64, double))
    xh = dequantize_tensor(q)
    assert xh.shape == x.shape
    err = (x.double() - xh.double()).abs()
    assert bool((err <= error_bound(q, x).double() + 1e-6 * x.abs().max()).all())
    assert bool(xh[3, :64].eq(0).all())
    if not double:
        # Without double quantization the bound is absmax·gap/2 per block, computed here independently.
        a = x.reshape(-1, 64).abs().amax(1, keepdim=True).double()
        bound = (a * max_gap(codebook(name, bits)) / 2).expand(-1, 64).reshape(x.shape)
        assert bool((err <= bound + 1e-7).all())


def test_nearest_code_is_chosen():
    code = nf_code(4)
    x = torch.rand(1000, dtype=torch.float64) * 2 - 1
    idx = nearest(x.float(), code)
    brute = (x[:, None] - code.double()[None, :]).abs().argmin(1)
    d_pick = (x - code.double()[idx]).abs()
    d_best = (x - code.double()[brute]).abs()
    assert bool((d_pick <= d_best + 1e-7).all())


def test_double_quantized_constants_are_within_half_a_step():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(1000, generator=g) * 3
    codes, scale2, offset = quantize_constants(a)
    assert codes.dtype == torch.uint8 and scale2.numel() == 4 and codes.numel() == 1000
    ah = dequantize_constants(codes, scale2, offset)
    step = scale2[torch.arange(1000) // 256] / 127
    assert bool(((a - ah).abs() <= step / 2 + 1e-6).all())
    assert offset.item() == pytest.approx(float(a.mean()), rel=1e-6)


def test_block_not_dividing_the_row_is_refused_unless_padding():
    x = torch.randn(4, 100)
    with pytest.raises(OperatorParameterError, match="does not divide the row length 100"):
        quantize_tensor(x, QuantConfig(4))
    q = quantize_tensor(x, QuantConfig(4), pad=True)
    xh = dequantize_tensor(q)
    assert xh.shape == (4, 100)
    assert bool(((x - xh).abs() <= error_bound(q, x) + 1e-6).all())


def test_eight_bit_int_reproduces_to_int8_precision():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 128, generator=g, dtype=torch.float64)
    q = quantize_tensor(x, QuantConfig(8, "int", 64, double=False))
    a = x.reshape(-1, 64).abs().amax(1, keepdim=True)
    ref = (torch.round(x.reshape(-1, 64) / a * 127) / 127 * a).reshape(x.shape)  # float64 int8 reference
    torch.testing.assert_close(dequantize_tensor(q).double(), ref, atol=1e-6, rtol=0)


def test_wrong_sized_codes_are_reported_as_corrupt():
    q = quantize_tensor(torch.randn(2, 64), QuantConfig(4))
    from dataclasses import replace

    bad = replace(q, codes=q.codes[:-1])
    with pytest.raises(CorruptFileError, match="codes holds"):
        dequantize_tensor(bad)
