"""PEFT LoRA: ``adapter_config.json`` + ``adapter_model.safetensors`` in a directory.

Keys: ``base_model.model.<module>.lora_A.weight`` ``(r, in[, kh, kw])``, ``….lora_B.weight``
``(out, r[, 1, 1])``, ``….lora_magnitude_vector`` (DoRA, ``(out,)``), ``….lora_embedding_A/B`` (embeddings,
``A (r, num_embeddings)``, ``B (dim, r)``), ``….lora_B.bias`` (``lora_bias``: the bias update is
``Δb = s·lora_B.bias``, kept as ``extras["bias"] = Δb``). Other tensors under ``base_model.model.`` are whole base
tensors (``modules_to_save``, ``bias="all"``, saved embedding layers), kept as ``meta.full_tensors``; anything
else (trainable tokens) is carried through untouched.

The config is checked (:func:`check_config`): a value of the wrong type, NaN or infinite is refused naming the
key as written.

Scale per module (PEFT ``LoraModel`` semantics): the first ``rank_pattern``/``alpha_pattern`` key ``p`` with
``re.match(rf"(.*\\.)?({p})$", module)`` overrides ``r``/``lora_alpha``; ``s = α/r`` or ``α/√r`` with
``use_rslora``. The rank is taken from the tensor; where the config disagrees, a note says so.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lorakit.adapter import Adapter, AdapterMeta, FullTensor
from lorakit.errors import ConfigValueError, FormatError
from lorakit.factors import LayerKind, LoraFactors
from lorakit.formats._lora import Roles, build_adapter, peft_magnitude, peft_magnitude_shape
from lorakit.formats.base import Source, group_by_module
from lorakit.io.atomic import atomic_output
from lorakit.io.files import loads_json
from lorakit.io.writer import Layout, SafetensorsWriter

PREFIX = "base_model.model."
# A single-file PEFT adapter written by lorakit carries its adapter_config.json here.
CONFIG_META_KEY = "lorakit.peft_config"
SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "bias",
    ".lora_embedding_A": "A",
    ".lora_embedding_B": "B",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
}
# Config keys that mark a LoRA variant whose ΔW is not scale·B@A.
VARIANT_KEYS = ("alora_invocation_tokens", "use_bdlora", "kasa_config", "velora_config", "monteclora_config")
DEFAULT_CONFIG: dict[str, Any] = {
    "peft_type": "LORA",
    "task_type": None,
    "base_model_name_or_path": None,
    "revision": None,
    "inference_mode": True,
    "r": 8,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "use_rslora": False,
    "use_dora": False,
    "fan_in_fan_out": False,
    "bias": "none",
    "init_lora_weights": True,
    "rank_pattern": {},
    "alpha_pattern": {},
    "modules_to_save": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "target_modules": [],
}


def _kind_of_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    return "a list" if isinstance(v, list) else "an object" if isinstance(v, dict) else type(v).__name__


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


# key -> (check, what it must be); null is accepted (PEFT writes null for unset options) except for NOT_NULL
NOT_NULL = ("r", "lora_alpha")
_CONFIG_TYPES: dict[str, tuple[Any, str]] = {
    "peft_type": (lambda v: isinstance(v, str), "a string"),
    "base_model_name_or_path": (lambda v: isinstance(v, str), "a string"),
    "revision": (lambda v: isinstance(v, str), "a string"),
    "task_type": (lambda v: isinstance(v, str), "a string"),
    "r": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "lora_alpha": (_is_number, "a finite number"),
    "lora_dropout": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "lora_bias": (lambda v: isinstance(v, bool), "true or false"),
    "inference_mode": (lambda v: isinstance(v, bool), "true or false"),
    "bias": (lambda v: v in ("none", "all", "lora_only"), 'one of "none", "all", "lora_only"'),
    "init_lora_weights": (lambda v: isinstance(v, (bool, str)), "true, false or a method name"),
    "target_modules": (lambda v: isinstance(v, str) or _is_str_list(v), "a string or a list of strings"),
    "exclude_modules": (lambda v: isinstance(v, str) or _is_str_list(v), "a string or a list of strings"),
    "modules_to_save": (_is_str_list, "a list of strings"),
    "layers_pattern": (lambda v: isinstance(v, str) or _is_str_list(v), "a string or a list of strings"),
    "layers_to_transform": (lambda v: _is_int(v) or (isinstance(v, list) and all(_is_int(x) for x in v)),
                            "an integer or a list of integers"),
    "rank_pattern": (lambda v: isinstance(v, dict), "an object"),
    "trainable_token_indices": (lambda v: (isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v))
                                or (isinstance(v, dict) and all(isinstance(x, list) for x in v.values())),
                                "a list of token indices or an object of them"),
    "alpha_pattern": (lambda v: isinstance(v, dict), "an object"),
}


def check_config(config: Mapping[str, Any], file: str | Path | None, where: str = "") -> None:
    """Refuse config values of the wrong type, out of range, NaN or infinite, naming the key as written.

    Only the keys that decide ΔW or how the adapter is placed are checked (the others are carried through).
    ``where``: a prefix for the key in messages (``lorakit.peft_config`` for a config held in metadata).

    Raises:
        ConfigValueError: ``file: key "r": must be a positive integer, got "8" (a string)``.
    """
    def fail(key: str, want: str, v: Any) -> None:
        shown = json.dumps(v, allow_nan=True) if not isinstance(v, (dict, list)) else _kind_of_value(v)
        if len(shown) > 40:
            shown = shown[:37] + "..."
        raise ConfigValueError(f'{where}key "{key}"{"]" if "[" in key else ""}: must be {want}, got {shown} '
                               f'({_kind_of_value(v)})', file=file)

    for key, (ok, want) in _CONFIG_TYPES.items():
        v = config.get(key)
        if v is None and not (key in NOT_NULL and key in config):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            fail(key, want, v)
        if not ok(v):
            fail(key, want, v)
    for pkey, ok, want in (("rank_pattern", lambda v: _is_int(v) and v >= 1, "a positive integer"),
                           ("alpha_pattern", _is_number, "a finite number")):
        for k, v in (config.get(pkey) or {}).items():
            if not ok(v) or (isinstance(v, float) and not math.isfinite(v)):
                fail(f'{pkey}"["{k}', want, v)
            try:
                re.compile(k)
            except re.error as e:
                raise ConfigValueError(f'{where}key "{pkey}"["{k}"]: not a valid regular expression ({e})',
                                       file=file) from e


def _strip_adapter_name(key: str) -> str:
    """``….lora_A.default.weight`` → ``….lora_A.weight``; ``….lora_embedding_A.default`` → ``….lora_embedding_A``."""
    key = re.sub(r"\.(lora_[AB])\.(?!weight$|bias$)[^.]+\.(weight|bias)$", r".\1.\2", key)
    return re.sub(r"\.(lora_embedding_[AB]|lora_magnitude_vector)\.(?!weight$)[^.]+$", r".\1", key)


def split_non_lora(source: Source, keys: list[str]) -> tuple[dict[str, FullTensor], dict[str, Any]]:
    """The non-LoRA tensors of a PEFT file: whole base tensors (``modules_to_save``, ``bias="all"`` biases, saved
    embedding layers: PEFT stores them as ``base_model.model.<base tensor name>``, or with
    ``.modules_to_save.<adapter>.`` inside in-memory state dicts), and the rest (trainable tokens...), carried
    through by key."""
    full: dict[str, FullTensor] = {}
    other: dict[str, Any] = {}
    for k in keys:
        name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", k)
        if name.startswith(PREFIX) and not any(t in name for t in ("trainable_tokens", "token_adapter")):
            # bias="all" saves the bias of a LoRA-wrapped layer as `<module>.base_layer.bias`
            name = name[len(PREFIX):].replace(".base_layer.", ".")
            if name in full:
                raise FormatError(f"two tensors hold the saved module tensor {name} ({full[name].key}, {k})",
                                  file=source.path)
            full[name] = FullTensor(tuple(source.store.shape(k)), source.store.dtype(k),
                                    partial(source.store.get, k), k)
        else:
            other[k] = lambda k=k: source.store.get(k)
    return full, other


TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"


def trainable_token_rows(adapter: Adapter) -> dict[str, tuple[list[int], str]]:
    """PEFT trainable tokens (``trainable_token_indices``) of a PEFT adapter: embedding module → (row indices,
    the passthrough key holding the new rows ``(len(indices), dim)``). PEFT's merge writes those rows into the
    embedding table (``W.index_copy(0, indices, rows)``).

    The indices come from the config: a list applies to the one embedding that has a token adapter, a mapping
    names the module (PEFT matches its keys as name suffixes).

    Raises:
        FormatError: a token adapter without indices in the config, or indices that do not fit its rows.
    """
    if adapter.meta.source_format != "peft":
        return {}
    keys = [k for k in adapter.meta.passthrough if k.endswith(TOKENS_SUFFIX) and k.startswith(PREFIX)]
    spec = adapter.meta.format_config.get("trainable_token_indices")
    out: dict[str, tuple[list[int], str]] = {}
    for k in keys:
        module = k[len(PREFIX):-len(TOKENS_SUFFIX)]
        indices: Any = None
        if isinstance(spec, list) and len(keys) == 1:
            indices = spec
        elif isinstance(spec, dict):
            hits = [v for name, v in spec.items() if module == name or module.endswith("." + name)]
            indices = hits[0] if len(hits) == 1 else None
        if not (isinstance(indices, list) and indices and all(_is_int(i) and i >= 0 for i in indices)):
            raise FormatError(f"trainable tokens {k} have no usable trainable_token_indices in the config",
                              file=adapter.meta.source_path, hint="the config does not match the weights")
        out[module] = (list(indices), k)
    return out


def clean_alpha(alpha: float) -> int | float:
    """An alpha re-derived from a scale (``s·r`` or ``s·√r``) without floating-point noise: a value within
    1e-14 (relative) of a 12-digit decimal is that decimal (``16.000000000000004`` → ``16``,
    ``0.5000000000000001`` → ``0.5``), so configs stay readable and patterns do not list modules whose alpha
    differs only by rounding. Integers are returned as ``int``."""
    alpha = float(alpha)
    short = float(f"{alpha:.12g}")
    if abs(short - alpha) <= 1e-14 * abs(alpha):
        alpha = short
    return int(alpha) if alpha.is_integer() else alpha


def pattern_value(patterns: Mapping[str, Any], module: str) -> Any | None:
    """PEFT's pattern lookup: the first key ``p`` with ``re.match(rf"(.*\\.)?({p})$", module)``."""
    for p, v in patterns.items():
        if re.match(rf"(.*\.)?({p})$", module):
            return v
    return None


