"""Key maps: kohya stems → diffusers/PEFT module names, built from the architecture's module list.

A kohya stem is ``prefix + module.replace(".", "_")``, which cannot be reversed by string replacement
(``to_q``, ``proj_in`` and ``transformer_blocks`` contain underscores). So, as ComfyUI does, we enumerate the
module names of the target architecture, in code, and index them by their stem:

- **SD 1.x / SD 2.x**: sd-scripts' U-Net copies diffusers naming, so ``lora_unet_<diffusers name>`` →
  ``unet.<diffusers name>``; CLIP ``lora_te_text_model_…`` → ``text_encoder.text_model.…``.
- **SDXL**: kohya uses SGM/LDM names (``input_blocks_4_1_…``). Each SGM block is paired with its diffusers
  block by the remap rule of diffusers (``layers_per_block`` L): ``input_blocks.i`` (i ≥ 1) →
  ``down_blocks.{(i-1)//(L+1)}.{resnets|attentions}.{(i-1)%(L+1)}``, ``middle_block.{0,1,2}`` →
  ``mid_block.{resnets.0, attentions.0, resnets.1}``, ``output_blocks.i`` → ``up_blocks.{i//(L+1)}…``;
  ``lora_te1_`` / ``lora_te2_`` → ``text_encoder.`` / ``text_encoder_2.``.
- **Flux**: BFL names (``double_blocks_0_img_attn_qkv``) → diffusers names. Fused projections map to several
  modules, each taking a block of the up factor's rows (:class:`Split`); see :func:`split_factors`.
- **A base model config** (``--base``): a diffusers ``unet/config.json``, ``transformer/config.json``, a model
  directory with ``model_index.json``, or any transformers ``config.json`` (the model is built on the meta
  device and its Linear/Conv modules listed).

All U-Net names are generated from a diffusers ``UNet2DConditionModel`` config, so SD1/SD2/SDXL differ only in
their config dicts below.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import FormatError, KeyMappingError
from lorakit.factors import LoraFactors

ARCHES = ("sd1", "sd2", "sdxl", "flux")

# ---- architecture configs (the fields of diffusers' configs that decide module names) -------------------
SD1_UNET: dict[str, Any] = {
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "layers_per_block": 2,
    "transformer_layers_per_block": 1,
}
SDXL_UNET: dict[str, Any] = {
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "addition_embed_type": "text_time",
}
FLUX_TRANSFORMER: dict[str, Any] = {
    "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24,
    "guidance_embeds": True, "mlp_ratio": 4.0,
}
CLIP_L_LAYERS, OPENCLIP_H_LAYERS, OPENCLIP_G_LAYERS, T5_XXL_LAYERS = 12, 23, 32, 24

# Module-name endings of 3×3 convolutions (for flattened LyCORIS tensors that do not carry the kernel).
CONV3X3_ENDINGS = ("conv1", "conv2", "conv", "conv_in", "conv_out", "in_layers.2", "out_layers.3", "op")
# ... and of 1×1 convolutions (a ResBlock's shortcut, in diffusers and SGM naming).
CONV1X1_ENDINGS = ("conv_shortcut", "skip_connection")


@dataclass(frozen=True)
class Split:
    """A fused module stored as one LoRA whose up-factor rows belong to several modules.

    ``parts`` lists ``(module name, row ranges)``: the part's ΔW rows are the fused ΔW rows in those ranges,
    in order (several ranges reorder rows, e.g. Flux's final AdaLN shift/scale swap).
    """

    parts: tuple[tuple[str, tuple[tuple[int, int], ...]], ...]

    @property
    def rows(self) -> int:
        return sum(b - a for _, ranges in self.parts for a, b in ranges)


@dataclass
class KeyMap:
    """kohya stem → module name (``names``) or → several modules (``splits``); ``ambiguous`` stems are those
    two module names share."""

    arch: str
    names: dict[str, str] = field(default_factory=dict)
    splits: dict[str, Split] = field(default_factory=dict)
    ambiguous: dict[str, list[str]] = field(default_factory=dict)

    def add(self, stem: str, name: str) -> None:
        prev = self.names.get(stem)
        if prev is not None and prev != name:
            self.ambiguous.setdefault(stem, [prev]).append(name)
            return
        self.names[stem] = name

    def update(self, other: KeyMap) -> None:
        for s, n in other.names.items():
            self.add(s, n)
        self.splits.update(other.splits)
        for s, ns in other.ambiguous.items():
            self.ambiguous.setdefault(s, []).extend(ns)

    def __contains__(self, stem: object) -> bool:
        return stem in self.names or stem in self.splits

    def resolve(self, stem: str, *, file: str | None = None) -> str | Split:
        """The module name (or split) of ``stem``; :class:`KeyMappingError` if unknown or ambiguous."""
        if stem in self.ambiguous:
            raise KeyMappingError(
                f"kohya stem {stem!r} is ambiguous for {self.arch}: {', '.join(self.ambiguous[stem])}",
                file=file, key=stem, hint="the base model has modules whose names differ only in '.' vs '_'",
            )
        if stem in self.splits:
            return self.splits[stem]
        if stem in self.names:
            return self.names[stem]
        raise KeyMappingError(
            f"kohya stem {stem!r} is not a module of {self.arch}", file=file, key=stem,
            hint="check --arch / --base: the file may be for another architecture (sd1, sdxl, flux or a config)",
        )


def stem_of(prefix: str, name: str) -> str:
    return prefix + name.replace(".", "_")


# ---- U-Net (diffusers UNet2DConditionModel) -------------------------------------------------------------
def _per_level(value: int | Sequence[int], n: int) -> list[int]:
    if isinstance(value, Sequence):
        return [int(v) for v in value]
    return [int(value)] * n


def _resnet(prefix: str, shortcut: bool) -> list[str]:
    names = [f"{prefix}.conv1", f"{prefix}.time_emb_proj", f"{prefix}.conv2"]
    return names + ([f"{prefix}.conv_shortcut"] if shortcut else [])


def _transformer(prefix: str, depth: int) -> list[str]:
    names = [f"{prefix}.proj_in", f"{prefix}.proj_out"]
    for k in range(depth):
        tb = f"{prefix}.transformer_blocks.{k}"
        for attn in ("attn1", "attn2"):
            names += [f"{tb}.{attn}.to_q", f"{tb}.{attn}.to_k", f"{tb}.{attn}.to_v", f"{tb}.{attn}.to_out.0"]
        names += [f"{tb}.ff.net.0.proj", f"{tb}.ff.net.2"]
    return names


def unet_blocks(cfg: Mapping[str, Any]) -> Iterator[tuple[str | None, str, list[str]]]:
    """Yield ``(sgm_block, diffusers_block, diffusers module names inside)`` for every U-Net block.

    ``sgm_block`` is the LDM/SGM name of the block (``input_blocks.4.1``) or ``None`` for names that only
    exist in diffusers. Module names inside a block are relative to the diffusers block.
    """
    ch = list(cfg["block_out_channels"])
    n = len(ch)
    L = int(cfg.get("layers_per_block", 2))
    depth_down = _per_level(cfg.get("transformer_layers_per_block", 1), n)
    down_attn = ["CrossAttn" in t for t in cfg["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in cfg["up_block_types"]]
    depth_up = list(reversed(depth_down))
    yield "input_blocks.0.0", "conv_in", [""]
    yield "time_embed.0", "time_embedding.linear_1", [""]
    yield "time_embed.2", "time_embedding.linear_2", [""]
    if cfg.get("addition_embed_type") == "text_time":
        yield "label_emb.0.0", "add_embedding.linear_1", [""]
        yield "label_emb.0.2", "add_embedding.linear_2", [""]
    prev = ch[0]
    for lv in range(n):
        for j in range(L):
            i = 1 + lv * (L + 1) + j
            cin = prev if j == 0 else ch[lv]
            yield f"input_blocks.{i}.0", f"down_blocks.{lv}.resnets.{j}", _resnet("", cin != ch[lv])
            if down_attn[lv]:
                yield f"input_blocks.{i}.1", f"down_blocks.{lv}.attentions.{j}", _transformer("", depth_down[lv])
        if lv < n - 1:
            yield f"input_blocks.{(lv + 1) * (L + 1)}.0.op", f"down_blocks.{lv}.downsamplers.0.conv", [""]
        prev = ch[lv]
    mid_depth = depth_down[-1]
    yield "middle_block.0", "mid_block.resnets.0", _resnet("", False)
    yield "middle_block.1", "mid_block.attentions.0", _transformer("", mid_depth)
    yield "middle_block.2", "mid_block.resnets.1", _resnet("", False)
    for u in range(n):
        for j in range(L + 1):
            i = u * (L + 1) + j
            yield f"output_blocks.{i}.0", f"up_blocks.{u}.resnets.{j}", _resnet("", True)
            if up_attn[u]:
                yield f"output_blocks.{i}.1", f"up_blocks.{u}.attentions.{j}", _transformer("", depth_up[u])
        if u < n - 1:
            i = u * (L + 1) + L
            yield f"output_blocks.{i}.{2 if up_attn[u] else 1}.conv", f"up_blocks.{u}.upsamplers.0.conv", [""]
    yield "out.2", "conv_out", [""]


# SGM names of the modules inside a ResBlock, by diffusers name.
_SGM_RESNET = {".conv1": ".in_layers.2", ".time_emb_proj": ".emb_layers.1", ".conv2": ".out_layers.3",
               ".conv_shortcut": ".skip_connection"}


def unet_keymap(cfg: Mapping[str, Any], *, prefix: str = "lora_unet_", component: str = "unet.",
                sgm: bool = False, arch: str = "unet") -> KeyMap:
    """Stems of every Linear/Conv module of a U-Net: diffusers-named stems, plus SGM-named ones if ``sgm``."""
    km = KeyMap(arch)
    for sgm_block, block, rel in unet_blocks(cfg):
        for r in rel:
            name = block + r
            km.add(stem_of(prefix, name), component + name)
            if sgm and sgm_block is not None:
                km.add(stem_of(prefix, sgm_block + _SGM_RESNET.get(r, r)), component + name)
    return km


# ---- text encoders --------------------------------------------------------------------------------------
def clip_keymap(layers: int, prefix: str, component: str, *, projection: bool = False) -> KeyMap:
    """CLIP text encoder (transformers ``CLIPTextModel`` names: ``text_model.encoder.layers.…`` as sd-scripts
    writes them, and ``encoder.layers.…`` as transformers 5 names the modules, each to its own spelling)."""
    km = KeyMap("clip")
    for i in range(layers):
        for base in (f"text_model.encoder.layers.{i}", f"encoder.layers.{i}"):
            for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                      "mlp.fc1", "mlp.fc2"):
                km.add(stem_of(prefix, f"{base}.{m}"), f"{component}{base}.{m}")
    if projection:
        km.add(stem_of(prefix, "text_projection"), f"{component}text_projection")
    return km


def t5_keymap(layers: int, prefix: str, component: str) -> KeyMap:
    """T5 encoder (transformers ``T5EncoderModel`` names, gated FFN as in T5 v1.1)."""
    km = KeyMap("t5")
    for i in range(layers):
        base = f"encoder.block.{i}.layer"
        for m in ("0.SelfAttention.q", "0.SelfAttention.k", "0.SelfAttention.v", "0.SelfAttention.o",
                  "1.DenseReluDense.wi_0", "1.DenseReluDense.wi_1", "1.DenseReluDense.wo"):
            km.add(stem_of(prefix, f"{base}.{m}"), f"{component}{base}.{m}")
    return km


# ---- Flux (BFL names → diffusers FluxTransformer2DModel) ------------------------------------------------
def flux_keymap(cfg: Mapping[str, Any] = FLUX_TRANSFORMER, *, prefix: str = "lora_unet_",
                component: str = "transformer.") -> KeyMap:
    """BFL stems of Flux; fused ``qkv`` / ``linear1`` / final AdaLN become :class:`Split` entries.

    Diffusers names are indexed too (``lora_transformer_…`` and ``lora_unet_transformer_blocks_…`` stems).
    """
    d = int(cfg["attention_head_dim"]) * int(cfg["num_attention_heads"])
    mlp = int(d * float(cfg.get("mlp_ratio", 4.0)))
    km = KeyMap("flux")
    c = component

    def one(bfl: str, diff: str) -> None:
        km.add(stem_of(prefix, bfl), c + diff)

    def split(bfl: str, parts: list[tuple[str, list[tuple[int, int]]]]) -> None:
        km.splits[stem_of(prefix, bfl)] = Split(tuple((c + n, tuple(r)) for n, r in parts))

    def thirds(names: list[str], extra: tuple[str, int] | None = None) -> list[tuple[str, list[tuple[int, int]]]]:
        parts = [(n, [(k * d, (k + 1) * d)]) for k, n in enumerate(names)]
        if extra:
            parts.append((extra[0], [(3 * d, 3 * d + extra[1])]))
        return parts

    diffusers_names: list[str] = []
    for i in range(int(cfg["num_layers"])):
        b, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
        split(f"{b}.img_attn.qkv", thirds([f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v"]))
        split(f"{b}.txt_attn.qkv", thirds([f"{t}.attn.add_q_proj", f"{t}.attn.add_k_proj", f"{t}.attn.add_v_proj"]))
        pairs = {"img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
                 "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2", "img_mod.lin": "norm1.linear",
                 "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
                 "txt_mod.lin": "norm1_context.linear"}
        for bfl, diff in pairs.items():
            one(f"{b}.{bfl}", f"{t}.{diff}")
        diffusers_names += [f"{t}.{x}" for x in (*pairs.values(), "attn.to_q", "attn.to_k", "attn.to_v",
                                                 "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")]
    for i in range(int(cfg["num_single_layers"])):
        b, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        split(f"{b}.linear1", thirds([f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v"], (f"{t}.proj_mlp", mlp)))
        one(f"{b}.linear2", f"{t}.proj_out")
        one(f"{b}.modulation.lin", f"{t}.norm.linear")
        diffusers_names += [f"{t}.{x}" for x in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out",
                                                 "norm.linear")]
    top = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
           "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
           "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
           "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
           "vector_in.out_layer": "time_text_embed.text_embedder.linear_2"}
    if cfg.get("guidance_embeds", True):
        top["guidance_in.in_layer"] = "time_text_embed.guidance_embedder.linear_1"
        top["guidance_in.out_layer"] = "time_text_embed.guidance_embedder.linear_2"
    for bfl, diff in top.items():
        one(bfl, diff)
    diffusers_names += [*top.values(), "norm_out.linear"]
    # BFL's final modulation is (shift, scale); diffusers' norm_out.linear is (scale, shift): swap the halves.
    split("final_layer.adaLN_modulation.1", [("norm_out.linear", [(d, 2 * d), (0, d)])])
    for n in diffusers_names:
        km.add(stem_of("lora_transformer_", n), c + n)
        km.add(stem_of(prefix, n), c + n)
    return km


def flux_config_from_stems(shapes: Mapping[str, tuple[int, int]], prefix: str = "lora_unet_") -> dict[str, Any]:
    """The Flux sizes a kohya file shows, from its stems' ``(out, in)``: the hidden size from a fused ``qkv``
    (rows / 3) or an attention output projection, the MLP width from ``linear1`` (rows − 3·hidden), the block
    counts from the highest indices. Sizes the file does not show keep the FLUX.1 values."""
    import re

    cfg = dict(FLUX_TRANSFORMER)
    d = None
    for stem, (out, inn) in shapes.items():
        if re.fullmatch(rf"{prefix}double_blocks_\d+_(img|txt)_attn_qkv", stem) and out % 3 == 0:
            d = out // 3
        elif re.fullmatch(rf"{prefix}double_blocks_\d+_(img|txt)_attn_proj", stem):
            d = d or out
    if d is None:
        return cfg
    cfg.update(attention_head_dim=d, num_attention_heads=1)
    layers = single = 0
    for stem, (out, _) in shapes.items():
        if re.fullmatch(rf"{prefix}single_blocks_\d+_linear1", stem) and out > 3 * d:
            cfg["mlp_ratio"] = (out - 3 * d) / d
        m = re.match(rf"{prefix}(double|single)_blocks_(\d+)_", stem)
        if m and m.group(1) == "double":
            layers = max(layers, int(m.group(2)) + 1)
        elif m:
            single = max(single, int(m.group(2)) + 1)
    cfg["num_layers"], cfg["num_single_layers"] = max(layers, 1), max(single, 1)
    return cfg


# ---- SD3 (diffusers SD3Transformer2DModel) ---------------------------------------------------------------
def sd3_module_names(cfg: Mapping[str, Any]) -> list[str]:
    """Linear/Conv module names of a diffusers ``SD3Transformer2DModel`` built from ``cfg`` (the last joint
    block is ``context_pre_only``: no context output projection or context MLP; ``dual_attention_layers``
    blocks have an ``attn2``)."""
    n = int(cfg.get("num_layers", 18))
    dual = set(cfg.get("dual_attention_layers") or ())
    names = ["pos_embed.proj", "time_text_embed.timestep_embedder.linear_1",
             "time_text_embed.timestep_embedder.linear_2", "time_text_embed.text_embedder.linear_1",
             "time_text_embed.text_embedder.linear_2", "context_embedder"]
    for i in range(n):
        t, last = f"transformer_blocks.{i}", i == n - 1
        names += [f"{t}.norm1.linear", f"{t}.norm1_context.linear"]
        names += [f"{t}.attn.{m}" for m in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj",
                                             "to_out.0")]
        if not last:
            names += [f"{t}.attn.to_add_out", f"{t}.ff_context.net.0.proj", f"{t}.ff_context.net.2"]
        if i in dual:
            names += [f"{t}.attn2.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0")]
        names += [f"{t}.ff.net.0.proj", f"{t}.ff.net.2"]
    return names + ["norm_out.linear", "proj_out"]


# ---- named architectures --------------------------------------------------------------------------------
def arch_keymap(arch: str) -> KeyMap:
    """The key map of a named architecture (``sd1``, ``sd2``, ``sdxl``, ``flux``)."""
    if arch in ("sd1", "sd2"):
        km = unet_keymap(SD1_UNET, arch=arch)
        layers = CLIP_L_LAYERS if arch == "sd1" else OPENCLIP_H_LAYERS
        km.update(clip_keymap(layers, "lora_te_", "text_encoder."))
        km.update(clip_keymap(layers, "lora_te1_", "text_encoder."))  # as other tools write SD1 files
    elif arch == "sdxl":
        km = unet_keymap(SDXL_UNET, sgm=True, arch=arch)
        km.update(clip_keymap(CLIP_L_LAYERS, "lora_te1_", "text_encoder."))
        km.update(clip_keymap(OPENCLIP_G_LAYERS, "lora_te2_", "text_encoder_2.", projection=True))
    elif arch == "flux":
        km = flux_keymap()
        km.update(clip_keymap(CLIP_L_LAYERS, "lora_te1_", "text_encoder."))
        km.update(t5_keymap(T5_XXL_LAYERS, "lora_te3_", "text_encoder_2."))
    else:
        raise KeyMappingError(f"unknown architecture {arch!r}; known: {', '.join(ARCHES)}",
                              hint="pass --base with the base model's config for other models")
    km.arch = arch
    return km


BASE_VERSIONS = {"sd_v1": "sd1", "sd_v2": "sd2", "sd_v2_v": "sd2", "sdxl_base_v1-0": "sdxl", "flux1": "flux"}


def detect_arch(stems: Sequence[str], metadata: Mapping[str, str]) -> str | None:
    """The architecture a kohya file is for: from ``ss_base_model_version``, else from its stems."""
    version = metadata.get("ss_base_model_version", "")
    for prefix, arch in sorted(BASE_VERSIONS.items(), key=lambda kv: -len(kv[0])):
        if version.startswith(prefix):
            return arch
    arch_meta = metadata.get("modelspec.architecture", "")
    if arch_meta.startswith("flux"):
        return "flux"
    if arch_meta.startswith("stable-diffusion-xl"):
        return "sdxl"
    joined = " ".join(stems)
    if "lora_unet_double_blocks_" in joined or "lora_unet_single_blocks_" in joined:
        return "flux"
    if "lora_unet_input_blocks_" in joined or "lora_unet_output_blocks_" in joined or "lora_te2_" in joined:
        return "sdxl"
    if "lora_unet_down_blocks_" in joined or "lora_unet_up_blocks_" in joined or "lora_te_" in joined:
        return "sd1"
    return None


# ---- base model configs ---------------------------------------------------------------------------------
KOHYA_COMPONENT_PREFIXES = {"unet": ["lora_unet_"], "transformer": ["lora_unet_", "lora_transformer_"],
                            "text_encoder": ["lora_te_", "lora_te1_"], "text_encoder_2": ["lora_te2_"],
                            "text_encoder_3": ["lora_te3_"]}
GENERIC_PREFIXES = ["lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_transformer_", "lora_"]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FormatError(f"cannot read the base model config: {e}", file=path) from e
    if not isinstance(data, dict):
        raise FormatError("the base model config is not a JSON object", file=path)
    return data


def transformers_module_names(config: Mapping[str, Any]) -> list[str]:
    """Linear/Conv module names of a transformers model, built from its config on the meta device."""
    from lorakit._deps import require

    transformers = require("transformers", "peft")
    cfg_dict = dict(config)
    model_type = cfg_dict.pop("model_type", None)
    if model_type is None:
        raise FormatError("config.json has no model_type (not a transformers config)")
    cfg = transformers.AutoConfig.for_model(model_type, **cfg_dict)
    arch = (cfg_dict.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with torch.device("meta"):
        model = cls(cfg) if cls is not None else transformers.AutoModel.from_config(cfg)
    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    return [n for n, m in model.named_modules() if isinstance(m, kinds) or type(m).__name__ == "Conv1D"]


def _names_keymap(names: Sequence[str], prefixes: Sequence[str], component: str, arch: str) -> KeyMap:
    km = KeyMap(arch)
    for name in names:
        for p in prefixes:
            km.add(stem_of(p, name), component + name)
    return km


def component_keymap(config: Mapping[str, Any], component: str = "") -> KeyMap:
    """The key map of one model config (diffusers U-Net / Flux transformer, or a transformers model)."""
    cls = str(config.get("_class_name", ""))
    prefixes = KOHYA_COMPONENT_PREFIXES.get(component.rstrip("."), GENERIC_PREFIXES)
    comp = component or ({"UNet2DConditionModel": "unet.", "FluxTransformer2DModel": "transformer.",
                          "SD3Transformer2DModel": "transformer."}.get(cls, ""))
    if cls == "UNet2DConditionModel":
        km = KeyMap("unet")
        for p in prefixes if component else ["lora_unet_"]:
            km.update(unet_keymap(config, prefix=p, component=comp, sgm=True))
        return km
    if cls == "FluxTransformer2DModel":
        return flux_keymap({**FLUX_TRANSFORMER, **config}, component=comp)
    if cls == "SD3Transformer2DModel":
        return _names_keymap(sd3_module_names(config), ["lora_transformer_", "lora_unet_"], comp or "transformer.",
                             "sd3")
    if "model_type" in config:
        return _names_keymap(transformers_module_names(config), prefixes, comp, str(config["model_type"]))
    raise FormatError(f"unrecognised base model config (class {cls or 'unknown'}): expected a diffusers "
                      "UNet2DConditionModel / FluxTransformer2DModel / SD3Transformer2DModel config or a transformers config.json")


def is_checkpoint(base: str | Path) -> bool:
    """True when ``base`` is a weights checkpoint (a ``.safetensors`` file, or a directory of shards with no
    ``config.json`` / ``model_index.json``), not a config: it gives weight shapes (conv kernels), not names."""
    p = Path(base)
    if p.is_file():
        return p.suffix == ".safetensors"
    return p.is_dir() and not (p / "config.json").is_file() and not (p / "model_index.json").is_file() \
        and any(p.glob("*.safetensors"))


def base_weight_shapes(base: str | Path) -> dict[str, tuple[int, ...]] | None:
    """``tensor name → shape`` from a base checkpoint's headers (see :func:`is_checkpoint`), else ``None``."""
    if not is_checkpoint(base):
        return None
    from lorakit.io.checkpoint import Checkpoint

    ckpt = Checkpoint(base)
    keys = ckpt.keys()
    return {k: tuple(ckpt.shape(k)) for k in keys}


def base_keymap(path: str | Path) -> KeyMap:
    """The key map of a base model given as a config file or a (diffusers or transformers) model directory."""
    p = Path(path)
    if not p.exists():
        raise FormatError("base model config not found", file=p)
    if p.is_file():
        comp = p.parent.name + "." if p.parent.name in KOHYA_COMPONENT_PREFIXES else ""
        km = component_keymap(_read_json(p), comp)
    elif (p / "model_index.json").is_file() or any((p / c / "config.json").is_file() for c in
                                                   KOHYA_COMPONENT_PREFIXES):
        km = KeyMap("base")
        for comp in KOHYA_COMPONENT_PREFIXES:
            if (p / comp / "config.json").is_file():
                km.update(component_keymap(_read_json(p / comp / "config.json"), comp + "."))
    elif (p / "config.json").is_file():
        km = component_keymap(_read_json(p / "config.json"))
    else:
        raise FormatError("no config.json (or model_index.json) in the base model directory", file=p)
    km.arch = f"base model {p}"
    return km


# ---- splitting fused modules ----------------------------------------------------------------------------
def split_factors(f: LoraFactors, split: Split, *, file: str | None = None,
                  module: str | None = None) -> dict[str, LoraFactors]:
    """Exact per-module LoRAs of a fused one: part ``p`` has ``ΔW_p = ΔW[rows of p] = s·B[rows of p] @ A``.

    The down factor is shared (copying it to every part, never slicing it, is what keeps a fused LoRA exact);
    each part then drops the rank columns its rows of ``B`` do not use, which is exact too. So sd-scripts'
    ``split_qkv`` layout (down ``(n·r, in)``, up block-diagonal) gives each part its own rank-``r`` block, and a
    part whose rows are all zero (written by :func:`fuse_factors` for a module the adapter lacks) is left out.
    The scale is the file's, ``alpha / rows(down)``.
    """
    if f.out_features != split.rows:
        raise KeyMappingError(
            f"fused module has {f.out_features} output rows, expected {split.rows} for {len(split.parts)} parts",
            file=file, module=module, hint="the file may be for a Flux variant with other sizes: pass --base",
        )
    out: dict[str, LoraFactors] = {}
    for name, ranges in split.parts:
        B = torch.cat([f.B[a:b] for a, b in ranges])
        used = B.ne(0).any(dim=0)
        if not bool(used.any()):
            continue
        A = f.A
        if not bool(used.all()):
            A, B = A[used], B[:, used]
        mag = None if f.magnitude is None else torch.cat([f.magnitude.reshape(-1)[a:b] for a, b in ranges])
        out[name] = f.with_(A=A.contiguous(), B=B.contiguous(), magnitude=mag)
    return out


# ---- writing: the stems an architecture's own tools expect ----------------------------------------------
def flux_config_of(shapes: Mapping[str, tuple[int, int]], component: str = "transformer.") -> dict[str, Any]:
    """The Flux sizes that decide the fused layouts, read from an adapter's module shapes ``name → (out, in)``:
    the hidden size from an attention projection, the single-block MLP width from ``proj_mlp``, the block counts
    from the highest block indices. Sizes no module shows keep the FLUX.1 values."""
    import re

    cfg = dict(FLUX_TRANSFORMER)
    d = mlp = None
    layers = single = 0
    for name, (out, inn) in shapes.items():
        if not name.startswith(component):
            continue
        rel = name[len(component):]
        if re.search(r"\.attn\.(to_[qkv]|add_[qkv]_proj)$", rel):
            d = out
        elif re.search(r"\.attn\.(to_out\.0|to_add_out)$", rel) or rel.endswith(".norm1.linear"):
            d = d or inn
        if rel.endswith(".proj_mlp"):
            mlp = out
        m = re.match(r"(single_)?transformer_blocks\.(\d+)\.", rel)
        if m:
            if m.group(1):
                single = max(single, int(m.group(2)) + 1)
            else:
                layers = max(layers, int(m.group(2)) + 1)
    if d is not None:
        cfg.update(attention_head_dim=d, num_attention_heads=1)
        if mlp is not None:
            cfg["mlp_ratio"] = mlp / d
    cfg["num_layers"] = max(layers, 1) if d is not None else cfg["num_layers"]
    cfg["num_single_layers"] = max(single, 1) if d is not None else cfg["num_single_layers"]
    return cfg


def writer_stems(arch: str, flux_config: Mapping[str, Any] | None = None) -> tuple[dict[str, str], dict[str, Split]]:
    """``module name → kohya stem`` as sd-scripts names it for ``arch`` (SGM stems for SDXL, BFL stems for
    Flux, ``lora_te_`` for SD1/SD2), and the fused stems whose parts :func:`fuse_factors` joins (Flux; their
    row layout from ``flux_config``, see :func:`flux_config_of`)."""
    km = arch_keymap(arch)
    if arch == "flux" and flux_config is not None:
        fk = flux_keymap(flux_config)
        km.names.update(fk.names)  # same stems, sizes of this model
        km.splits = fk.splits
    preferred: dict[str, str] = {}
    if arch == "sdxl":
        for sgm_block, block, rel in unet_blocks(SDXL_UNET):
            for r in rel:
                if sgm_block is not None:
                    preferred["unet." + block + r] = stem_of("lora_unet_", sgm_block + _SGM_RESNET.get(r, r))
    for stem, name in km.names.items():  # first stem added wins: the architecture's own naming
        preferred.setdefault(name, stem)
    return preferred, dict(km.splits)


FLUX_ONLY = ("transformer.single_transformer_blocks.", "transformer.x_embedder",
             "transformer.time_text_embed.guidance_embedder.")


def write_arch(names: Sequence[str], metadata: Mapping[str, str]) -> str | None:
    """The architecture whose kohya naming to write: from metadata, else the one whose module list holds
    every ``unet.`` / ``transformer.`` name (and, for SDXL vs SD1, only one of them does)."""
    found = detect_arch([], metadata)
    if found:
        return found
    tr = [n for n in names if n.startswith("transformer.")]
    # SD3's MMDiT shares Flux's double-block names: only modules Flux alone has say Flux.
    if tr and any(n.startswith(FLUX_ONLY) for n in tr):
        flux = writer_stems("flux")[0]
        if all(n in flux for n in tr):
            return "flux"
    unet = [n for n in names if n.startswith("unet.")]
    if unet:
        xl, sd1 = writer_stems("sdxl")[0], writer_stems("sd1")[0]
        in_xl, in_sd1 = all(n in xl for n in unet), all(n in sd1 for n in unet)
        if in_xl != in_sd1:
            return "sdxl" if in_xl else "sd1"
    return None


def fuse_factors(parts: Mapping[str, LoraFactors], split: Split) -> LoraFactors | None:
    """One fused LoRA holding ``parts`` (a subset of ``split``'s modules), exactly: the downs stacked
    ``(Σ r_p, in)``, the up block-diagonal with each part's rows placed where the fused module has them, part
    scales folded into the up relative to a common scale ``s`` (written as ``alpha = s·Σ r_p``, which is what
    readers divide by). ``None`` when the parts do not fit (other sizes, DoRA, conv)."""
    present = [(n, rng, parts[n]) for n, rng in split.parts if n in parts]
    if not present:
        return None
    ins = {f.in_features for _, _, f in present}
    if len(ins) != 1 or any(f.kind != "linear" or f.magnitude is not None or f.extras for _, _, f in present):
        return None
    if any(f.out_features != sum(b - a for a, b in rng) for _, rng, f in present):
        return None
    scale = max((abs(f.scale) for _, _, f in present), default=1.0) or 1.0
    dt = present[0][2].A.dtype
    R = sum(f.rank for _, _, f in present)
    B = torch.zeros(split.rows, R, dtype=torch.float32 if dt in (torch.float16, torch.bfloat16) else dt)
    col = 0
    for _, ranges, f in present:
        Bp = f.B.to(B.dtype) * (f.scale / scale)
        row = 0
        for a, b in ranges:
            B[a:b, col:col + f.rank] = Bp[row:row + (b - a)]
            row += b - a
        col += f.rank
    A = torch.cat([f.A.to(B.dtype) for _, _, f in present])
    return LoraFactors(A.to(dt), B.to(dt), scale)
