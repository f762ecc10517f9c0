"""lorakit's quantized adapter format: one safetensors file of packed codes and block constants.

Metadata key ``lorakit.quantized`` holds a versioned JSON schema (``schema``/``version``) that says how to
dequantize every module::

    {"schema": "lorakit.quantized", "version": 1,
     "source": {"format": "peft", "base_model": …, "format_config": {…}},
     "modules": {NAME: {"out": …, "in": …, "rank": …, "dtype": "float32", "kind": "linear", "kernel": null,
                        "magnitude": false, "extras": [],
                        "segments": [{"start": 0, "rows": 16, "bits": 4, "code": "nf", "block": 64,
                                      "double": true, "crc32": {"B": …, "A": …}}]}}}

Tensors of segment ``k`` of module ``NAME``: ``NAME.q{k}.B.codes`` (packed uint8 indices of ``Bᵀ``, rows are
singular directions), ``NAME.q{k}.B.absmax`` (fp32 per block) or ``….qabsmax`` (uint8) + ``….scale2`` (fp32 per
256 blocks) + ``….offset`` (fp32), and the same for ``A``; ``NAME.magnitude`` and ``NAME.extra.KEY`` raw.
Dequantization (see :mod:`lorakit.quant.blockwise`): ``x̂ = code[index]·â_block``, ``B = (x̂ of Bᵀ)ᵀ``, scale 1.

Reading gives a lazy :class:`Adapter` whose factors are dequantized when a module is indexed, so every verb
accepts quantized inputs. The generic writer does not write this format (``lorakit quantize`` does).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from lorakit.adapter import Adapter, AdapterMeta, ModuleInfo
from lorakit.errors import CorruptFileError, FormatError
from lorakit.formats.base import Source
from lorakit.io.writer import SafetensorsWriter

META_KEY = "lorakit.quantized"
SCHEMA = "lorakit.quantized"
VERSION = 1


def crc32(t: torch.Tensor) -> int:
    return zlib.crc32(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()) & 0xFFFFFFFF


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def dtype_from_name(name: object) -> torch.dtype:
    """``"float32"`` → ``torch.float32``; anything that is not a floating dtype name is a corrupt schema."""
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise CorruptFileError(f"unknown dtype {name!r} in the quantized schema")
    return dt


def write_quantized(
    path: Path, modules: Iterable[Any], meta: AdapterMeta, metadata: Mapping[str, str]
) -> Path:
    """Write :class:`lorakit.quant.module.QuantizedModule` s one by one (atomically); returns ``path``."""
    schema: dict[str, Any] = {
        "schema": SCHEMA,
        "version": VERSION,
        "source": {
            "format": meta.source_format,
            "base_model": meta.base_model,
            "format_config": json.loads(json.dumps(dict(meta.format_config), default=str)),
        },
        "modules": {},
    }
    with SafetensorsWriter(path, {"format": "pt", **metadata}) as w:
        for m in modules:
            segs = []
            for k, s in enumerate(m.segments):
                sums = {}
                for part, qt in (("B", s.B), ("A", s.A)):
                    for role, t in qt.tensors().items():
                        w.add(f"{m.name}.q{k}.{part}.{role}", t)
                    sums[part] = crc32(qt.codes)
                segs.append({"start": s.start, "rows": s.rows, **s.config.to_json(), "crc32": sums})
            if m.magnitude is not None:
                w.add(f"{m.name}.magnitude", m.magnitude)
            for key, t in m.extras.items():
                w.add(f"{m.name}.extra.{key}", t)
            schema["modules"][m.name] = {
                "out": m.out_features,
                "in": m.in_features,
                "rank": m.rank,
                "dtype": _dtype_name(m.dtype),
                "kind": m.kind,
                "kernel": list(m.kernel) if m.kernel else None,
                "magnitude": m.magnitude is not None,
                "extras": sorted(m.extras),
                "segments": segs,
            }
        w.metadata[META_KEY] = json.dumps(schema, sort_keys=True)
    return path


def read_schema(source: Source) -> dict[str, Any]:
    """The parsed, version-checked ``lorakit.quantized`` metadata."""
    from lorakit.io.files import loads_json

    try:
        schema = loads_json(source.metadata[META_KEY])  # ValueError, not RecursionError, when nested deeply
    except (KeyError, ValueError) as e:
        raise CorruptFileError(f"metadata {META_KEY} is missing or not valid JSON", file=source.path) from e
    if (
        not isinstance(schema, dict)
        or schema.get("schema") != SCHEMA
        or not isinstance(schema.get("modules"), dict)
    ):
        raise CorruptFileError(f"metadata {META_KEY} does not follow the schema", file=source.path)
    if schema.get("version") != VERSION:
        raise FormatError(
            f"quantized format version {schema.get('version')} is not supported (this lorakit reads "
            f"version {VERSION})",
            file=source.path,
            hint="upgrade lorakit",
        )
    return schema


def load_module(source: Source, name: str, spec: Mapping[str, Any]) -> Any:
    """A :class:`lorakit.quant.module.QuantizedModule` from the file (tensors read, sizes and checksums checked)."""
    from lorakit.quant.blockwise import QuantConfig, QuantizedTensor
    from lorakit.quant.module import QuantizedModule, Segment

    store, keys = source.store, set(source.keys)

    def get(key: str) -> torch.Tensor:
        if key not in keys:
            raise CorruptFileError(f"tensor {key!r} is missing", file=source.path, module=name)
        return store.get(key)

    try:
        segments = []
        for k, seg in enumerate(spec["segments"]):
            cfg = QuantConfig(int(seg["bits"]), str(seg["code"]), int(seg["block"]), bool(seg["double"]))
            parts = {}
            for part, cols in (("B", int(spec["out"])), ("A", int(spec["in"]))):
                prefix = f"{name}.q{k}.{part}."
                roles = ("qabsmax", "scale2", "offset") if cfg.double else ("absmax",)
                qt = QuantizedTensor(
                    (int(seg["rows"]), cols),
                    cfg,
                    get(prefix + "codes"),
                    **{r: get(prefix + r) for r in roles},
                )
                qt.validate(f"{part} segment {k}")
                if crc32(qt.codes) != int(seg["crc32"][part]):
                    raise CorruptFileError(
                        f"codes of {part} segment {k} fail their checksum (the file is damaged)",
                        file=source.path,
                        module=name,
                    )
                parts[part] = qt
            segments.append(Segment(int(seg["start"]), int(seg["rows"]), cfg, parts["B"], parts["A"]))
        magnitude = get(f"{name}.magnitude") if spec.get("magnitude") else None
        extras = {key: get(f"{name}.extra.{key}") for key in spec.get("extras", [])}
        return QuantizedModule(
            name,
            int(spec["out"]),
            int(spec["in"]),
            int(spec["rank"]),
            tuple(segments),
            dtype_from_name(spec.get("dtype", "float32")),
            spec.get("kind", "linear"),
            tuple(spec["kernel"]) if spec.get("kernel") else None,
            magnitude,
            extras,
        )
    except CorruptFileError as e:
        if e.file is None:
            e.file, e.module = str(source.path), name
            e.args = (e.one_line(),)
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptFileError(
            f"module entry of {META_KEY} is malformed ({e})", file=source.path, module=name
        ) from e


class QuantizedFormat:
    name = "quantized"
    description = "lorakit quantized adapter (packed NF/int codes + block constants, safetensors)"
    writable = False

    def sniff(self, source: Source) -> bool:
        return META_KEY in source.metadata

    def read(self, source: Source) -> Adapter:
        schema = read_schema(source)
        infos: dict[str, ModuleInfo] = {}
        loaders = {}
        for name, spec in schema["modules"].items():
            try:
                kept = sum(int(s["rows"]) for s in spec["segments"])
                infos[name] = ModuleInfo(
                    name,
                    int(spec["out"]),
                    int(spec["in"]),
                    kept,
                    1.0,
                    dtype_from_name(spec.get("dtype", "float32")),
                    spec.get("kind", "linear"),
                    tuple(spec["kernel"]) if spec.get("kernel") else None,
                    bool(spec.get("magnitude")),
                )
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise CorruptFileError(
                    f"module entry of {META_KEY} is malformed ({e})", file=source.path, module=name
                ) from e
            loaders[name] = lambda name=name, spec=spec: load_module(source, name, spec).factors()
        src = schema.get("source") or {}
        bits = sorted({int(s["bits"]) for spec in schema["modules"].values() for s in spec["segments"]})
        meta = AdapterMeta(
            base_model=src.get("base_model"),
            source_format=self.name,
            source_path=str(source.path),
            format_config={
                "source_format": src.get("format"),
                "source_config": src.get("format_config") or {},
                "bits": bits,
            },
            metadata=source.metadata,
            notes=(
                f"quantized adapter ({', '.join(map(str, bits))} bits): factors are dequantized on access",
            ),
        )
        return Adapter(loaders, meta, infos)

    def write(self, adapter: Adapter, path: Path, metadata: Mapping[str, str]) -> Path:
        raise FormatError(
            "the quantized format is written by `lorakit quantize` only",
            file=path,
            hint="use lorakit quantize IN --bits 4 -o OUT",
        )