def peft_scale(config: Mapping[str, Any], module: str, rank: int) -> tuple[float, str | None]:
    """Effective scale of ``module`` under a PEFT config, and a note when the config's rank is not the tensor's."""
    r_cfg = pattern_value(config.get("rank_pattern") or {}, module) or config.get("r") or 8
    alpha = pattern_value(config.get("alpha_pattern") or {}, module)
    if alpha is None:
        alpha = config.get("lora_alpha", 8)
    note = None
    if int(r_cfg) != rank:
        note = f"config says rank {r_cfg} for {module} but the tensors have rank {rank}; the tensors win"
    denom = math.sqrt(rank) if config.get("use_rslora") else rank
    return float(alpha) / denom, note


def lora_b_bias(f: LoraFactors, file: str | Path | None, module: str) -> torch.Tensor:
    """What PEFT stores as ``lora_B.bias`` for the bias update ``Δb``: ``Δb / s`` (zeros where there is none: PEFT's
    ``lora_bias`` is global, so every module of the adapter gets a bias)."""
    if f.bias is None:
        return torch.zeros(f.out_features, dtype=f.dtype)
    if f.scale == 0:
        if bool((f.bias != 0).any()):
            raise FormatError("a non-zero bias update with scale 0 cannot be written for PEFT (Δb = s·lora_B.bias)",
                              file=file, module=module)
        return torch.zeros_like(f.bias)
    work = torch.promote_types(torch.float32, f.bias.dtype)
    return (f.bias.to(work) / f.scale).to(f.bias.dtype)


