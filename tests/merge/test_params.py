"""``--param NAME=VALUE``: values parsed by the parameter's declared type, through the CLI and the registry."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit.errors import OperatorParameterError
from lorakit.ops.registry import parse_value, resolve
from lorakit.testing import random_adapter

SHAPES = {"model.layers.0.self_attn.q_proj": (32, 24), "model.layers.0.mlp.down_proj": (24, 40)}
F64 = torch.float64


@pytest.mark.parametrize("text, want", [("true", True), ("False", False), ("0", False), ("1", True),
                                        ("yes", True), ("NO", False), ("on", True), ("off", False)])
def test_bool_words(text, want):
    assert parse_value(text, bool) is want


@pytest.mark.parametrize("typ, text, want", [(int, "3", 3), (int, " 12 ", 12), (float, "0.25", 0.25),
                                             (float, "1e-3", 1e-3), (float, 2, 2.0), (str, "ties", "ties"),
                                             (int, 4.0, 4)])
def test_numbers_and_strings(typ, text, want):
    got = parse_value(text, typ)
    assert got == want and type(got) is typ


@pytest.mark.parametrize("typ, value", [(bool, "maybe"), (bool, "2"), (bool, 2), (int, "3.5"), (int, True),
                                        (float, "abc"), (float, "nan"), (float, False), (str, 3)])
def test_refused(typ, value):
    with pytest.raises(ValueError):
        parse_value(value, typ)


def test_validate_parses_by_the_declared_type():
    lego = resolve("lego")
    assert lego.validate({"output_reweight": "false", "param_reweight": "0"}) == {
        "output_reweight": False, "param_reweight": False}
    assert resolve("ties").validate({"density": "0.3", "seed": "7"}) == {"density": 0.3, "seed": 7}
    assert resolve("knots").validate({"inner": "dare_ties"}) == {"inner": "dare_ties"}
    with pytest.raises(OperatorParameterError, match="output_reweight must be true or false"):
        lego.validate({"output_reweight": "nope"})
    with pytest.raises(OperatorParameterError, match="seed must be an integer"):
        resolve("ties").validate({"seed": "1.5"})


def _pair(tmp_path):
    paths = []
    for i, r in ((1, 4), (2, 6)):
        p = tmp_path / f"{'ab'[i - 1]}.safetensors"
        lorakit.save(random_adapter(SHAPES, r, scale=0.5, seed=i), p, format="peft")
        paths.append(p)
    return paths


@pytest.mark.parametrize("value, shown", [("false", "False"), ("0", "False"), ("no", "False"),
                                          ("true", "True"), ("1", "True")])
def test_cli_bool_param_is_parsed(cli, tmp_path, value, shown):
    a, b = _pair(tmp_path)
    code, stdout, err = cli("merge", a, b, "-m", "lego", "--param", f"output_reweight={value}", "--dry-run",
                            "--json")
    assert code == 0, err
    assert f"output_reweight={shown}" in json.loads(stdout)["parameters"]


def test_cli_false_and_true_give_different_merges(cli, tmp_path):
    a, b = _pair(tmp_path)
    outs = {}
    for value in ("false", "true"):
        out = tmp_path / f"m-{value}.safetensors"
        code, _, err = cli("merge", a, b, "-m", "lego", "--rank", "4", "--param", f"output_reweight={value}",
                           "-o", out, "-q")
        assert code == 0, err
        outs[value] = lorakit.load(out)
    n = "model.layers.0.self_attn.q_proj"
    assert not torch.allclose(outs["false"][n].delta(F64), outs["true"][n].delta(F64))


@pytest.mark.parametrize("param, message", [
    ("output_reweight=maybe", "lego: parameter output_reweight must be true or false"),
    ("seed=x", "lego: parameter seed must be an integer"),
])
def test_cli_refuses_a_bad_value_in_one_line(cli, tmp_path, param, message):
    a, b = _pair(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = cli("merge", a, b, "-m", "lego", "--param", param, "-o", tmp_path / "o.safetensors")
    assert code == 1 and err.startswith("error: ") and message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_cli_numeric_param(cli, tmp_path):
    a, b = _pair(tmp_path)
    code, stdout, err = cli("merge", a, b, "-m", "iso_cts", "--param", "common_fraction=0.5", "--rank", "6",
                            "--dry-run", "--json")
    assert code == 0, err
    assert "common_fraction=0.5" in json.loads(stdout)["parameters"]
