"""diffusers LoRA files: one ``*.safetensors`` whose keys start with a component (``unet.``, ``transformer.``,
``text_encoder.``, ``text_encoder_2.``, ``prior.``...).

Read: the PEFT-style keys (``.lora_A.weight``/``.lora_B.weight``) and the older variants (``.lora.down.weight``,
``_lora.down.weight`` with ``.processor.``, ``.lora_linear_layer.down.weight``). Scale: from
``__metadata__["lora_adapter_metadata"]`` (per-component LoraConfig) when present, else from kohya-converted
``.alpha`` keys, else 1.0.

Write: PEFT-style keys, the factors unchanged, and ``lora_adapter_metadata`` carrying ``r``/``lora_alpha`` and
their patterns per component, so every module keeps its exact scale. Only module names that start with a
component are unambiguous here; others are refused with a pointer to the PEFT format.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorakit.adapter import Adapter, AdapterMeta
from lorakit.errors import FormatError, KeyMappingError
from lorakit.formats._lora import Roles, build_adapter, peft_magnitude, read_alpha
from lorakit.formats.base import Source, group_by_module
from lorakit.formats.peft import clean_alpha, factor_keys, factor_layout, peft_scale
from lorakit.io.files import loads_json
from lorakit.io.writer import SafetensorsWriter

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior", "decoder")
SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora.down.weight": "A",
    ".lora.up.weight": "B",
    "_lora.down.weight": "A",
    "_lora.up.weight": "B",
    ".lora_linear_layer.down.weight": "A",
    ".lora_linear_layer.up.weight": "B",
    ".lora_magnitude_vector": "magnitude",
    ".alpha": "alpha",
}
META_KEY = "lora_adapter_metadata"


def component_of(name: str) -> str | None:
    head = name.split(".", 1)[0]
    return head if head in COMPONENTS else None


# diffusers' old text-encoder keys name CLIP's attention projections as its own processors did.
OLD_TE_ATTN = {".self_attn.to_q": ".self_attn.q_proj", ".self_attn.to_k": ".self_attn.k_proj",
               ".self_attn.to_v": ".self_attn.v_proj", ".self_attn.to_out": ".self_attn.out_proj"}


def module_name(stem: str) -> str:
    """Normalise old-style stems: ``….processor.to_q`` → ``….to_q``, ``to_out`` → ``to_out.0``; text encoders'
    ``self_attn.to_q_lora`` (diffusers < 0.22) → ``self_attn.q_proj``."""
    name = stem.replace(".processor.", ".")
    if ".processor." in stem and name.endswith(".to_out"):
        name += ".0"
    if name.startswith("text_encoder"):
        for old, new in OLD_TE_ATTN.items():
            if name.endswith(old):
                name = name[: -len(old)] + new
    return name


# PEFT task types of language models: their modules may be called ``transformer.…`` (GPT-2, Falcon...) but no
# diffusers pipeline has them.
LM_TASKS = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


def refuse_inexact(adapter: Adapter, to: str) -> None:
    """Refuse, before anything is written, PEFT adapters whose diffusers/kohya file would load wrong: a
    ``fan_in_fan_out`` adapter (GPT-2 ``Conv1D``: its ΔW applies transposed, which no diffusers or kohya loader
    knows; a square ``c_proj`` would even be applied untransposed without an error), and, for diffusers,
    language-model adapters (no diffusion pipeline holds their modules; GPT-2's ``transformer.h.…`` would pass
    for a diffusers component). A kohya file keeps lorakit's module names, so other LM adapters may go there."""
    if adapter.meta.source_format != "peft":
        return
    cfg = adapter.meta.format_config
    src = adapter.meta.source_path
    if cfg.get("fan_in_fan_out"):
        raise FormatError(
            f"a PEFT fan_in_fan_out adapter (GPT-2 Conv1D weights stored (in, out)) has no exact {to} form: "
            f"{to} loaders apply ΔW untransposed", file=src, hint="keep it in the PEFT format (--to peft)",
        )
    task = str(cfg.get("task_type") or "").upper()
    if to == "diffusers" and task in LM_TASKS:
        raise FormatError(
            f"a PEFT {task} adapter is for a language model, not a diffusion pipeline; its {to} file would not "
            "load", file=src, hint="keep it in the PEFT format (--to peft)",
        )


