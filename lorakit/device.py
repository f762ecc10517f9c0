"""Device selection: ``auto`` picks CUDA when present; every numerical path runs on CPU with the same code."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from lorakit.errors import LorakitError

if TYPE_CHECKING:
    from lorakit.factors import LoraFactors


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto``/``None`` → ``cuda`` if available else ``cpu``; ``cuda`` without a GPU is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LorakitError("--device cuda was asked for but no CUDA device is available", hint="use --device cpu")
    return dev


def to_device(t: torch.Tensor, device: str | torch.device | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` on ``device`` (and ``dtype``): the one way lorakit moves tensors to the compute device.

    CPU → CUDA goes through pinned (page-locked) memory with ``non_blocking=True``, so the copy of the next batch
    overlaps the kernels of the current one; on CPU (or when ``t`` is already there) it is a plain ``.to()``,
    which returns ``t`` itself when nothing changes, so the CPU path computes exactly what it did before.
    """
    dev = torch.device(device) if device is not None else t.device
    if dev.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(dev, dtype=dtype, non_blocking=True)
    return t.to(device=dev, dtype=dtype)


def factors_to(f: LoraFactors, device: str | torch.device | None) -> LoraFactors:
    """:class:`~lorakit.factors.LoraFactors` with every tensor moved by :func:`to_device` (dtype kept)."""
    if device is None or (f.A.device == torch.device(device) and f.B.device == torch.device(device)):
        return f
    return f.with_(A=to_device(f.A, device), B=to_device(f.B, device),
                   magnitude=None if f.magnitude is None else to_device(f.magnitude, device),
                   extras={k: to_device(v, device) for k, v in f.extras.items()})


def _libc_malloc_trim() -> Callable[[int], int] | None:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_MALLOC_TRIM = _libc_malloc_trim()


class HostMemoryTrimmer:
    """Calls :func:`release_host_memory` each time ``every_bytes`` more have been processed by a streaming loop.

    Trimming costs a few ms a call; every 16 MB of float32 factors keeps a 70B-shaped stream's heap within tens of
    MB of its working set for a few percent of its time.
    """

    def __init__(self, every_bytes: int = 16 << 20) -> None:
        self.every_bytes = every_bytes
        self._since = 0

    def processed(self, nbytes: int) -> None:
        self._since += nbytes
        if self._since >= self.every_bytes:
            release_host_memory()
            self._since = 0


def release_host_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Streaming frees a few MB of factors per module; glibc's dynamic mmap threshold keeps such blocks on the heap,
    and over hundreds of modules the freed-but-retained heap grew a 70B-shaped merge's resident memory by
    hundreds of MB. Streaming loops call this every few tens of MB processed: a few ms per call.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
