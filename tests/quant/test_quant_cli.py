"""The quantize, dequantize and lq-decompose verbs through the real entry point, bad input included: one-line
error, exit 1, nothing written, input untouched."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit.io.writer import write_safetensors
from lorakit.testing import random_adapter


@pytest.fixture
def peft_file(tmp_path):
    a = random_adapter(
        {"model.layers.0.q_proj": (128, 64), "model.layers.0.v_proj": (64, 64)}, rank=4, decay=0.8, scale=2.0
    )
    path = tmp_path / "a.safetensors"
    lorakit.save(a, path, format="peft")
    return path


def assert_clean_failure(code, err, tmp_path, before, match):
    assert code == 1
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and match in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_quantize_then_every_verb_reads_it(cli, peft_file, tmp_path):
    out = tmp_path / "q.safetensors"
    code, stdout, _ = cli("quantize", peft_file, "--bits", "4", "-o", out, "--json")
    assert code == 0
    rep = json.loads(stdout)
    assert 4 < rep["bits_per_param"] < 4.5 and 0 < rep["rel_error"] < 0.2  # small rows: 4.5 = fp32 constants
    assert len(rep["modules"]) == 2
    code, stdout, _ = cli("inspect", out, "--json")
    assert code == 0 and json.loads(stdout)
    code, _, _ = cli("convert", out, "--to", "kohya", "-o", tmp_path / "k.safetensors")
    assert code == 0
    code, _, _ = cli("dequantize", out, "-o", tmp_path / "d.safetensors")
    assert code == 0
    d = lorakit.load(tmp_path / "d.safetensors")
    assert d.meta.source_format == "peft"
    a = lorakit.load(peft_file)
    for n in a:
        rel = (a[n].delta(torch.float64) - d[n].delta(torch.float64)).norm() / a[n].delta(
            torch.float64
        ).norm()
        assert float(rel) < 0.2


def test_mixed_and_dry_run(cli, peft_file, tmp_path):
    code, stdout, _ = cli(
        "quantize", peft_file, "--mixed", "--error", "0.05", "-o", tmp_path / "m.safetensors", "--json"
    )
    assert code == 0
    assert all(m["rel error"] <= 0.05 for m in json.loads(stdout)["modules"])
    code, _, _ = cli("quantize", peft_file, "--bits", "4", "-o", tmp_path / "dry.safetensors", "--dry-run")
    assert code == 0 and not (tmp_path / "dry.safetensors").exists()


@pytest.mark.parametrize(
    "args,match",
    [
        (["--bits", "5"], "5 bits is not supported"),
        (["--bits", "1"], "1 bits is not supported"),
        (["--block", "48"], "block size 48 does not divide the row length"),
        (["--mixed"], "exactly one of --error E or --avg-bits B"),
        (["--bits", "4", "--mixed"], "exclude each other"),
        (["--mixed", "--avg-bits", "0.5"], "below what this module can store"),
    ],
)
def test_bad_options(cli, peft_file, tmp_path, args, match):
    before = sorted(p.name for p in tmp_path.iterdir())
    data = peft_file.read_bytes()
    code, _, err = cli("quantize", peft_file, *args, "-o", tmp_path / "out.safetensors")
    assert_clean_failure(code, err, tmp_path, before, match)
    assert peft_file.read_bytes() == data


def test_quantizing_a_quantized_file_and_dequantizing_a_plain_one(cli, peft_file, tmp_path):
    q = tmp_path / "q.safetensors"
    assert cli("quantize", peft_file, "-o", q)[0] == 0
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = cli("quantize", q, "-o", tmp_path / "qq.safetensors")
    assert_clean_failure(code, err, tmp_path, before, "already quantized")
    code, _, err = cli("dequantize", peft_file, "-o", tmp_path / "d.safetensors")
    assert_clean_failure(code, err, tmp_path, before, "not quantized")


def test_corrupted_codes_through_the_cli(cli, peft_file, tmp_path):
    from safetensors.torch import load_file

    from lorakit.io.safetensors_file import SafetensorsFile

    q = tmp_path / "q.safetensors"
    assert cli("quantize", peft_file, "-o", q)[0] == 0
    tensors = load_file(str(q))
    key = "model.layers.0.q_proj.q0.B.codes"
    tensors[key] = tensors[key].clone()
    tensors[key][0] ^= 0xFF
    bad = tmp_path / "bad.safetensors"
    write_safetensors(bad, tensors, SafetensorsFile(q).metadata)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = cli("dequantize", bad, "-o", tmp_path / "d.safetensors")
    assert_clean_failure(code, err, tmp_path, before, "checksum")
    assert "module model.layers.0.q_proj" in err


def test_lq_decompose_cli(cli, tmp_path):
    g = torch.Generator().manual_seed(0)
    base = tmp_path / "base.safetensors"
    write_safetensors(
        base,
        {
            "model.layers.0.mlp.up_proj.weight": torch.randn(128, 64, generator=g),
            "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, generator=g),
            "model.norm.weight": torch.ones(64),
        },
    )
    out = tmp_path / "lq"
    code, stdout, err = cli(
        "lq-decompose", base, "-o", out, "--rank", "4", "--bits", "3", "--iters", "3", "--json"
    )
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["matrices"] == 2
    peft = lorakit.load(out / "adapter")
    assert set(peft) == {"model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj"}
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = cli("lq-decompose", base, "-o", tmp_path / "lq2", "--rank", "4", "--bits", "6")
    assert_clean_failure(code, err, tmp_path, before, "6 bits is not supported")
    code, _, err = cli("lq-decompose", base, "-o", tmp_path / "lq2", "--rank", "4", "--block", "48")
    assert_clean_failure(code, err, tmp_path, before, "does not divide the row length 64")
    code, _, err = cli("lq-decompose", out / "residual.safetensors", "-o", tmp_path / "lq2", "--rank", "4")
    assert_clean_failure(code, err, tmp_path, before, "already quantized")
