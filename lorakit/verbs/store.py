"""Reading and writing adapters by path: what every verb (and :mod:`lorakit.api`) uses to load and save.

Inputs may be Hub specs (``hf://ORG/REPO[@REV][/path]`` or a bare ``ORG/REPO``): they are resolved here, through
:mod:`lorakit.hub`, into local paths before :mod:`lorakit.io` and :mod:`lorakit.formats` see them; those lower
layers know nothing of the Hub.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorakit.adapter import Adapter
from lorakit.errors import FormatError, naming_file
from lorakit.formats import detect, get_format
from lorakit.formats.base import Format, Source
from lorakit.io.atomic import check_output_path
from lorakit.io.resolve import resolve_input
from lorakit.provenance import provenance_metadata


def pull_spec(spec: str, allow_pickle: bool) -> Path:
    """The Hub resolver handed to :func:`lorakit.io.resolve.resolve_input`: pull ``spec``, return its adapter path."""
    from lorakit.hub.pull import resolve_spec

    return resolve_spec(spec, allow_pickle=allow_pickle)


def resolve(spec: str | Path, *, allow_pickle: bool = False) -> Path:
    """A local path for what a user typed where a file is expected (Hub specs pulled on demand)."""
    return resolve_input(spec, allow_pickle=allow_pickle, hub=pull_spec)


def load(path: str | Path, *, format: str | None = None, allow_pickle: bool = False, **options: Any) -> Adapter:
    """Read an adapter lazily (headers now, tensors on access).

    Args:
        path: a file, a PEFT directory, ``hf://org/repo[@rev][/file]`` or ``org/repo``.
        format: skip detection and read as this format.
        allow_pickle: read ``.bin``/``.pt`` pickles (with ``torch.load(weights_only=True)``). Off by default.
        options: format-specific reading options (kohya and LyCORIS: ``arch`` = ``sd1``/``sd2``/``sdxl``/``flux``,
            ``base`` = a base model config or directory, ``keymap``; LyCORIS: ``max_rank``). ``None`` values are
            dropped; options the detected format does not take are ignored with a note.

    Raises:
        FormatError: (and subclasses) naming the file and module for anything unreadable.
    """
    local = resolve(path, allow_pickle=allow_pickle)
    source = Source.open(local, allow_pickle=allow_pickle)
    fmt = get_format(format) if format else detect(source)
    options = {k: v for k, v in options.items() if v is not None}
    accepted = inspect.signature(fmt.read).parameters
    ignored = sorted(k for k in options if k not in accepted)
    adapter = fmt.read(source, **{k: v for k, v in options.items() if k in accepted})  # type: ignore[call-arg]
    if ignored:
        note = f"option(s) {', '.join(ignored)} ignored: they do not apply to the {fmt.name} format"
        adapter = adapter.with_meta(notes=(*adapter.meta.notes, note))
    return adapter


def default_output_format(adapter: Adapter) -> str:
    """The format to write when none is asked for: the source's, when it is writable, else PEFT."""
    from lorakit.formats import FORMATS

    name = adapter.meta.source_format
    writable = {f.name for f in FORMATS if f.writable}
    return name if name in writable else "peft"


# What each writable format can hold besides A, B and a scale (never dropped silently: refused instead).
CARRIES_FULL_TENSORS = frozenset({"peft"})
CARRIES_BIAS = frozenset({"peft"})
CARRIES_EMBEDDING = frozenset({"peft"})


def check_carried(adapter: Adapter, format_name: str, out: str | Path | None = None) -> None:
    """Refuse to write ``adapter`` in a format that has no place for its whole module tensors
    (``modules_to_save``), embedding modules or bias updates (PEFT ``lora_bias``), from the headers alone.

    Raises:
        FormatError: naming the first such module or tensor.
    """
    src = adapter.meta.source_path
    if adapter.meta.full_tensors and format_name not in CARRIES_FULL_TENSORS:
        name = next(iter(adapter.meta.full_tensors))
        raise FormatError(
            f"{len(adapter.meta.full_tensors)} whole module tensor(s) (modules_to_save, e.g. {name}) have no "
            f"place in the {format_name} format", file=src or out,
            hint="keep this adapter in the PEFT format, or apply it to its base model (lorakit apply)",
        )
    if adapter.meta.passthrough and adapter.meta.source_format == "peft" and format_name != "peft":
        key = next(iter(adapter.meta.passthrough))
        raise FormatError(
            f"{len(adapter.meta.passthrough)} PEFT tensor(s) that are not LoRA factors (e.g. {key}: trainable "
            f"tokens) have no place in the {format_name} format", file=src or out,
            hint="keep this adapter in the PEFT format, or merge it into its base model with PEFT",
        )
    if format_name not in CARRIES_EMBEDDING:
        emb = [n for n, i in adapter.infos().items() if i.kind == "embedding"]
        if emb:
            raise FormatError(
                f"{len(emb)} embedding module(s) (PEFT lora_embedding_A/B, applied to the embedding table "
                f"transposed) have no representation in the {format_name} format", file=src or out, module=emb[0],
                hint="keep this adapter in the PEFT format",
            )
    if format_name not in CARRIES_BIAS:
        with_bias = [n for n, i in adapter.infos().items() if i.has_bias]
        if with_bias:
            raise FormatError(
                f"{len(with_bias)} module(s) carry a bias update (PEFT lora_bias), which the {format_name} format "
                "cannot hold", file=src or out, module=with_bias[0],
                hint="keep this adapter in the PEFT format, or apply it to its base model (lorakit apply)",
            )


def save(
    adapter: Adapter,
    path: str | Path,
    *,
    format: str | None = None,
    provenance: Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
    inputs: tuple[str | Path, ...] = (),
) -> Path:
    """Write ``adapter`` atomically, module by module, in ``format`` (default: its source format).

    The file's metadata gets ``lorakit.provenance`` (lorakit version, operation, parameters, input sha256).
    ``inputs``, and the file the adapter was read from (``adapter.meta.source_path``: a lazy adapter still reads
    from it), are refused as outputs before anything is written.
    """
    protected = (*inputs, adapter.meta.source_path) if adapter.meta.source_path else tuple(inputs)
    out = check_output_path(path, protected)
    fmt = get_format(format or default_output_format(adapter))
    if not fmt.writable or not isinstance(fmt, Format):
        raise FormatError(f"lorakit cannot write the {fmt.name} format", file=out)
    check_carried(adapter, fmt.name, out)
    meta = {**(metadata or {}), **provenance_metadata(provenance or adapter.meta.provenance)}
    with naming_file(adapter.meta.source_path):  # a writer's refusal names the input it could not write
        return fmt.write(adapter, out, meta)


__all__ = ["CARRIES_BIAS", "CARRIES_EMBEDDING", "CARRIES_FULL_TENSORS", "check_carried", "default_output_format",
           "load", "pull_spec", "resolve", "save"]
