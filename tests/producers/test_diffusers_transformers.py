"""diffusers SD3 and Flux transformer LoRAs (saved with ``StableDiffusion3Pipeline`` / ``FluxPipeline``
``save_lora_weights``): lorakit's ΔW equals PEFT's, and every conversion either loads back in diffusers'
``load_lora_weights`` with equal outputs (Flux kohya files through diffusers' own BFL/kohya converter) or is
refused with one line."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import lorakit
from lorakit.errors import LorakitError
from tests.producers import _diffusion as D

SD3_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "ff.net.0.proj", "ff.net.2", "ff_context.net.2", "norm1.linear", "context_embedder", "proj_out"]
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "norm1.linear", "proj_mlp", "proj_out",
                "norm.linear", "x_embedder", "context_embedder"]


def _produce(tmp_path_factory, kind):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    model = D.tiny_sd3() if kind == "sd3" else D.tiny_flux()
    targets = SD3_TARGETS if kind == "sd3" else FLUX_TARGETS
    cfg = D.add_lora(model, seed=5, r=4, lora_alpha=6, target_modules=targets,
                     rank_pattern={"to_k": 2, "transformer_blocks.0.attn.to_q": 3},
                     alpha_pattern={"to_v": 3, "proj_out": 9})
    d = tmp_path_factory.mktemp(kind)
    pipe_cls = StableDiffusion3Pipeline if kind == "sd3" else FluxPipeline
    pipe_cls.save_lora_weights(d, transformer_lora_layers=D.lora_layers(model),
                               transformer_lora_adapter_metadata=cfg.to_dict())
    cfg_dir = d / "transformer"
    model.save_config(cfg_dir)
    inputs = D.sd3_inputs() if kind == "sd3" else D.flux_inputs()
    return {"kind": kind, "file": d / "pytorch_lora_weights.safetensors", "delta": D.peft_deltas(model),
            "out": D.outputs(model, inputs), "inputs": inputs, "config": cfg_dir / "config.json"}


@pytest.fixture(scope="module", params=["sd3", "flux"])
def produced(request, tmp_path_factory):
    return _produce(tmp_path_factory, request.param)


def load_in_diffusers(produced, path):
    if produced["kind"] == "sd3":
        pipe = D.sd3_pipeline(D.tiny_sd3())
    else:
        pipe = D.flux_pipeline(D.tiny_flux())
    pipe.load_lora_weights(str(path))
    return D.outputs(pipe.transformer, produced["inputs"])


def test_read_equals_peft_delta(produced):
    a = lorakit.load(produced["file"])
    assert len(a) == len(produced["delta"])
    for n, d in produced["delta"].items():
        assert D.rel_err(a["transformer." + n].delta(torch.float64), d) <= D.REL, n


def test_producer_file_loads_in_diffusers(produced):
    D.assert_close_outputs(load_in_diffusers(produced, produced["file"]), produced["out"])


def test_diffusers_rewrite_loads(produced, tmp_path):
    out = tmp_path / "rewritten.safetensors"
    D.convert(produced["file"], out, "diffusers")
    D.assert_close_outputs(load_in_diffusers(produced, out), produced["out"])


def test_kohya_and_back_loads(produced, tmp_path):
    k = tmp_path / "k.safetensors"
    D.convert(produced["file"], k, "kohya")
    back = tmp_path / "back.safetensors"
    D.convert(k, back, "diffusers")
    D.assert_close_outputs(load_in_diffusers(produced, back), produced["out"])
    a, b = lorakit.load(produced["file"]), lorakit.load(back)
    assert set(a) == set(b)
    for n in a:
        assert D.rel_err(b[n].delta(torch.float64), a[n].delta(torch.float64)) <= D.REL, n


def test_flux_kohya_loads_in_diffusers_converter(produced, tmp_path):
    """lorakit's kohya Flux file (BFL stems, q/k/v fused) through diffusers' own kohya-Flux converter, against
    the same modules in diffusers form. Checked on the double blocks: diffusers 0.42's converter hard-codes
    FLUX.1's single-block ``linear1`` split (3072, 3072, 3072, 12288) and drops the top-level modules (``img_in``,
    ``txt_in``, ``final_layer``: keys without the ``transformer.`` prefix, alpha unread)."""
    if produced["kind"] != "flux":
        pytest.skip("diffusers has no kohya loader for SD3 (its lora_state_dict reads diffusers keys only)")
    a = lorakit.load(produced["file"])
    part = a.select([n for n in a if n.startswith("transformer.transformer_blocks.")])
    ref = tmp_path / "part.safetensors"
    lorakit.save(part, ref, format="diffusers")
    k = tmp_path / "k.safetensors"
    lorakit.save(part, k, format="kohya", metadata={"modelspec.architecture": "flux-1-dev/lora"})
    from safetensors import safe_open

    with safe_open(k, "pt") as f:
        assert any(key.startswith("lora_unet_double_blocks_0_img_attn_qkv.") for key in f.keys())
    D.assert_close_outputs(load_in_diffusers(produced, k), load_in_diffusers(produced, ref))


def test_plain_kohya_maps_or_refuses(produced, tmp_path):
    """Without lorakit's name map: Flux stems (BFL) map by the architecture, at the sizes the file shows; SD3's
    diffusers-named ``lora_transformer_`` stems are refused until ``base=`` names the transformer's config, then
    map exactly. Never a file that loads wrong."""
    from safetensors.torch import load_file, save_file

    k = tmp_path / "k.safetensors"
    D.convert(produced["file"], k, "kohya")
    plain = tmp_path / "plain.safetensors"
    save_file(load_file(k), plain, {"ss_network_module": "networks.lora"})
    if produced["kind"] == "sd3":
        with pytest.raises(LorakitError) as e:
            D.convert(plain, tmp_path / "no.safetensors", "diffusers")
        msg = str(e.value)
        assert "plain.safetensors" in msg and "lora_transformer_" in msg and "\n" not in msg
        assert not (tmp_path / "no.safetensors").exists()
    back = tmp_path / "back.safetensors"
    D.convert(plain, back, "diffusers", base=produced["config"] if produced["kind"] == "sd3" else None)
    D.assert_close_outputs(load_in_diffusers(produced, back), produced["out"])


def test_config_json_has_class_name(produced):
    assert json.loads(produced["config"].read_text())["_class_name"].endswith("Transformer2DModel")
