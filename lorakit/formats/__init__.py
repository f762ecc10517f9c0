"""Adapter file formats, detected by content.

``FORMATS`` is the one list of formats, in sniffing order (most specific first). Each format module provides
``sniff``, ``read`` and ``write`` (see :class:`lorakit.formats.base.Format`).
"""

from __future__ import annotations

from lorakit.errors import UnknownFormatError
from lorakit.formats.base import Format, ReadableFormat, Source
from lorakit.formats.diffusers import DiffusersFormat
from lorakit.formats.kohya import KohyaFormat
from lorakit.formats.lycoris import LycorisFormat
from lorakit.formats.peft import PeftFormat
from lorakit.formats.quantized import QuantizedFormat

# The quantized format first (its metadata marks it); LyCORIS before PEFT (PEFT LOHA/LOKR configs) and kohya
# (LoHa/LoKr files may also hold LoCon modules).
FORMATS: list[ReadableFormat] = [QuantizedFormat(), LycorisFormat(), PeftFormat(), KohyaFormat(), DiffusersFormat()]


def get_format(name: str) -> ReadableFormat:
    """The format registered as ``name``."""
    for f in FORMATS:
        if f.name == name:
            return f
    raise UnknownFormatError(
        f"unknown format {name!r}; known: {', '.join(f.name for f in FORMATS)}"
    )


def detect(source: Source) -> ReadableFormat:
    """The first format whose sniffer accepts the content; :class:`UnknownFormatError` lists what was tried."""
    for f in FORMATS:
        if f.sniff(source):
            return f
    sample = ", ".join(source.keys[:3]) or "no tensors"
    raise UnknownFormatError(
        f"not a LoRA adapter in any known format (tried {', '.join(f.name for f in FORMATS)}; keys: {sample})",
        file=source.path,
    )


__all__ = ["FORMATS", "Format", "ReadableFormat", "Source", "detect", "get_format"]
