"""kohya / sd-scripts LoRA (and LyCORIS LoCon): ``<stem>.lora_down.weight``, ``<stem>.lora_up.weight``,
``<stem>.alpha`` (0-d), optional ``<stem>.lora_mid.weight`` (Tucker conv) and ``<stem>.dora_scale``.

Scale: ``alpha / r`` with ``r = lora_down.shape[0]``; a missing alpha, or alpha 0, means ``alpha = r`` (scale 1).

Names: ``stem = prefix + "_" + module_path.replace(".", "_")`` loses information, so module names are
recovered, in order of preference, from

1. ``lorakit.module_names`` in the file's metadata (written by lorakit: converts back exactly);
2. an explicit key map, ``arch`` (``sd1``/``sd2``/``sdxl``/``flux``) or ``base`` config (see
   :mod:`lorakit.formats.keymaps`): every stem must map, else :class:`KeyMappingError`;
3. the architecture detected from the metadata or the stems, if its map places every stem;
4. otherwise the stem itself is the module name (the adapter still merges with other kohya files).

Fused Flux modules (``qkv``, ``linear1``) are split exactly into per-projection modules on reading and fused
back on writing (:func:`lorakit.formats.keymaps.split_factors` / :func:`~lorakit.formats.keymaps.fuse_factors`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

from lorakit.adapter import Adapter, AdapterMeta, ModuleInfo
from lorakit.errors import FormatError, KeyMappingError
from lorakit.factors import LoraFactors
from lorakit.formats._lora import Roles, build_adapter, kohya_magnitude_shape, read_alpha
from lorakit.formats.base import Source, group_by_module
from lorakit.formats.keymaps import (
    ARCHES,
    KeyMap,
    Split,
    arch_keymap,
    base_keymap,
    detect_arch,
    flux_config_from_stems,
    flux_config_of,
    flux_keymap,
    fuse_factors,
    is_checkpoint,
    split_factors,
    write_arch,
    writer_stems,
)
from lorakit.io.files import loads_json
from lorakit.io.writer import Layout, SafetensorsWriter

SUFFIXES = {
    ".lora_down.weight": "A",
    ".lora_up.weight": "B",
    ".lora_mid.weight": "mid",
    ".alpha": "alpha",
    ".dora_scale": "magnitude",
}
NAMES_KEY = "lorakit.module_names"
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_transformer_", "lycoris_")
# Component prefixes of diffusers-style module names and their kohya counterparts.
COMPONENT_TO_KOHYA = {
    "unet.": "lora_unet_",
    "transformer.": "lora_transformer_",  # OneTrainer / ComfyUI for diffusers-named DiT modules (Flux: BFL)
    "text_encoder.": "lora_te1_",
    "text_encoder_2.": "lora_te2_",
    "text_encoder_3.": "lora_te3_",
}


def _given(f: LoraFactors) -> LoraFactors:
    """A loader for factors already in hand (a fused module assembled while writing)."""
    return f


def kohya_stem(module: str) -> str:
    """The kohya stem of a module name: component prefix mapped, every ``.`` replaced by ``_``."""
    for comp, prefix in COMPONENT_TO_KOHYA.items():
        if module.startswith(comp):
            return prefix + module[len(comp):].replace(".", "_")
    if module.startswith(KOHYA_PREFIXES):
        return module
    return "lora_" + module.replace(".", "_")


Names = dict[str, "str | Split"]  # stem -> module name, or the modules a fused stem splits into


def name_or_stem(names: Names, stem: str) -> str:
    """The adapter name of a stem before splitting (split stems keep their stem until :func:`apply_splits`)."""
    target = names.get(stem, stem)
    return target if isinstance(target, str) else stem


def resolve_names(
    source: Source,
    stems: list[str],
    *,
    keymap: Mapping[str, str] | KeyMap | None = None,
    arch: str | None = None,
    base: str | Path | None = None,
) -> tuple[Names, list[str]]:
    """Module names for kohya ``stems``, and notes saying how they were found.

    Order: ``lorakit.module_names`` metadata (exact, written by lorakit); an explicit ``keymap``, ``base`` model
    config or ``arch`` (every stem must map, else :class:`KeyMappingError`); the architecture detected from
    ``ss_base_model_version`` or the stems (used only if every stem maps); otherwise the stems themselves.
    """
    stored: dict[str, str] = {}
    if NAMES_KEY in source.metadata:
        try:
            raw = loads_json(source.metadata[NAMES_KEY])
        except ValueError as e:
            raise FormatError(f"metadata {NAMES_KEY} is not valid JSON: {e}", file=source.path) from e
        if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
            raise FormatError(f"metadata {NAMES_KEY} is not a mapping of stems to module names", file=source.path)
        stored = dict(raw)
        stems = [s for s in stems if s not in stored]
        if not stems:
            return dict(stored), []
    names, notes = _map_stems(source, stems, keymap=keymap, arch=arch, base=base)
    return {**stored, **names}, notes


def _map_stems(
    source: Source,
    stems: list[str],
    *,
    keymap: Mapping[str, str] | KeyMap | None,
    arch: str | None,
    base: str | Path | None,
) -> tuple[Names, list[str]]:
    file = str(source.path)
    explicit = keymap is not None or arch is not None or base is not None
    km: KeyMap | None = None
    if isinstance(keymap, KeyMap):
        km = keymap
    elif keymap is not None:
        km = KeyMap("the given key map", names=dict(keymap))
    elif base is not None:
        km = base_keymap(base)
    elif arch is not None:
        km = arch_keymap(arch)
    else:
        detected = detect_arch(stems, source.metadata)
        km = arch_keymap(detected) if detected else None
        if detected == "flux":  # fused layouts at the sizes this file has (Flux variants, tiny test models)
            sized = flux_keymap(flux_config_from_stems(_stem_shapes(source, stems)))
            km = arch_keymap("flux")
            km.splits = sized.splits
        if km is not None and any(s not in km for s in stems):
            # A close relative may fit (SD2's text encoder is deeper than SD1's): take the first that maps all.
            for other in ARCHES:
                cand = arch_keymap(other) if other != detected else km
                if all(s in cand and s not in cand.ambiguous for s in stems):
                    km = cand
                    break
    if km is None:
        return {}, ["module names are kohya stems (architecture not recognised); pass --arch or --base to map them"]
    if explicit:
        return {s: km.resolve(s, file=file) for s in stems}, [f"module names mapped by the {km.arch} key map"]
    unmapped = [s for s in stems if s not in km or s in km.ambiguous]
    if unmapped:
        return {}, [
            (f"looks like {km.arch}, but {len(unmapped)} stem(s) are not in its key map (e.g. {unmapped[0]!r}); "
             "module names are kohya stems; pass --arch or --base to map them")
        ]
    return {s: km.resolve(s, file=file) for s in stems}, [f"module names mapped by the {km.arch} key map (detected)"]


def _alpha_text(a: float) -> str:
    return str(int(a)) if float(a).is_integer() else str(a)


def key_as_written(stem: str, roles: Roles) -> str:
    """The key errors about a kohya/LyCORIS module name: its down (or first) tensor, as the file spells it."""
    for role in ("A", "hada_w1_a", "lokr_w1", "lokr_w1_a", "B"):
        if role in roles:
            return roles[role]
    return next(iter(roles.values()), stem)


def _stem_shapes(source: Source, stems: list[str]) -> dict[str, tuple[int, int]]:
    """``stem → (rows of lora_up, columns of lora_down)`` from the header, for the stems that are LoRA pairs."""
    out: dict[str, tuple[int, int]] = {}
    keys = set(source.keys)
    for s in stems:
        up, down = f"{s}.lora_up.weight", f"{s}.lora_down.weight"
        if up in keys and down in keys:
            a, b = source.store.shape(down), source.store.shape(up)
            out[s] = (b[0], math.prod(a[1:]))
    return out


def apply_splits(adapter: Adapter, names: Names, *, file: str | None = None) -> Adapter:
    """Replace every fused module (a stem mapped to a :class:`Split`) by its exact per-projection parts.

    Fused modules are read now (their parts' ranks depend on whether the up factor is block-diagonal); the
    others stay lazy.
    """
    splits = {s: t for s, t in names.items() if isinstance(t, Split)}
    if not splits:
        return adapter
    modules: dict[str, LoraFactors | object] = {}
    infos: dict[str, ModuleInfo] = {}
    for name in adapter:
        if name in splits:
            for part, f in split_factors(adapter[name], splits[name], file=file, module=name).items():
                if part in modules:
                    raise FormatError("two tensor groups map to the same module", file=file, module=part)
                modules[part] = f
                infos[part] = ModuleInfo.of(part, f)
        else:
            if name in modules:
                raise FormatError("two tensor groups map to the same module", file=file, module=name)
            modules[name] = lambda name=name: adapter[name]
            infos[name] = adapter.info(name)
    return Adapter(modules, adapter.meta, infos)  # type: ignore[arg-type]


def _layout(stems: list[tuple[str, ModuleInfo]]) -> Layout:
    """What :meth:`KohyaFormat.write` stores for each ``(stem, info)``, from the infos alone, for the writer to
    put each tensor in place (a wrong prediction, e.g. a per-input DoRA magnitude, costs only the speed)."""
    import torch

    layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for stem, i in stems:
        down, up = i.stored_shapes
        layout[f"{stem}.lora_down.weight"] = (i.dtype, down)
        layout[f"{stem}.lora_up.weight"] = (i.dtype, up)
        layout[f"{stem}.alpha"] = (torch.float32, ())
        if i.has_magnitude:  # per output row (a per-input one differs: the appending route)
            layout[f"{stem}.dora_scale"] = (i.dtype, kohya_magnitude_shape(i.kind, i.out_features))
    return layout


class KohyaFormat:
    name = "kohya"
    description = "kohya / sd-scripts single file (lora_down / lora_up / alpha), also LyCORIS LoCon"
    writable = True

    def sniff(self, source: Source) -> bool:
        return any(k.endswith(".lora_down.weight") for k in source.keys)

    def read(self, source: Source, keymap: Mapping[str, str] | KeyMap | None = None, arch: str | None = None,
             base: str | Path | None = None) -> Adapter:
        """Read a kohya file; ``keymap`` / ``arch`` / ``base`` name its modules (see :func:`resolve_names`)."""
        groups = group_by_module(source.keys, SUFFIXES)
        if base is not None and is_checkpoint(base):
            base = None  # a weights checkpoint gives kernels (LyCORIS); LoRA factors store theirs
        names, notes = resolve_names(source, list(groups), keymap=keymap, arch=arch, base=base)
        missing_alpha: list[str] = []

        def scale_of(stem: str, roles: Roles, rank: int) -> float:
            alpha = read_alpha(source, roles["alpha"]) if "alpha" in roles else None
            if alpha is None:
                missing_alpha.append(stem)
                return 1.0
            return alpha / rank

        used = {k for roles in groups.values() for k in roles.values()}
        passthrough = {k: (lambda k=k: source.store.get(k)) for k in source.keys if k not in used}
        meta = AdapterMeta(
            base_model=source.metadata.get("ss_sd_model_name") or source.metadata.get("modelspec.architecture"),
            source_format=self.name,
            source_path=str(source.path),
            format_config={k: v for k, v in source.metadata.items() if k != NAMES_KEY},
            metadata=source.metadata,
            passthrough=passthrough,
        )
        adapter = build_adapter(source, groups, scale_of=scale_of, name_of=lambda s: name_or_stem(names, s),
                                meta=meta, key_of=key_as_written)
        if not len(adapter):
            raise FormatError("no LoRA modules (lora_down/lora_up pairs) found", file=source.path)
        adapter = apply_splits(adapter, names, file=str(source.path))
        if missing_alpha:
            notes.append(
                f"{len(missing_alpha)} module(s) store no alpha: kohya's convention applies (alpha = rank, scale 1.0)"
            )
        return adapter.with_meta(notes=tuple(notes))

    def write(self, adapter: Adapter, path: Path, metadata: Mapping[str, str]) -> Path:
        """Write kohya stems as the architecture's own tools name them (SGM for SDXL, BFL for Flux, with Flux
        q/k/v and ``linear1`` parts fused back exactly), else ``prefix + name.replace(".", "_")``; the stem →
        name map is stored in ``lorakit.module_names`` so lorakit reads the names back exactly."""
        from lorakit.formats.diffusers import refuse_inexact

        refuse_inexact(adapter, "kohya")
        carried = dict(adapter.meta.format_config) if adapter.meta.source_format == "kohya" else {}
        arch = write_arch(list(adapter), {**carried, **metadata})
        flux_cfg = flux_config_of({n: adapter.info(n).shape for n in adapter}) if arch == "flux" else None
        preferred, fusions = writer_stems(arch, flux_cfg) if arch else ({}, {})
        # (stem, loader, module name or None for fused modules)
        items: list[tuple[str, Callable[[], LoraFactors], str | None]] = []
        fused_names: set[str] = set()
        for stem, split in fusions.items():
            names = [n for n, _ in split.parts if n in adapter]
            if not names:
                continue
            f = fuse_factors({n: adapter[n] for n in names}, split)
            if f is not None:
                items.append((stem, partial(_given, f), None))
                fused_names.update(names)
        for name in adapter:
            if name not in fused_names:
                items.append((preferred.get(name) or kohya_stem(name), partial(adapter.__getitem__, name), name))
        seen: dict[str, str] = {}
        for stem, _, module in items:
            if stem in seen:
                raise KeyMappingError(f"two modules map to the kohya stem {stem!r}", module=module or seen[stem],
                                      key=stem)
            seen[stem] = module or stem
        infos = {n: adapter.info(n) for n in adapter if n not in fused_names}
        ranks = {i.rank for i in infos.values()}
        alphas = {i.scale * i.rank for i in infos.values()}
        if fused_names:
            ranks.add(-1)  # fused modules have their own ranks: report "Dynamic"
        meta = {
            **carried,
            "ss_network_module": carried.get("ss_network_module", "networks.lora"),
            "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
            "ss_network_alpha": _alpha_text(alphas.pop()) if len(alphas) == 1 and not fused_names else "Dynamic",
            **metadata,
            NAMES_KEY: json.dumps({stem: name for stem, _, name in items if name is not None}),
        }
        import torch

        layout = None if adapter.meta.source_format == "kohya" and adapter.meta.passthrough else _layout(
            [(stem, adapter.info(name) if name is not None else ModuleInfo.of(stem, load())) for stem, load, name in items])
        with SafetensorsWriter(path, meta, layout=layout) as w:
            for stem, load, _ in items:
                f = load()
                A, B = f.stored()
                w.add(f"{stem}.lora_down.weight", A)
                w.add(f"{stem}.lora_up.weight", B)
                # alpha = s·r keeps the effective scale: every reader computes alpha / rows(lora_down).
                w.add(f"{stem}.alpha", torch.tensor(f.scale * f.rank, dtype=torch.float32))
                if f.magnitude is not None:
                    mag = f.magnitude
                    if mag.ndim == 1:  # per output row: LyCORIS/ComfyUI layout (out, 1) or (out, 1, 1, 1)
                        mag = mag.reshape(kohya_magnitude_shape(f.kind, f.out_features))
                    w.add(f"{stem}.dora_scale", mag)
            if adapter.meta.source_format == "kohya":
                for k, load_t in adapter.meta.passthrough.items():
                    w.add(k, load_t())
        return path
