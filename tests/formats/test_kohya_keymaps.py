"""kohya stems → module names (SD1, SDXL, Flux, base configs), the Flux split, and round trips."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import lorakit
from lorakit.errors import KeyMappingError, UnsafeFileError
from lorakit.factors import LoraFactors
from lorakit.formats.keymaps import KeyMap, Split, arch_keymap, split_factors

D = torch.float64


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def kohya_module(stem: str, out: int, inn: int, r: int, alpha: float | None, seed: int, conv: bool = False):
    A = rand(r, inn, 3, 3, seed=seed) if conv else rand(r, inn, seed=seed)
    B = rand(out, r, 1, 1, seed=seed + 1) if conv else rand(out, r, seed=seed + 1)
    t = {f"{stem}.lora_down.weight": A, f"{stem}.lora_up.weight": B}
    if alpha is not None:
        t[f"{stem}.alpha"] = torch.tensor(alpha)
    s = 1.0 if alpha is None else alpha / r
    return t, s * (B.reshape(out, r) @ A.reshape(r, -1))


def write(path, modules, metadata=None):
    tensors: dict[str, torch.Tensor] = {}
    refs: dict[str, torch.Tensor] = {}
    for i, (stem, name, out, inn, r, alpha, conv) in enumerate(modules):
        t, ref = kohya_module(stem, out, inn, r, alpha, seed=10 * i, conv=conv)
        tensors.update(t)
        refs[name] = ref
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path, refs


SD1 = [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
     "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 8, 8, 2, 1.0, False),
    ("lora_unet_up_blocks_3_attentions_2_proj_out", "unet.up_blocks.3.attentions.2.proj_out", 8, 8, 2, 4.0, False),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
     "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj", 16, 8, 4, 2.0, False),
    ("lora_unet_down_blocks_0_resnets_0_conv1", "unet.down_blocks.0.resnets.0.conv1", 6, 4, 2, 1.0, True),
    ("lora_unet_down_blocks_1_downsamplers_0_conv", "unet.down_blocks.1.downsamplers.0.conv", 6, 4, 2, 1.0, True),
    ("lora_unet_up_blocks_1_resnets_2_time_emb_proj", "unet.up_blocks.1.resnets.2.time_emb_proj", 6, 5, 2, None,
     False),
    ("lora_te_text_model_encoder_layers_11_self_attn_out_proj",
     "text_encoder.text_model.encoder.layers.11.self_attn.out_proj", 8, 8, 2, 0.5, False),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1", "text_encoder.text_model.encoder.layers.0.mlp.fc1", 12, 8, 3,
     3.0, False),
]

SDXL = [  # SGM stems → diffusers names (formats-and-hub.md §4.1, §5.3, §8)
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
     "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 8, 8, 2, 1.0, False),
    ("lora_unet_middle_block_1_proj_in", "unet.mid_block.attentions.0.proj_in", 8, 8, 2, 1.0, False),
    ("lora_unet_output_blocks_0_1_transformer_blocks_9_ff_net_2",
     "unet.up_blocks.0.attentions.0.transformer_blocks.9.ff.net.2", 8, 16, 2, 1.0, False),
    ("lora_unet_input_blocks_1_0_in_layers_2", "unet.down_blocks.0.resnets.0.conv1", 6, 4, 2, 1.0, True),
    ("lora_unet_input_blocks_3_0_op", "unet.down_blocks.0.downsamplers.0.conv", 6, 4, 2, 1.0, True),
    ("lora_unet_output_blocks_2_2_conv", "unet.up_blocks.0.upsamplers.0.conv", 6, 4, 2, 1.0, True),
    ("lora_unet_output_blocks_5_0_skip_connection", "unet.up_blocks.1.resnets.2.conv_shortcut", 6, 4, 2, 8.0,
     False),
    ("lora_unet_middle_block_2_emb_layers_1", "unet.mid_block.resnets.1.time_emb_proj", 6, 4, 2, 1.0, False),
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
     "text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 8, 8, 2, 1.0, False),
    ("lora_te2_text_model_encoder_layers_31_mlp_fc2", "text_encoder_2.text_model.encoder.layers.31.mlp.fc2", 8,
     16, 4, 2.0, False),
]


def assert_refs(adapter, refs, tol=1e-10):
    assert set(adapter) == set(refs)
    for name, ref in refs.items():
        torch.testing.assert_close(adapter[name].delta(D), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("table,meta", [(SD1, {"ss_base_model_version": "sd_v1"}), (SD1, None), (SDXL, None)])
def test_stems_map_to_diffusers_names(tmp_path, table, meta):
    path, refs = write(tmp_path / "x.safetensors", table, meta)
    a = lorakit.load(path)
    assert_refs(a, refs)
    assert any("key map" in n for n in a.meta.notes)


def test_sdxl_input_and_output_blocks_follow_the_diffusers_remap_rule():
    # diffusers' rule (layers_per_block L = 2): input_blocks.i → down_blocks.(i-1)//3.{resnets|attentions}.(i-1)%3,
    # output_blocks.i → up_blocks.i//3.…i%3; SDXL levels have 0 / 2 / 10 transformer blocks.
    km = arch_keymap("sdxl")
    depth = {0: 0, 1: 2, 2: 10}
    for i in (1, 2, 4, 5, 7, 8):
        lv, j = (i - 1) // 3, (i - 1) % 3
        assert km.resolve(f"lora_unet_input_blocks_{i}_0_out_layers_3") == f"unet.down_blocks.{lv}.resnets.{j}.conv2"
        if depth[lv]:
            last = depth[lv] - 1
            stem = f"lora_unet_input_blocks_{i}_1_transformer_blocks_{last}_attn2_to_k"
            assert km.resolve(stem) == f"unet.down_blocks.{lv}.attentions.{j}.transformer_blocks.{last}.attn2.to_k"
            with pytest.raises(KeyMappingError):
                km.resolve(f"lora_unet_input_blocks_{i}_1_transformer_blocks_{depth[lv]}_attn2_to_k")
    for i in range(9):
        u, j = i // 3, i % 3
        assert km.resolve(f"lora_unet_output_blocks_{i}_0_in_layers_2") == f"unet.up_blocks.{u}.resnets.{j}.conv1"
        if u < 2:
            assert km.resolve(f"lora_unet_output_blocks_{i}_1_proj_in") == f"unet.up_blocks.{u}.attentions.{j}.proj_in"


@pytest.mark.parametrize("table", [SD1, SDXL], ids=["sd1", "sdxl"])
def test_roundtrip_through_peft_and_diffusers_keeps_delta_and_alpha(tmp_path, table):
    path, refs = write(tmp_path / "src.safetensors", table)
    a = lorakit.load(path)
    for fmt, out in (("peft", tmp_path / "p"), ("diffusers", tmp_path / "d.safetensors")):
        lorakit.save(a, out, format=fmt)
        mid = lorakit.load(out)
        assert_refs(mid, refs, 1e-6)
        back = tmp_path / f"back-{fmt}.safetensors"
        lorakit.save(mid, back, format="kohya")
        again = lorakit.load(back)
        assert_refs(again, refs, 1e-6)
        for n in refs:  # same alpha (scale·rank) as the source file
            assert abs(again.info(n).scale * again.info(n).rank - a.info(n).scale * a.info(n).rank) < 1e-6


# ---- Flux ----------------------------------------------------------------------------------------------------
def probe_check(part: LoraFactors, fused: LoraFactors, ranges, x: torch.Tensor) -> None:
    """part ΔW @ x equals the fused ΔW rows @ x (cheap: no dense 9216×3072 matrix)."""
    got = part.scale * (part.B.double() @ (part.A.double() @ x))
    full = fused.scale * (fused.B.double() @ (fused.A.double() @ x))
    torch.testing.assert_close(got, torch.cat([full[a:b] for a, b in ranges]), rtol=1e-10, atol=1e-10)


def test_flux_fused_qkv_is_split_exactly(tmp_path):
    r, alpha = 4, 2.0
    stems = {"lora_unet_double_blocks_0_img_attn_qkv": (9216, 3072),
             "lora_unet_single_blocks_3_linear1": (3 * 3072 + 12288, 3072),
             "lora_unet_double_blocks_1_txt_mlp_2": (3072, 12288)}
    tensors = {}
    for i, (stem, (out, inn)) in enumerate(stems.items()):
        tensors[f"{stem}.lora_down.weight"] = rand(r, inn, seed=i).float()
        tensors[f"{stem}.lora_up.weight"] = rand(out, r, seed=i + 50).float()
        tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    path = tmp_path / "flux.safetensors"
    save_file(tensors, str(path), metadata={"ss_base_model_version": "flux1"})
    a = lorakit.load(path)
    km = arch_keymap("flux")
    x = rand(3072, 3, seed=99)
    for stem in ("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_3_linear1"):
        fused = LoraFactors(tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"], alpha / r)
        split = km.splits[stem]
        for name, ranges in split.parts:
            assert a[name].rank == r and a[name].scale == alpha / r  # down shared, alpha / rows(down) kept
            probe_check(a[name], fused, ranges, x)
    assert "transformer.single_transformer_blocks.3.proj_mlp" in a
    assert a.info("transformer.single_transformer_blocks.3.proj_mlp").out_features == 12288
    assert "transformer.transformer_blocks.1.ff_context.net.2" in a


def test_flux_block_diagonal_split_keeps_each_block():
    # sd-scripts split_qkv: down (3r, in), up block-diagonal (3·d, 3r); alpha / (3r) is the file's scale.
    r, d, inn = 2, 4, 5
    split = Split(tuple((n, ((k * d, (k + 1) * d),)) for k, n in enumerate(("q", "k", "v"))))
    As = [rand(r, inn, seed=k) for k in range(3)]
    Bs = [rand(d, r, seed=10 + k) for k in range(3)]
    fused = LoraFactors(torch.cat(As), torch.block_diag(*Bs), 6.0 / (3 * r))
    parts = split_factors(fused, split)
    for k, n in enumerate(("q", "k", "v")):
        assert parts[n].rank == r
        torch.testing.assert_close(parts[n].delta(D), fused.delta(D)[k * d:(k + 1) * d], rtol=1e-12, atol=1e-12)
    dense = LoraFactors(torch.cat(As), rand(3 * d, 3 * r, seed=7), 1.0)  # not block-diagonal: down shared
    for k, n in enumerate(("q", "k", "v")):
        p = split_factors(dense, split)[n]
        assert p.rank == 3 * r
        torch.testing.assert_close(p.delta(D), dense.delta(D)[k * d:(k + 1) * d], rtol=1e-12, atol=1e-12)


def tiny_flux_base(tmp_path):
    base = tmp_path / "flux-base"
    (base / "transformer").mkdir(parents=True)
    (base / "transformer" / "config.json").write_text(json.dumps({
        "_class_name": "FluxTransformer2DModel", "num_layers": 1, "num_single_layers": 1,
        "attention_head_dim": 2, "num_attention_heads": 2, "guidance_embeds": False}))
    (base / "model_index.json").write_text("{}")
    return base


def test_flux_with_base_config_roundtrip(tmp_path, cli):
    base = tiny_flux_base(tmp_path)
    d, mlp = 4, 16
    path, _ = write(tmp_path / "f.safetensors", [
        ("lora_unet_double_blocks_0_img_attn_qkv", "-", 3 * d, d, 2, 1.0, False),
        ("lora_unet_single_blocks_0_linear1", "-", 3 * d + mlp, d, 2, 1.0, False),
        ("lora_unet_final_layer_adaLN_modulation_1", "-", 2 * d, d, 2, 1.0, False),
        ("lora_unet_single_blocks_0_linear2", "transformer.single_transformer_blocks.0.proj_out", d, d + mlp, 2, 1.0,
         False)])
    a = lorakit.load(path, base=base)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        fused = fh.get_tensor("lora_unet_final_layer_adaLN_modulation_1.lora_up.weight").double()
        down = fh.get_tensor("lora_unet_final_layer_adaLN_modulation_1.lora_down.weight").double()
    # BFL (shift, scale) → diffusers (scale, shift): the halves swap.
    torch.testing.assert_close(a["transformer.norm_out.linear"].delta(D) * 2,
                               torch.cat([fused[d:], fused[:d]]) @ down)
    assert {"transformer.transformer_blocks.0.attn.to_q", "transformer.single_transformer_blocks.0.proj_mlp",
            "transformer.single_transformer_blocks.0.proj_out"} <= set(a)
    out = tmp_path / "diff.safetensors"
    code, _stdout, err = cli("convert", path, "--base", base, "--to", "diffusers", "-o", out)
    assert code == 0, err
    back = tmp_path / "back.safetensors"
    assert cli("convert", out, "--to", "kohya", "-o", back)[0] == 0
    again = lorakit.load(back)
    assert set(again) == set(a)
    for n in a:
        torch.testing.assert_close(again[n].delta(D), a[n].delta(D), rtol=1e-6, atol=1e-6)
        assert abs(again.info(n).scale - a.info(n).scale) < 1e-9


# ---- base configs, ambiguity, bad input ----------------------------------------------------------------------
def test_transformers_config_as_base(tmp_path):
    pytest.importorskip("transformers")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 16,
                               "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                               "num_key_value_heads": 2, "vocab_size": 32}))
    path, refs = write(tmp_path / "x.safetensors", [
        ("lora_model_layers_1_self_attn_q_proj", "model.layers.1.self_attn.q_proj", 16, 16, 2, 1.0, False),
        ("lora_model_layers_0_mlp_gate_proj", "model.layers.0.mlp.gate_proj", 32, 16, 2, 4.0, False)])
    assert_refs(lorakit.load(path, base=cfg), refs)


def test_diffusers_unet_config_as_base(tmp_path):
    from lorakit.formats.keymaps import SDXL_UNET

    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **SDXL_UNET}))
    path, refs = write(tmp_path / "x.safetensors", [r for r in SDXL if r[0].startswith("lora_unet_")])
    assert_refs(lorakit.load(path, base=unet / "config.json"), refs)
    assert_refs(lorakit.load(path, base=tmp_path), refs)


def test_ambiguous_names_are_reported():
    km = KeyMap("toy")
    km.add("lora_a_b_c", "a.b_c")
    km.add("lora_a_b_c", "a_b.c")
    with pytest.raises(KeyMappingError, match="ambiguous"):
        km.resolve("lora_a_b_c")


def test_unmapped_stem_with_arch_is_an_error(tmp_path, cli):
    path, _ = write(tmp_path / "x.safetensors", [
        SD1[0], ("lora_unet_input_blocks_4_1_proj_in", "-", 8, 8, 2, 1.0, False)])
    with pytest.raises(KeyMappingError) as e:
        lorakit.load(path, arch="sd1")
    assert "lora_unet_input_blocks_4_1_proj_in" in str(e.value)
    code, _out, err = cli("inspect", path, "--arch", "sd1")
    assert code == 1
    assert "lora_unet_input_blocks_4_1_proj_in" in err and "hint:" in err and "--arch" in err
    # Without --arch, an unmappable mix keeps the stems and says so.
    a = lorakit.load(path)
    assert "lora_unet_input_blocks_4_1_proj_in" in a and any("stems" in n for n in a.meta.notes)


def test_arch_option_on_a_peft_file_is_ignored_with_a_note(tmp_path):
    from lorakit.testing import random_adapter

    out = lorakit.save(random_adapter({"model.q": (4, 3)}, rank=2), tmp_path / "p", format="peft")
    a = lorakit.load(out, arch="sdxl")
    assert any("arch" in n and "ignored" in n for n in a.meta.notes)


def test_written_names_survive_exactly(tmp_path):
    path, refs = write(tmp_path / "x.safetensors", SD1[:2])
    a = lorakit.load(path)
    out = tmp_path / "y.safetensors"
    lorakit.save(a, out, format="kohya")
    assert_refs(lorakit.load(out, arch="flux"), refs, 1e-6)  # lorakit.module_names wins over --arch


def test_kohya_pickle_refused_unless_allowed(tmp_path, cli):
    t, ref = kohya_module(SD1[0][0], 8, 8, 2, 1.0, seed=3)
    path = tmp_path / "x.bin"
    torch.save(t, path)
    with pytest.raises(UnsafeFileError):
        lorakit.load(path)
    code, _, _err = cli("convert", path, "--to", "peft", "-o", tmp_path / "o")
    assert code == 1 and not (tmp_path / "o").exists()
    a = lorakit.load(path, allow_pickle=True)
    assert_refs(a, {SD1[0][1]: ref})


def strip_lorakit_names(src, dst):
    """The same tensors without ``lorakit.module_names``: what another tool's file looks like."""
    from safetensors import safe_open

    with safe_open(str(src), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = {k: v for k, v in (fh.metadata() or {}).items() if k != "lorakit.module_names"}
    save_file(tensors, str(dst), metadata=meta)
    return set(tensors)


def test_flux_parts_are_fused_back_when_writing_kohya(tmp_path):
    from lorakit.adapter import Adapter

    d = 3072
    g = torch.Generator().manual_seed(5)
    mods = {  # PEFT/diffusers-named Flux modules with different ranks and scales per part
        "transformer.transformer_blocks.0.attn.to_q": (d, d, 2, 0.5),
        "transformer.transformer_blocks.0.attn.to_k": (d, d, 3, 2.0),
        "transformer.transformer_blocks.0.attn.to_v": (d, d, 1, 1.0),
        "transformer.single_transformer_blocks.2.proj_mlp": (4 * d, d, 2, 1.0),  # alone: other parts are zero
        "transformer.single_transformer_blocks.2.proj_out": (d, 5 * d, 2, 0.25),
    }
    a = Adapter({n: LoraFactors(torch.randn(r, i, generator=g), torch.randn(o, r, generator=g), s)
                 for n, (o, i, r, s) in mods.items()})
    out = tmp_path / "k.safetensors"
    lorakit.save(a, out, format="kohya")
    plain = tmp_path / "plain.safetensors"
    keys = strip_lorakit_names(out, plain)
    assert {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "lora_unet_single_blocks_2_linear1.alpha",
            "lora_unet_single_blocks_2_linear2.lora_up.weight"} <= keys
    x = torch.randn(5 * d, 2, generator=g, dtype=D)
    for path in (out, plain):
        back = lorakit.load(path)
        for n in mods:
            f, ref = back[n], a[n]
            k = ref.in_features
            torch.testing.assert_close(f.scale * (f.B.double() @ (f.A.double() @ x[:k])),
                                       ref.scale * (ref.B.double() @ (ref.A.double() @ x[:k])), rtol=1e-5, atol=1e-4)
        assert set(back) == set(mods)  # zero parts of the fused linear1 are left out
        assert [back.info(n).rank for n in mods] == [mods[n][2] for n in mods]  # each part keeps its own rank


def test_sdxl_written_with_sgm_stems(tmp_path):
    path, refs = write(tmp_path / "x.safetensors", SDXL)
    peft = tmp_path / "p"
    lorakit.save(lorakit.load(path), peft, format="peft")
    out = tmp_path / "k.safetensors"
    lorakit.save(lorakit.load(peft), out, format="kohya")
    plain = tmp_path / "plain.safetensors"
    keys = strip_lorakit_names(out, plain)
    assert {f"{stem}.lora_down.weight" for stem, *_ in SDXL} <= keys
    assert_refs(lorakit.load(plain), refs, 1e-6)


def test_sd2_text_encoder_depth_is_detected(tmp_path):
    path, refs = write(tmp_path / "x.safetensors", [
        SD1[0], ("lora_te_text_model_encoder_layers_22_mlp_fc2", "text_encoder.text_model.encoder.layers.22.mlp.fc2",
                 8, 12, 2, 1.0, False)])
    a = lorakit.load(path)  # detected as SD1 from the stems, but only SD2 has 23 text-encoder layers
    assert_refs(a, refs)
    path1, refs1 = write(tmp_path / "te1.safetensors", [
        SD1[0], ("lora_te1_text_model_encoder_layers_3_mlp_fc2", "text_encoder.text_model.encoder.layers.3.mlp.fc2",
                 8, 12, 2, 1.0, False)])
    assert_refs(lorakit.load(path1), refs1)  # lora_te1_ for an SD1 text encoder (written by other tools)
    with pytest.raises(KeyMappingError, match="layers_22"):
        lorakit.load(path, arch="sd1")
