"""diffusers as producer and consumer: a UNet2DConditionModel (and CLIP text encoder) LoRA saved with
``StableDiffusionPipeline.save_lora_weights``, read by lorakit, converted to kohya and back, and loaded by
diffusers' own ``load_lora_weights`` (whose kohya path is ``lora_conversion_utils``)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import lorakit
from lorakit.run import RunOptions
from tests.producers import _diffusion as D

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "conv_shortcut",
                "ff.net.2", "time_emb_proj"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


@pytest.fixture(scope="module")
def produced(tmp_path_factory):
    """The producer's adapted models, their ΔW and outputs, and the file diffusers wrote."""
    from diffusers import StableDiffusionPipeline

    unet, te = D.tiny_unet(), D.tiny_clip()
    ucfg = D.add_lora(unet, seed=3, r=4, lora_alpha=8, target_modules=UNET_TARGETS,
                      rank_pattern={"conv1": 2, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 3},
                      alpha_pattern={"proj_in": 3, "conv_shortcut": 5})
    tcfg = D.add_lora(te, seed=4, r=2, lora_alpha=3, target_modules=TE_TARGETS, alpha_pattern={"fc1": 7})
    d = tmp_path_factory.mktemp("sd")
    StableDiffusionPipeline.save_lora_weights(
        d, unet_lora_layers=D.lora_layers(unet), text_encoder_lora_layers=D.lora_layers(te),
        unet_lora_adapter_metadata=ucfg.to_dict(), text_encoder_lora_adapter_metadata=tcfg.to_dict())
    return {
        "file": d / "pytorch_lora_weights.safetensors",
        "unet_delta": D.peft_deltas(unet), "te_delta": D.peft_deltas(te),
        "unet_out": D.outputs(unet, D.unet_inputs()), "te_out": D.outputs(te, D.clip_inputs()),
    }


def load_in_diffusers(path):
    """A fresh pipeline (same base weights) with ``path`` loaded by diffusers' own ``load_lora_weights``."""
    pipe = D.sd_pipeline(D.tiny_unet(), D.tiny_clip())
    pipe.load_lora_weights(str(path))
    return pipe


def check_pipe(pipe, produced):
    D.assert_close_outputs(D.outputs(pipe.unet, D.unet_inputs()), produced["unet_out"])
    D.assert_close_outputs(D.outputs(pipe.text_encoder, D.clip_inputs()), produced["te_out"])


def test_read_equals_peft_delta(produced):
    a = lorakit.load(produced["file"])
    assert a.meta.source_format == "diffusers"
    for n, d in produced["unet_delta"].items():
        assert D.rel_err(a["unet." + n].delta(torch.float64), d) <= D.REL, n
    for n, d in produced["te_delta"].items():
        assert D.rel_err(a["text_encoder." + n].delta(torch.float64), d) <= D.REL, n
    assert len(a) == len(produced["unet_delta"]) + len(produced["te_delta"])


def test_producer_file_loads_in_diffusers(produced):
    """The reference itself: diffusers reloads its own file with equal outputs (guards the harness)."""
    check_pipe(load_in_diffusers(produced["file"]), produced)


def test_diffusers_rewrite_loads(produced, tmp_path):
    out = tmp_path / "rewritten.safetensors"
    D.convert(produced["file"], out, "diffusers")
    check_pipe(load_in_diffusers(out), produced)


def test_kohya_loads_in_diffusers_and_back(produced, tmp_path):
    """diffusers → kohya (loaded by diffusers' kohya converter) → diffusers (loaded again): equal outputs."""
    k = tmp_path / "k.safetensors"
    D.convert(produced["file"], k, "kohya")
    check_pipe(load_in_diffusers(k), produced)
    back = tmp_path / "back.safetensors"
    D.convert(k, back, "diffusers")
    check_pipe(load_in_diffusers(back), produced)


def test_kohya_without_lorakit_names_maps_by_architecture(produced, tmp_path):
    """A kohya file as sd-scripts writes it (no ``lorakit.module_names``) still converts back exactly."""
    from safetensors.torch import load_file, save_file

    k = tmp_path / "k.safetensors"
    D.convert(produced["file"], k, "kohya")
    plain = tmp_path / "plain.safetensors"
    save_file(load_file(k), plain, {"ss_network_module": "networks.lora"})
    back = tmp_path / "back.safetensors"
    D.convert(plain, back, "diffusers", base=None)
    check_pipe(load_in_diffusers(back), produced)


def test_apply_equals_peft_merge(produced, tmp_path):
    """``lorakit apply`` of the diffusers file onto the UNet checkpoint: W + ΔW with PEFT's ΔW, conv included."""
    from safetensors.torch import load_file, save_file

    from lorakit.verbs.apply import apply_file

    base = D.tiny_unet().state_dict()
    ckpt = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in base.items()}, ckpt)
    only_unet = tmp_path / "unet_lora.safetensors"
    a = lorakit.load(produced["file"])
    lorakit.save(a.select([n for n in a if n.startswith("unet.")]), only_unet, format="diffusers")
    out = tmp_path / "merged.safetensors"
    apply_file(ckpt, only_unet, out, run=RunOptions.resolve("cpu"))
    got = load_file(out)
    for n, d in produced["unet_delta"].items():
        w = base[n + ".weight"]
        assert D.rel_err(got[n + ".weight"], w + d.reshape(w.shape)) <= D.REL, n


def test_sd_scripts_text_encoder_stems_convert_to_diffusers(produced, tmp_path):
    """A kohya file as sd-scripts names a CLIP text encoder (``lora_te_text_model_encoder_layers_…``, no lorakit
    name map) converts to diffusers keys that diffusers loads into the text encoder with equal outputs."""
    from safetensors.torch import load_file, save_file

    k = tmp_path / "k.safetensors"
    D.convert(produced["file"], k, "kohya")
    sd = {key.replace("lora_te_encoder_", "lora_te_text_model_encoder_").replace(
        "lora_te1_encoder_", "lora_te_text_model_encoder_"): v for key, v in load_file(k).items()}
    assert any(key.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for key in sd)
    plain = tmp_path / "sd_scripts.safetensors"
    save_file(sd, plain, {"ss_base_model_version": "sd_v1"})
    back = tmp_path / "back.safetensors"
    D.convert(plain, back, "diffusers")
    a = lorakit.load(back)
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in a
    check_pipe(load_in_diffusers(back), produced)
