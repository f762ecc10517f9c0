"""kohya and LyCORIS bad input: the error names the file and the key as written in it (not lorakit's module
name), in one line; the CLI exits 1 and writes nothing."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import lorakit
from lorakit.errors import LorakitError

STEM = "lora_unet_down_blocks_0_attentions_0_proj_in"  # maps to unet.down_blocks.0.attentions.0.proj_in (SD1)
OTHER = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def _write(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, {"ss_base_model_version": "sd_v1"})
    return path


def _good(stem, r=2, out=8, inn=8):
    return {f"{stem}.lora_down.weight": torch.randn(r, inn), f"{stem}.lora_up.weight": torch.randn(out, r),
            f"{stem}.alpha": torch.tensor(float(r))}


CASES = {
    "ranks differ": ({f"{STEM}.lora_down.weight": torch.randn(2, 8), f"{STEM}.lora_up.weight": torch.randn(8, 3)},
                     f"{STEM}.lora_down.weight"),
    "up missing": ({f"{STEM}.lora_down.weight": torch.randn(2, 8)}, f"{STEM}.lora_down.weight"),
    "nan factor": ({f"{STEM}.lora_down.weight": torch.full((2, 8), float("nan")),
                    f"{STEM}.lora_up.weight": torch.randn(8, 2)}, f"{STEM}.lora_down.weight"),
    "loha bad shapes": ({f"{STEM}.hada_w1_a": torch.randn(8, 2), f"{STEM}.hada_w1_b": torch.randn(2, 8),
                         f"{STEM}.hada_w2_a": torch.randn(8, 2), f"{STEM}.hada_w2_b": torch.randn(3, 8)},
                        f"{STEM}.hada_w1_a"),
    "loha nan": ({f"{STEM}.hada_w1_a": torch.full((8, 2), float("inf")), f"{STEM}.hada_w1_b": torch.randn(2, 8),
                  f"{STEM}.hada_w2_a": torch.randn(8, 2), f"{STEM}.hada_w2_b": torch.randn(2, 8)},
                 f"{STEM}.hada_w1_a"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_error_names_key_as_written(tmp_path, case, cli):
    tensors, key = CASES[case]
    path = _write(tmp_path / "bad.safetensors", {**tensors, **_good(OTHER)})
    with pytest.raises(LorakitError) as e:
        a = lorakit.load(path)
        for n in a:
            a[n]
    msg = str(e.value)
    assert key in msg and str(path) in msg and "\n" not in msg
    assert "unet.down_blocks" not in msg  # not lorakit's name for it
    out = tmp_path / "out.safetensors"
    code, _, stderr = cli("convert", path, "--to", "diffusers", "-o", out)
    assert code == 1
    assert key in stderr and "Traceback" not in stderr
    assert not out.exists()


def test_old_diffusers_text_encoder_keys(tmp_path):
    """diffusers' pre-PEFT text-encoder keys (``self_attn.to_q_lora.down.weight``) name CLIP's ``q_proj``."""
    base = "text_encoder.text_model.encoder.layers.0"
    t = {f"{base}.self_attn.to_q_lora.down.weight": torch.randn(2, 8),
         f"{base}.self_attn.to_q_lora.up.weight": torch.randn(8, 2),
         f"{base}.mlp.fc1.lora_linear_layer.down.weight": torch.randn(2, 8),
         f"{base}.mlp.fc1.lora_linear_layer.up.weight": torch.randn(16, 2)}
    save_file(t, tmp_path / "old.safetensors")
    a = lorakit.load(tmp_path / "old.safetensors")
    assert set(a) == {f"{base}.self_attn.q_proj", f"{base}.mlp.fc1"}
    torch.testing.assert_close(a[f"{base}.self_attn.q_proj"].delta(torch.float64),
                               (t[f"{base}.self_attn.to_q_lora.up.weight"]
                                @ t[f"{base}.self_attn.to_q_lora.down.weight"]).double())


@pytest.mark.parametrize(("config", "to"), [({"fan_in_fan_out": True}, "diffusers"), ({"fan_in_fan_out": True}, "kohya"),
                                            ({"task_type": "CAUSAL_LM"}, "diffusers")])
def test_inexact_peft_conversions_refused(tmp_path, cli, config, to):
    """A GPT-2 (``fan_in_fan_out``) or language-model PEFT adapter whose module names look like a diffusers
    component (``transformer.h.0.attn.c_proj``) is refused, not written to load wrong."""
    import json

    d = tmp_path / "gpt2"
    d.mkdir()
    key = "base_model.model.transformer.h.0.attn.c_proj"
    save_file({f"{key}.lora_A.weight": torch.randn(2, 8), f"{key}.lora_B.weight": torch.randn(8, 2)},
              d / "adapter_model.safetensors")
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                       "target_modules": ["c_proj"], **config}))
    out = tmp_path / "out.safetensors"
    code, _, stderr = cli("convert", d, "--to", to, "-o", out)
    assert code == 1 and "Traceback" not in stderr and str(d) in stderr
    assert not out.exists()


_DEEP = "[" * 5000 + "]" * 5000
METADATA_CASES = {
    "kohya names nested too deeply": ("kohya", {"lorakit.module_names": _DEEP}, "lorakit.module_names"),
    "kohya names not a mapping": ("kohya", {"lorakit.module_names": "[1, 2]"}, "lorakit.module_names"),
    "diffusers metadata nested too deeply": ("diffusers", {"lora_adapter_metadata": _DEEP}, "lora_adapter_metadata"),
    "diffusers metadata not an object": ("diffusers", {"lora_adapter_metadata": "[1]"}, "lora_adapter_metadata"),
}


@pytest.mark.parametrize("case", sorted(METADATA_CASES))
def test_bad_metadata_json_is_one_line(tmp_path, case, cli):
    """Metadata that lorakit itself writes is parsed with the depth-bounded reader and checked for its shape."""
    kind, metadata, key = METADATA_CASES[case]
    if kind == "kohya":
        tensors = _good(STEM)
    else:
        tensors = {"unet.x.lora_A.weight": torch.randn(2, 4), "unet.x.lora_B.weight": torch.randn(4, 2)}
    path = tmp_path / "bad.safetensors"
    save_file(tensors, path, metadata)
    out = tmp_path / "out.safetensors"
    code, _, stderr = cli("convert", path, "--to", "peft", "-o", out)
    assert code == 1
    assert key in stderr and str(path) in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not out.exists()
