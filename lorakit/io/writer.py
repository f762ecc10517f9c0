"""Incremental safetensors writing with bounded memory.

The output is in the strict form (``__metadata__`` first, the header padded with spaces to a multiple of 8,
tensors ordered by decreasing alignment then name) and is renamed into place atomically; on any error nothing
is left behind. A whole adapter never sits in memory: each tensor is written as it is produced, in one of two
ways.

- **In place**, when the writer is given the ``layout`` (every tensor's name, dtype and shape) up front: the
  header is known, so each tensor goes straight to its final offset in the temporary output (a positioned
  write, in any order), and closing only renames it. Formats pass the layout their module infos predict.
- **Appended**, otherwise (and for whatever does not match the layout): tensors go to a temporary data file in
  the order they come, and closing writes the header and copies each range into the final order. That is a
  second pass over the output's bytes, measured at 0.1-0.45 s for a 168 MB output on this machine's page
  cache against 0.04 s for writing it in place.

Both give the same bytes (tested).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Self

import torch

from lorakit.errors import OutputError
from lorakit.io.atomic import atomic_output
from lorakit.io.safetensors_file import DTYPES, TORCH_TO_NAME, tensor_bits

#: ``name → (dtype, shape)`` of every tensor a file will hold.
Layout = Mapping[str, tuple[torch.dtype, tuple[int, ...]]]


class DeferredText(str):
    """A metadata value settled later at the length it has now: ``str`` of it is a placeholder of the final
    text's length, and :meth:`final` waits for the text. A writer that lays a file out before the value is known
    (:class:`SafetensorsWriter`) writes the final text over the placeholder when it closes."""

    _resolve: Callable[[], str]

    def __new__(cls, placeholder: str, resolve: Callable[[], str]) -> Self:
        obj = super().__new__(cls, placeholder)
        obj._resolve = resolve
        return obj

    def final(self) -> str:
        text = str(self._resolve())
        if len(text.encode()) != len(str(self).encode()):
            raise ValueError("a deferred metadata value changed its length")
        return text


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.dtype not in TORCH_TO_NAME:
        raise OutputError(f"cannot store dtype {t.dtype} in safetensors")
    if t.numel() == 0:
        return memoryview(b"")
    # A byte view works for every dtype, bf16 and fp8 included (numpy has neither); no copy of the data.
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def _header(metadata: Mapping[str, str], entries: Mapping[str, tuple[str, tuple[int, ...], int]]
            ) -> tuple[bytes, dict[str, int]]:
    """The strict header of ``entries`` (``name → (dtype, shape, size)``) and each tensor's offset in the data
    section: ``__metadata__`` first, tensors by decreasing alignment then name, padded with spaces to 8 bytes."""
    order = sorted(entries, key=lambda n: (-DTYPES[entries[n][0]][1], n))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offsets: dict[str, int] = {}
    offset = 0
    for name in order:
        dtype, shape, size = entries[name]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offsets[name] = offset
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


def _pwrite(fd: int, data: memoryview, offset: int) -> None:
    while data:  # a regular file takes it whole, up to 2 GB a call
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _copy_range(src, dst, start: int, size: int) -> None:  # type: ignore[no-untyped-def]
    """Append ``size`` bytes of ``src`` from ``start`` to ``dst`` (``dst`` flushed, positioned at its end).

    ``os.copy_file_range`` copies inside the kernel (page cache to page cache, no trip through Python buffers):
    the re-ordering copy of a 160 MB output took 0.2 s of CPU through read/write. Falls back to reads and
    writes where the call is missing or refused (other filesystems, old kernels)."""
    done = 0
    copy = getattr(os, "copy_file_range", None)
    if copy is not None:
        try:
            while done < size:
                n = copy(src.fileno(), dst.fileno(), size - done, start + done)
                if n == 0:
                    break
                done += n
        except OSError:
            pass
    if done < size:
        dst.seek(0, os.SEEK_END)
        src.seek(start + done)
        remaining = size - done
        while remaining:
            chunk = src.read(min(remaining, 1 << 24))
            if not chunk:
                raise OutputError("the temporary data file ended early")
            dst.write(chunk)
            remaining -= len(chunk)
        dst.flush()


class SafetensorsWriter:
    """Add tensors one by one, then :meth:`close` to publish the file atomically.

    Args:
        path: the final file.
        metadata: the header's ``__metadata__`` (string to string). It may still change before :meth:`close`
            (an in-place file whose header then changes length is written by the appending route instead). A
            :class:`DeferredText` value is settled at :meth:`close` (it keeps its length, so
            the file stays in place: the input hashing of a provenance overlaps the writing).
        layout: every tensor the file will hold, to write them in place (module docstring). A tensor that is
            not in it, or differs from it, and a layout tensor never added, make :meth:`close` take the
            appending route: the layout decides only the speed, never the file.

    Use as a context manager: leaving the block with an exception discards everything.
    """

    def __init__(self, path: str | Path, metadata: Mapping[str, str] | None = None,
                 layout: Layout | None = None) -> None:
        self.path = Path(path)
        self.metadata = {str(k): v if isinstance(v, DeferredText) else str(v) for k, v in (metadata or {}).items()}
        parent = self.path.parent if str(self.path.parent) else Path(".")
        fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".data", dir=parent)
        self._data_path = Path(name)
        self._data = os.fdopen(fd, "wb")
        # name → (dtype, shape, position in the data file, size)
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        self._closed = False
        self._planned: dict[str, tuple[str, tuple[int, ...], int]] = {}  # the in-place layout: dtype, shape, size
        self._slots: dict[str, int] = {}  # its tensors' positions in the data file (which is then the output)
        self._header = b""
        if layout:
            self._planned = {n: (TORCH_TO_NAME[dt], tuple(sh), tensor_bits(TORCH_TO_NAME[dt], tuple(sh)) // 8)
                             for n, (dt, sh) in layout.items() if dt in TORCH_TO_NAME}
            self._header, offsets = _header(self.metadata, self._planned)
            self._slots = {n: len(self._header) + o for n, o in offsets.items()}
        self._offset = len(self._header) + sum(size for _, _, size in self._planned.values())

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor (copied to CPU, made contiguous): at its place in the layout, else appended."""
        if name in self._entries:
            raise OutputError(f"tensor {name!r} written twice", file=self.path)
        blob = _tensor_bytes(tensor)
        dtype, shape = TORCH_TO_NAME[tensor.dtype], tuple(tensor.shape)
        if self._planned.get(name, (None, None))[:2] == (dtype, shape):
            at = self._slots[name]
            self._data.flush()  # appended bytes go through the buffer; in-place ones are positioned writes
            _pwrite(self._data.fileno(), blob, at)
        else:
            at = self._offset
            self._data.seek(at)
            self._data.write(blob)
            self._offset += len(blob)
        self._entries[name] = (dtype, shape, at, len(blob))

    def _in_place(self, header: bytes) -> bool:
        """Whether the data file is already the output: every tensor of the layout was added at its place, nothing
        else, and the final ``header`` has the planned one's length (so the planned offsets hold)."""
        return (bool(self._planned) and self._entries.keys() == self._planned.keys()
                and all(e[2] == self._slots[n] for n, e in self._entries.items())  # appended ones lie past the slots
                and len(header) == len(self._header))

    def close(self) -> Path:
        """Publish the file: rename the in-place data file, or write header + data in order to a new one."""
        try:
            self.metadata = {k: v.final() if isinstance(v, DeferredText) else v for k, v in self.metadata.items()}
            header = _header(self.metadata, self._planned)[0] if self._planned else b""
            if self._in_place(header):
                self._data.seek(0)
                self._data.write(header)
                self._data.close()
                with atomic_output(self.path) as tmp:
                    os.replace(self._data_path, tmp)
            else:
                self._data.close()
                header, offsets = _header(self.metadata, {n: (d, sh, size) for n, (d, sh, _, size)
                                                          in self._entries.items()})
                with atomic_output(self.path) as tmp, open(tmp, "wb") as out, open(self._data_path, "rb") as data:
                    out.write(header)
                    out.flush()
                    for name in sorted(offsets, key=offsets.__getitem__):
                        _, _, start, size = self._entries[name]
                        _copy_range(data, out, start, size)
        finally:
            self._data.close()
            self._data_path.unlink(missing_ok=True)
            self._closed = True
        return self.path

    def abort(self) -> None:
        """Discard everything written so far."""
        if not self._closed:
            self._data.close()
            self._data_path.unlink(missing_ok=True)
            self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_safetensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a whole mapping of tensors atomically (see :class:`SafetensorsWriter`)."""
    with SafetensorsWriter(path, metadata) as w:
        for name, t in tensors.items():
            w.add(name, t)
    return Path(path)
