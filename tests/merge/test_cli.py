"""``lorakit merge`` and ``lorakit similarity`` through the real entry point, good and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.adapter import Adapter
from lorakit.factors import LoraFactors
from lorakit.testing import random_adapter

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
STYLE, DETAIL = EXAMPLES / "style.safetensors", EXAMPLES / "detail.safetensors"
F64 = torch.float64
SHAPES = {"model.layers.0.self_attn.q_proj": (32, 24), "model.layers.0.mlp.down_proj": (24, 40)}


def write(tmp_path, name, adapter):
    path = tmp_path / name
    lorakit.save(adapter, path, format="peft")
    return path


def pair(tmp_path):
    a = write(tmp_path, "a.safetensors", random_adapter(SHAPES, 4, scale=0.5, seed=1))
    b = write(tmp_path, "b.safetensors", random_adapter(SHAPES, 6, scale=2.0, seed=2))
    return a, b


def test_merge_examples_is_exact_and_reloads(cli, tmp_path):
    out = tmp_path / "merged.safetensors"
    code, stdout, _ = cli("merge", STYLE, DETAIL, "-o", out, "--weights", "0.7,0.3", "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["max_error"] == 0.0 and report["format"] == "kohya" and len(report["modules"]) == 16
    merged, style, detail = lorakit.load(out), lorakit.load(STYLE), lorakit.load(DETAIL)
    assert merged.meta.source_format == "kohya"
    for n in style:
        want = 0.7 * style[n].delta(F64) + 0.3 * detail[n].delta(F64)
        torch.testing.assert_close(merged[n].delta(F64), want, rtol=2e-3, atol=1e-4)  # fp16 storage


def test_svd_with_rank_and_peft_output(cli, tmp_path):
    a, b = pair(tmp_path)
    out = tmp_path / "m"
    code, stdout, _ = cli("merge", a, b, "-m", "svd", "--rank", "3", "--to", "peft", "-o", out, "--json")
    assert code == 0
    rows = json.loads(stdout)["modules"]
    assert {r["rank out"] for r in rows} == {3} and all(0 < r["error"] == r["best error"] for r in rows)
    merged = lorakit.load(out)
    assert (out / "adapter_config.json").exists() and {merged.info(n).rank for n in merged} == {3}


def test_ties_energy_rule_writes_data_dependent_ranks(cli, tmp_path):
    a, b = pair(tmp_path)
    out = tmp_path / "t.safetensors"
    code, stdout, _ = cli("merge", a, b, "-m", "ties", "--density", "0.5", "--error", "0.2", "--seed", "1",
                          "-o", out, "--json")
    assert code == 0
    rows = json.loads(stdout)["modules"]
    assert all(r["error"] <= 0.2 + 1e-9 for r in rows)
    merged = lorakit.load(out)
    assert {n: merged.info(n).rank for n in merged} == {r["module"]: r["rank out"] for r in rows}


def test_mixed_formats_same_base(cli, tmp_path):
    peft_style = tmp_path / "style-peft"
    assert cli("convert", STYLE, "--to", "peft", "-o", peft_style)[0] == 0
    out = tmp_path / "twice.safetensors"
    assert cli("merge", STYLE, peft_style, "-o", out, "-q")[0] == 0
    merged, style = lorakit.load(out), lorakit.load(STYLE)
    for n in style:
        torch.testing.assert_close(merged[n].delta(F64), 2 * style[n].delta(F64), rtol=2e-3, atol=1e-4)


def test_dry_run_and_list_methods_write_nothing(cli, tmp_path):
    a, b = pair(tmp_path)
    code, stdout, _ = cli("merge", a, b, "--dry-run", "-m", "ties", "--rank", "4", "--json")
    plan = json.loads(stdout)
    assert code == 0 and plan["method"] == "ties" and plan["estimated_gflop"] > 0 and len(plan["modules"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]
    code, stdout, _ = cli("merge", "--list-methods")
    assert code == 0 and all(m in stdout for m in ("cat", "svd", "ties", "dare_ties", "della", "knots"))


def test_similarity_prints_the_matrix(cli, tmp_path):
    a, b = pair(tmp_path)
    code, stdout, _ = cli("similarity", a, b, a, "--json")
    rows = json.loads(stdout)["modules"]
    assert code == 0 and rows[0]["#2"] == pytest.approx(1.0) and abs(rows[0]["#1"]) < 0.5


def test_union_and_intersection(cli, tmp_path):
    a = write(tmp_path, "a.safetensors", random_adapter(SHAPES, 4, seed=1))
    extra = {**SHAPES, "model.layers.1.self_attn.q_proj": (32, 24)}
    b = write(tmp_path, "b.safetensors", random_adapter(extra, 4, seed=2))
    code, _, err = cli("merge", a, b, "-o", tmp_path / "x.safetensors")
    assert code == 1 and "module sets differ" in err and "--union" in err
    assert not (tmp_path / "x.safetensors").exists()
    assert cli("merge", a, b, "--union", "-o", tmp_path / "u.safetensors", "-q")[0] == 0
    assert cli("merge", a, b, "--intersection", "-o", tmp_path / "i.safetensors", "-q")[0] == 0
    assert len(lorakit.load(tmp_path / "u.safetensors")) == 3 and len(lorakit.load(tmp_path / "i.safetensors")) == 2
    bb = lorakit.load(b)
    n = "model.layers.1.self_attn.q_proj"
    torch.testing.assert_close(lorakit.load(tmp_path / "u.safetensors")[n].delta(F64), bb[n].delta(F64))


def _nan_adapter():
    a = random_adapter(SHAPES, 4, seed=3)
    name = "model.layers.0.mlp.down_proj"
    f = a[name]
    A = f.A.clone()
    A[0, 0] = float("nan")
    return Adapter({**{n: a[n] for n in a}, name: LoraFactors(A, f.B, f.scale)})


@pytest.mark.parametrize("case, args, message", [
    ("shape", [], "shape (40, 24) here but (32, 24)"),
    ("weights", ["--weights", "1,2,3"], "3 weights for 2 inputs"),
    ("density", ["-m", "ties", "--density", "1.5"], "--density must be in (0, 1]"),
    ("density0", ["-m", "dare_ties", "--density", "0"], "--density must be in (0, 1]"),
    ("method", ["-m", "tie"], "did you mean 'ties'"),
    ("nan", [], "contains NaN"),
    ("rank-for-cat", ["--rank", "4"], "cat is exact"),
    ("param", ["-m", "svd", "--density", "0.5"], "svd takes no parameter 'density'"),
])
def test_bad_input_one_line_error_and_nothing_written(cli, tmp_path, case, args, message):
    a = write(tmp_path, "a.safetensors", random_adapter(SHAPES, 4, seed=1))
    if case == "shape":
        other = {"model.layers.0.self_attn.q_proj": (40, 24), "model.layers.0.mlp.down_proj": (24, 40)}
        b = write(tmp_path, "b.safetensors", random_adapter(other, 4, seed=2))
    elif case == "nan":
        b = write(tmp_path, "b.safetensors", _nan_adapter())
    else:
        b = write(tmp_path, "b.safetensors", random_adapter(SHAPES, 4, seed=2))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    out = tmp_path / "out.safetensors"
    code, _, err = cli("merge", a, b, "-o", out, *args)
    assert code == 1, err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    if case in ("shape", "nan"):
        assert "b.safetensors" in err and "module model.layers.0" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written, inputs untouched


def test_output_equal_to_an_input_is_refused(cli, tmp_path):
    a, b = pair(tmp_path)
    before = a.read_bytes()
    code, _, _err = cli("merge", a, b, "-o", a)
    assert code == 1 and a.read_bytes() == before