def factor_keys(key: str, kind: LayerKind) -> tuple[str, str]:
    """The keys PEFT stores a module's ``A`` and ``B`` under (``key`` = the prefixed module name)."""
    if kind == "embedding":
        return f"{key}.lora_embedding_A", f"{key}.lora_embedding_B"
    return f"{key}.lora_A.weight", f"{key}.lora_B.weight"


def factor_layout(adapter: Adapter, prefix: str = PREFIX) -> Layout:
    """The factors and magnitudes a PEFT-keyed file (``prefix`` + module name + PEFT suffixes) stores, from the
    module infos alone, for :class:`~lorakit.io.writer.SafetensorsWriter` to write them in place (a wrong
    prediction costs only the speed)."""
    layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for name, i in adapter.infos().items():
        key = prefix + name
        for k, shape in zip(factor_keys(key, i.kind), i.stored_shapes):
            layout[k] = (i.dtype, shape)
        if i.has_magnitude:  # per output row, as peft_magnitude writes it (else it refuses)
            layout[f"{key}.lora_magnitude_vector"] = (i.dtype, peft_magnitude_shape(i.kind, i.out_features))
    return layout


class PeftFormat:
    name = "peft"
    description = "PEFT LoRA directory (adapter_config.json + adapter_model.safetensors)"
    writable = True

    def sniff(self, source: Source) -> bool:
        if source.config is None and CONFIG_META_KEY in source.metadata:
            return True
        if source.config is not None:
            return str(source.config.get("peft_type", "")).upper() == "LORA"
        return any(k.startswith(PREFIX) and (".lora_A." in k or ".lora_embedding_A" in k) for k in source.keys)

    def read(self, source: Source) -> Adapter:
        config = dict(source.config or {})
        notes: list[str] = []
        where = ""
        if source.config is None and CONFIG_META_KEY in source.metadata:
            try:
                config = loads_json(source.metadata[CONFIG_META_KEY])
            except ValueError as e:
                raise FormatError(f"metadata {CONFIG_META_KEY} is not valid JSON ({e})", file=source.path) from e
            if not isinstance(config, dict):
                raise FormatError(f"metadata {CONFIG_META_KEY} is not a JSON object", file=source.path)
            source.config = config
            where = f"{CONFIG_META_KEY}: "
        if source.config is not None:
            check_config(config, source.config_path or source.path, where)
        if source.config is None:
            notes.append("no adapter_config.json: no alpha stored, so scale 1.0 applies (alpha = rank)")
            config = {"r": None, "lora_alpha": None}
        for key in VARIANT_KEYS:
            if config.get(key):
                raise FormatError(f"PEFT LoRA variant ({key}) is not plain LoRA and is not supported",
                                  file=source.config_path or source.path,
                                  hint="merge it into its base model with PEFT (merge_and_unload) instead")
        init = str(config.get("init_lora_weights", "")).lower()
        if init.startswith(("pissa", "olora", "corda")):
            notes.append(f"init_lora_weights={config['init_lora_weights']}: this adapter applies to the base model "
                         "as modified at initialisation, not to the original base weights")
        keys = source.keys
        # Unstripped in-memory keys (`.lora_A.default.weight`) occur in the wild: strip the adapter name.
        renamed = {_strip_adapter_name(k): k for k in keys}
        groups_renamed = group_by_module(list(renamed), SUFFIXES)
        groups = {stem: {role: renamed[k] for role, k in roles.items()} for stem, roles in groups_renamed.items()}
        used = {k for roles in groups.values() for k in roles.values()}
        full_tensors, passthrough = split_non_lora(source, [k for k in keys if k not in used])

        def name_of(stem: str) -> str:
            return stem.removeprefix(PREFIX)

        def scale_of(stem: str, roles: Roles, rank: int) -> float:
            if source.config is None:
                return 1.0
            s, note = peft_scale(config, name_of(stem), rank)
            if note:
                notes.append(note)
            return s

        def kind_of(stem: str, roles: Roles) -> Any:
            return "embedding" if roles["A"].endswith("lora_embedding_A") else None

        meta = AdapterMeta(
            base_model=config.get("base_model_name_or_path"),
            source_format=self.name,
            source_path=str(source.path),
            format_config=config,
            metadata=source.metadata,
            passthrough=passthrough,
            full_tensors=full_tensors,
        )
        adapter = build_adapter(source, groups, scale_of=scale_of, name_of=name_of, kind_of=kind_of, meta=meta,
                                flat_magnitude=True)
        if not len(adapter):
            raise FormatError("no LoRA modules (lora_A/lora_B pairs) found", file=source.path)
        return adapter.with_meta(notes=tuple(dict.fromkeys(notes)))

    # ---- writing ------------------------------------------------------------------------------------
    def config_for(self, adapter: Adapter) -> dict[str, Any]:
        """A PEFT config whose rank/alpha (patterns) reproduce every module's effective scale exactly."""
        src = dict(adapter.meta.format_config) if adapter.meta.source_format == "peft" else {}
        config = {**DEFAULT_CONFIG, **{k: v for k, v in src.items() if v is not None}}
        use_rslora = bool(config.get("use_rslora"))
        infos = adapter.infos()
        ranks = {n: i.rank for n, i in infos.items()}
        alphas = {n: clean_alpha(i.scale * (math.sqrt(i.rank) if use_rslora else i.rank)) for n, i in infos.items()}
        r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
        alpha = Counter(alphas.values()).most_common(1)[0][0] if alphas else 8
        config.update(
            r=r,
            lora_alpha=alpha,
            rank_pattern={n: k for n, k in ranks.items() if k != r},
            alpha_pattern={n: a for n, a in alphas.items() if a != alpha},
            target_modules=sorted({n for n, i in infos.items()}),
            use_dora=any(i.has_magnitude for i in infos.values()),
            lora_bias=any(i.has_bias for i in infos.values()),
            base_model_name_or_path=adapter.meta.base_model or config.get("base_model_name_or_path"),
            layers_to_transform=None,
            layers_pattern=None,
            peft_type="LORA",
        )
        if any(i.kind == "embedding" for i in infos.values()):
            config["target_modules"] = sorted(infos)
        if adapter.meta.source_format != "peft":
            config["modules_to_save"] = None
        if config["lora_bias"] and any(i.kind == "embedding" for i in infos.values()):
            raise FormatError("an adapter with bias updates (lora_bias) and embedding modules cannot be written "
                              "for PEFT: PEFT has no lora_bias for embeddings",
                              module=next(n for n, i in infos.items() if i.kind == "embedding"))
        return config

    def write(self, adapter: Adapter, path: Path, metadata: Mapping[str, str]) -> Path:
        """A directory (``adapter_config.json`` + ``adapter_model.safetensors``), or, for a ``.safetensors``
        path, one file with PEFT keys and the config in its metadata (``lorakit.peft_config``)."""
        config = self.config_for(adapter)
        if path.suffix == ".safetensors":
            self._write_weights(adapter, path, config, metadata, config_in_metadata=True)
            return path
        with atomic_output(path, directory=True) as tmp:
            self._write_weights(adapter, tmp / "adapter_model.safetensors", config, metadata)
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return path

    def _write_weights(
        self, adapter: Adapter, path: Path, config: dict[str, Any], metadata: Mapping[str, str],
        config_in_metadata: bool = False,
    ) -> None:
        meta = {"format": "pt", **metadata}
        if config_in_metadata:
            meta[CONFIG_META_KEY] = json.dumps(config, sort_keys=True)
        # bias updates, whole tensors and tensors passed through are known only from their data
        known = not (config["lora_bias"] or adapter.meta.full_tensors
                     or (adapter.meta.source_format == "peft" and adapter.meta.passthrough))
        with SafetensorsWriter(path, meta, layout=factor_layout(adapter) if known else None) as w:
            for name in adapter:
                f = adapter[name]
                key = PREFIX + name
                for k, factor in zip(factor_keys(key, f.kind), f.stored()):
                    w.add(k, factor)
                if f.magnitude is not None:
                    w.add(f"{key}.lora_magnitude_vector", peft_magnitude(f, path, name))
                if config["lora_bias"]:
                    w.add(f"{key}.lora_B.bias", lora_b_bias(f, path, name))
            for t_name, t in adapter.meta.full_tensors.items():
                # the key PEFT saved it under (`….base_layer.bias` for a LoRA-wrapped layer's bias), which is
                # where PeftModel loads it back; in-memory `.modules_to_save.<adapter>.` keys are saved plainly
                as_saved = t.key.startswith(PREFIX) and ".modules_to_save." not in t.key
                w.add(t.key if as_saved else PREFIX + t_name, t.load())
            if adapter.meta.source_format == "peft":
                for k, load in adapter.meta.passthrough.items():
                    w.add(k, load())