class DiffusersFormat:
    name = "diffusers"
    description = "diffusers single file (component-prefixed keys, e.g. unet.…lora_A.weight)"
    writable = True

    def sniff(self, source: Source) -> bool:
        keys = source.keys
        if not keys or any(k.endswith(".lora_down.weight") for k in keys):
            return False
        lora = [k for k in keys if any(k.endswith(s) for s, role in SUFFIXES.items() if role in "AB")]
        return bool(lora) and all(component_of(k) for k in lora)

    def read(self, source: Source) -> Adapter:
        groups = group_by_module(source.keys, SUFFIXES)
        groups = {s: r for s, r in groups.items() if "A" in r or "B" in r}
        notes: list[str] = []
        configs: dict[str, dict[str, Any]] = {}
        if META_KEY in source.metadata:
            try:
                flat = loads_json(source.metadata[META_KEY])
            except ValueError as e:
                raise FormatError(f"metadata {META_KEY} is not valid JSON: {e}", file=source.path) from e
            if not isinstance(flat, dict):
                raise FormatError(f"metadata {META_KEY} is not a JSON object", file=source.path)
            for k, v in flat.items():
                comp, _, field = k.partition(".")
                configs.setdefault(comp, {})[field] = v
        no_alpha: list[str] = []

        def scale_of(stem: str, roles: Roles, rank: int) -> float:
            name = module_name(stem)
            comp = component_of(name)
            if comp in configs:
                return peft_scale(configs[comp], name[len(comp) + 1:], rank)[0]
            if "alpha" in roles:
                alpha = read_alpha(source, roles["alpha"])
                if alpha is not None:
                    return alpha / rank
            no_alpha.append(name)
            return 1.0

        meta = AdapterMeta(
            source_format=self.name, source_path=str(source.path), format_config=configs, metadata=source.metadata
        )
        adapter = build_adapter(source, groups, scale_of=scale_of, name_of=module_name, meta=meta,
                                flat_magnitude=True)
        if no_alpha:
            notes.append(f"{len(no_alpha)} module(s) store no alpha: scale 1.0 applies (diffusers convention)")
        return adapter.with_meta(notes=tuple(notes))

    def write(self, adapter: Adapter, path: Path, metadata: Mapping[str, str]) -> Path:
        refuse_inexact(adapter, "diffusers")
        by_comp: dict[str, list[str]] = {}
        for name in adapter:
            comp = component_of(name)
            if comp is None:
                from lorakit.formats.kohya import KOHYA_PREFIXES

                if name.startswith(KOHYA_PREFIXES):
                    raise KeyMappingError(
                        f"kohya stem {name!r} has no diffusers module name: the architecture was not recognised",
                        file=adapter.meta.source_path, key=name,
                        hint="pass --base with the base model's config (e.g. transformer/config.json) or --arch",
                    )
                raise KeyMappingError(
                    f"module {name!r} has no diffusers component prefix (unet., transformer., text_encoder....)",
                    file=adapter.meta.source_path, module=name, hint="write --to peft for language-model adapters",
                )
            by_comp.setdefault(comp, []).append(name)
        flat: dict[str, Any] = {}
        for comp, names in by_comp.items():
            ranks = {n: adapter.info(n).rank for n in names}
            alphas = {n: clean_alpha(adapter.info(n).scale * adapter.info(n).rank) for n in names}
            r = Counter(ranks.values()).most_common(1)[0][0]
            alpha = Counter(alphas.values()).most_common(1)[0][0]
            def rel(n: str, comp: str = comp) -> str:
                # PEFT matches targets and patterns as name suffixes: without CLIP's `text_model.` level they
                # match both transformers 4 (text_model.encoder…) and 5 (encoder…) module names.
                x = n[len(comp) + 1:]
                return x.removeprefix("text_model.") if comp.startswith("text_encoder") else x

            cfg = {
                "r": r,
                "lora_alpha": alpha,
                "rank_pattern": {rel(n): k for n, k in ranks.items() if k != r},
                "alpha_pattern": {rel(n): a for n, a in alphas.items() if a != alpha},
                "target_modules": sorted(rel(n) for n in names),
                "use_dora": any(adapter.info(n).has_magnitude for n in names),
            }
            flat.update({f"{comp}.{k}": v for k, v in cfg.items()})
        meta = {"format": "pt", **metadata, META_KEY: json.dumps(flat, sort_keys=True)}
        with SafetensorsWriter(path, meta, layout=factor_layout(adapter, prefix="")) as w:
            for name in adapter:
                f = adapter[name]
                for k, factor in zip(factor_keys(name, f.kind), f.stored()):
                    w.add(k, factor)
                if f.magnitude is not None:
                    w.add(f"{name}.lora_magnitude_vector", peft_magnitude(f, path, name))
        return path
