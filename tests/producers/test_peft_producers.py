"""Adapters made by PEFT itself, checked against PEFT's own computation.

For every kind (LoRA with bias, modules_to_save, DoRA, rsLoRA, rank/alpha patterns, embeddings, Conv2d, GPT-2
Conv1D with fan_in_fan_out, DoRA on embeddings, conv and Conv1D):

- read: ΔW equals PEFT's ``get_delta_weight`` (float64 relative error ≤ 1e-5), and so do the bias update
  (``scaling·lora_B.bias``), the DoRA magnitude and the saved modules;
- write: lorakit's PEFT output loads with ``PeftModel.from_pretrained`` and gives PEFT's outputs;
- convert: to kohya and diffusers either exact (converted back, PEFT gives the same outputs) or refused with
  one line, exit 1 and nothing written;
- apply: ``lorakit apply`` (the CLI) writes the tensors PEFT's ``merge_and_unload`` computes.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lorakit

from .conftest import Made, lora_layers, outputs, peft, save_base

pytestmark = [pytest.mark.peft, pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.double(), expected.double()
    return float((got - expected).norm() / max(float(expected.norm()), 1e-300))


def in_peft_layout(f, layer, delta: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """lorakit's flattened (out, in) ΔW in the layout PEFT's get_delta_weight returns."""
    if f.kind == "embedding" or getattr(layer, "fan_in_fan_out", False):
        delta = delta.T
    return delta.reshape(like.shape)


def saved_module_tensors(made: Made) -> dict[str, torch.Tensor]:
    """What PEFT trained besides LoRA, by base tensor name: the ``modules_to_save["default"]`` copies, and the
    biases of ``bias="all"``."""
    from peft.utils import ModulesToSaveWrapper

    out = {}
    for name, m in made.model.named_modules():
        if isinstance(m, ModulesToSaveWrapper):
            for pn, p in m.modules_to_save["default"].named_parameters():
                out[f"{name.removeprefix('base_model.model.')}.{pn}"] = p.detach()
    if made.case.config.get("bias") == "all":
        for name, p in made.model.named_parameters():
            if name.endswith(".bias") and "lora_" not in name:
                out[name.removeprefix("base_model.model.").replace(".base_layer.", ".")] = p.detach()
    return out


def test_read_equals_peft(made: Made):
    adapter = lorakit.load(made.path)
    layers = lora_layers(made.model)
    assert set(adapter) == set(layers)
    for name, layer in layers.items():
        f = adapter[name]
        expected = layer.get_delta_weight("default").double()
        assert rel_err(in_peft_layout(f, layer, f.delta(torch.float64), expected), expected) <= 1e-5, name
        assert f.scale == pytest.approx(layer.scaling["default"], rel=1e-12)
        if made.case.config.get("lora_bias"):
            expected_b = layer.lora_B["default"].bias.detach() * layer.scaling["default"]
            assert f.bias is not None and rel_err(f.bias, expected_b) <= 1e-12, name
        else:
            assert f.bias is None
        if made.case.dora:
            mag = layer.lora_magnitude_vector["default"].weight.detach().reshape(-1)
            torch.testing.assert_close(f.magnitude.reshape(-1), mag, rtol=0, atol=0)
    saved = saved_module_tensors(made)
    assert set(adapter.meta.full_tensors) == set(saved)
    for n, t in saved.items():
        torch.testing.assert_close(adapter.meta.full_tensors[n].load(), t, rtol=0, atol=0)


def test_written_loads_in_peft_with_equal_outputs(made: Made, tmp_path):
    out = tmp_path / "rewritten"
    lorakit.save(lorakit.load(made.path), out, format="peft")
    reloaded = peft.PeftModel.from_pretrained(made.fresh_base(), out).eval()
    torch.testing.assert_close(outputs(reloaded, made.case), outputs(made.model, made.case), rtol=1e-9, atol=1e-12)
    src_cfg = json.loads((made.path / "adapter_config.json").read_text())
    new_cfg = json.loads((out / "adapter_config.json").read_text())
    for key in ("use_dora", "lora_bias", "fan_in_fan_out", "use_rslora", "modules_to_save"):
        assert new_cfg.get(key) == src_cfg.get(key), key


def test_single_file_peft_round_trip(made: Made, tmp_path, cli):
    """PEFT keys and the config in one safetensors file (lorakit.peft_config), then a directory again."""
    one = tmp_path / "one.safetensors"
    code, _, err = cli("convert", made.path, "--to", "peft", "-o", one)
    assert code == 0, err
    code, _, err = cli("convert", one, "--to", "peft", "-o", tmp_path / "dir")
    assert code == 0, err
    reloaded = peft.PeftModel.from_pretrained(made.fresh_base(), tmp_path / "dir").eval()
    torch.testing.assert_close(outputs(reloaded, made.case), outputs(made.model, made.case), rtol=1e-9, atol=1e-12)


def test_apply_equals_merge_and_unload(made: Made, tmp_path, cli):
    base = save_base(made.fresh_base(), tmp_path / "base")
    out = tmp_path / "merged"
    code, stdout, err = cli("apply", base, made.path, "-o", out, "--json")
    assert code == 0, err
    got = load_file(str(out / "model.safetensors"))
    expected = made.merged().state_dict()
    changed = 0
    for key, t in got.items():
        torch.testing.assert_close(t, expected[key], rtol=1e-9, atol=1e-12, msg=lambda m, k=key: f"{k}: {m}")
        changed += not torch.equal(t, load_file(str(base / "model.safetensors"))[key])
    report = json.loads(stdout)
    summary = report.get("summary", report)
    assert changed == summary["modules_applied"] + summary["bias_updates"] + summary["full_tensors_replaced"]
    if made.case.config.get("lora_bias"):
        assert summary["bias_updates"] == len(lora_layers(made.model))
    if made.case.config.get("modules_to_save") or made.case.config.get("bias") == "all":
        assert summary["full_tensors_replaced"] == len(saved_module_tensors(made)) > 0


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_convert_is_exact_or_refused(made: Made, tmp_path, cli, fmt):
    outdir = tmp_path / "out"
    outdir.mkdir()
    dst = outdir / f"converted.{fmt}.safetensors"
    code, _, err = cli("convert", made.path, "--to", fmt, "-o", dst)
    if code != 0:
        lines = err.strip().splitlines()
        assert code == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
        assert len(lines) <= 2 and str(made.path.name) in lines[0], err
        assert list(outdir.iterdir()) == []
        if made.case.config.get("lora_bias"):
            assert "lora_bias" in lines[0]
        if made.case.config.get("modules_to_save") or made.case.config.get("bias") == "all":
            assert "modules_to_save" in lines[0]
        return
    assert not made.case.config.get("lora_bias") and not made.case.config.get("modules_to_save")
    assert made.case.config.get("bias", "none") == "none"
    back = tmp_path / "back"
    code, _, err = cli("convert", dst, "--to", "peft", "-o", back)
    assert code == 0, err
    reloaded = peft.PeftModel.from_pretrained(made.fresh_base(), back).eval()
    src_layers = lora_layers(made.model)
    for name, layer in lora_layers(reloaded).items():
        expected = src_layers[name].get_delta_weight("default").double()
        assert rel_err(layer.get_delta_weight("default"), expected) <= 1e-5, name
    # formats that store alpha in float32 (kohya) round the scale at 1e-7: outputs agree to that
    expected = outputs(made.model, made.case)
    torch.testing.assert_close(outputs(reloaded, made.case), expected, rtol=1e-5,
                               atol=1e-6 * float(expected.abs().max()))

