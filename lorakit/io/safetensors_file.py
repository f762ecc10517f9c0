"""Lazy, validated safetensors reading.

The header is parsed and checked by lorakit itself (the checks of the reference reader: size, UTF-8 JSON, no
duplicate keys, string metadata, known dtypes, exact tiling of the data section, exact file length) so that a
damaged file fails with a one-line :class:`CorruptFileError` naming the file and the cause, before any tensor is
read. Tensors are then read one at a time with ``pread`` into memory they own (see :meth:`SafetensorsFile.get`).
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import torch

from lorakit.errors import CorruptFileError
from lorakit.io.files import loads_json, open_regular

MAX_HEADER_BYTES = 100_000_000

DTYPES: dict[str, tuple[torch.dtype | None, int]] = {
    # name: (torch dtype, bits per element)
    "BOOL": (torch.bool, 8),
    "U8": (torch.uint8, 8),
    "I8": (torch.int8, 8),
    "I16": (torch.int16, 16),
    "U16": (getattr(torch, "uint16", None), 16),
    "F16": (torch.float16, 16),
    "BF16": (torch.bfloat16, 16),
    "I32": (torch.int32, 32),
    "U32": (getattr(torch, "uint32", None), 32),
    "F32": (torch.float32, 32),
    "F64": (torch.float64, 64),
    "I64": (torch.int64, 64),
    "U64": (getattr(torch, "uint64", None), 64),
    "C64": (torch.complex64, 64),
    "F8_E5M2": (getattr(torch, "float8_e5m2", None), 8),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 8),
    "F8_E8M0": (getattr(torch, "float8_e8m0fnu", None), 8),
    "F8_E4M3FNUZ": (getattr(torch, "float8_e4m3fnuz", None), 8),
    "F8_E5M2FNUZ": (getattr(torch, "float8_e5m2fnuz", None), 8),
    "F4": (None, 4),
    "F6_E2M3": (None, 6),
    "F6_E3M2": (None, 6),
}
TORCH_TO_NAME = {dt: name for name, (dt, _) in DTYPES.items() if dt is not None}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """What the header says of one tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def tensor_bits(dtype: str, shape: tuple[int, ...]) -> int:
    """The bits a tensor of safetensors dtype ``dtype`` and ``shape`` takes (a whole file needs them in bytes)."""
    return math.prod(shape) * DTYPES[dtype][1]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r} in header")
        out[k] = v
    return out


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and validate a safetensors header.

    Returns:
        ``(tensors, metadata, data_start)``: tensor infos in file order, the ``__metadata__`` map (empty if
        absent) and the byte offset of the data section.

    Raises:
        CorruptFileError: with the cause, for any violation of the format.
    """
    path = Path(path)
    fd = open_regular(path, what="safetensors file")  # never blocks: FIFOs and devices are refused first
    try:
        size = os.fstat(fd).st_size
        with os.fdopen(fd, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CorruptFileError(
                    "empty file" if size == 0 else f"file too small for a safetensors header ({size} bytes)",
                    file=path,
                )
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise CorruptFileError(f"header length {n} exceeds the 100 MB limit: not a safetensors file?", file=path)
            if 8 + n > size:
                raise CorruptFileError(
                    f"truncated: header claims {n} bytes but the file has {size - 8} after the length", file=path
                )
            raw = f.read(n)
    except OSError as e:
        raise CorruptFileError(f"cannot read: {e.strerror or e}", file=path) from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptFileError("corrupt header: not UTF-8 text (is this a safetensors file?)", file=path) from e
    try:
        header = loads_json(text, object_pairs_hook=_no_duplicates)
    except ValueError as e:
        cause = str(e) if str(e).startswith("duplicate key") else f"not valid JSON ({e})"
        raise CorruptFileError(f"corrupt header: {cause}", file=path) from e
    if not isinstance(header, dict):
        raise CorruptFileError("corrupt header: not a JSON object", file=path)

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptFileError("corrupt header: __metadata__ must map strings to strings", file=path)

    infos: list[TensorInfo] = []
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptFileError(f"corrupt header entry for tensor {name!r}", file=path) from e
        if dtype not in DTYPES:
            raise CorruptFileError(f"tensor {name!r} has unknown dtype {dtype!r}", file=path)
        if any(d < 0 for d in shape):
            raise CorruptFileError(f"tensor {name!r} has a negative dimension {shape}", file=path)
        bits = tensor_bits(dtype, shape)
        if bits % 8:
            raise CorruptFileError(f"tensor {name!r} does not fill whole bytes", file=path)
        if end - begin != bits // 8:
            raise CorruptFileError(
                f"header lies about tensor {name!r}: offsets span {end - begin} bytes, "
                f"{dtype}{list(shape)} needs {bits // 8}",
                file=path,
            )
        infos.append(TensorInfo(name, dtype, shape, begin, end))

    infos.sort(key=lambda t: (t.begin, t.end))
    expected = 0
    for t in infos:
        if t.begin != expected:
            raise CorruptFileError(
                f"header lies about offsets: tensor {t.name!r} starts at {t.begin}, expected {expected}", file=path
            )
        expected = t.end
    data_start = 8 + n
    if data_start + expected != size:
        what = "truncated" if data_start + expected > size else "trailing bytes after the data"
        raise CorruptFileError(
            f"{what}: header describes {expected} data bytes, the file holds {size - data_start}", file=path
        )
    return {t.name: t for t in infos}, dict(metadata), data_start


class SafetensorsFile:
    """A validated safetensors file, read lazily: the header now, each tensor on request.

    Example:
        >>> f = SafetensorsFile("adapter.safetensors")    # doctest: +SKIP
        >>> f.keys(), f.metadata, f.get("x.lora_A.weight").shape   # doctest: +SKIP
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tensors, self.metadata, self.data_start = read_header(self.path)
        self._handle: Any = None

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def _fd(self) -> int:
        if self._handle is None:
            try:
                self._handle = os.open(self.path, os.O_RDONLY)
            except OSError as e:
                raise CorruptFileError(f"cannot open: {e.strerror or e}", file=self.path) from e
        return self._handle

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into memory it owns.

        Read with ``pread`` rather than memory-mapped: a mapped file's pages count as resident memory for as long
        as the mapping lives, so streaming a 70B-sized adapter through a mapping would grow the process to the
        file's size. Read this way, peak memory stays at the tensors in flight.
        """
        info = self.tensors[name]
        dtype = DTYPES[info.dtype][0]
        if dtype is None:
            raise CorruptFileError(f"tensor {name!r} has dtype {info.dtype}, which torch cannot hold", file=self.path)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        buf = bytearray(info.nbytes)
        view, offset, fd = memoryview(buf), self.data_start + info.begin, self._fd()
        try:
            done = 0
            while done < info.nbytes:
                n = os.preadv(fd, [view[done:]], offset + done)
                if n == 0:
                    raise CorruptFileError(f"file shrank while reading tensor {name!r}", file=self.path)
                done += n
        except OSError as e:
            raise CorruptFileError(f"cannot read tensor {name!r}: {e.strerror or e}", file=self.path) from e
        # Safetensors data is little-endian, as is every platform torch supports for this.
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(info.shape)

    @property
    def nbytes(self) -> int:
        return os.path.getsize(self.path)

    def close(self) -> None:
        if self._handle is not None:
            os.close(self._handle)
            self._handle = None

    def __del__(self) -> None:
        # __init__ may have failed before the handle existed; at shutdown the descriptor may be gone already
        if getattr(self, "_handle", None) is not None:
            with contextlib.suppress(OSError):
                self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
