"""Dense buffers reused across the modules of one merge run.

Why: a delta-space merge holds its module's dense ``(out, in)`` float32 result ``M`` while it is merged and
returned to low rank. Allocated fresh for each module, that memory is mapped and faulted in page by page on
first touch: 1.1-1.7 ns an entry of an 8B ``gate_proj`` (about a quarter of its whole TIES merge), the same
again for every module. The pipeline gives each run one :class:`Scratch`; a module takes a buffer, and hands
it back when its factors are computed, so the next module of that size writes into memory already mapped.

Bound: at most one buffer per module being merged at once (the run's concurrency), each the size of the
largest module that needed it; a request no free buffer fits drops the smaller free ones. The buffers go with
the run (nothing is held once its adapter is written and dropped).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


class Scratch:
    """A pool of flat buffers; :meth:`take` lends one viewed as the shape asked (its contents undefined)."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    @contextmanager
    def take(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> Iterator[torch.Tensor]:
        n = math.prod(shape)
        device = torch.device(device)
        with self._lock:
            same = [j for j, b in enumerate(self._free) if b.dtype == dtype and b.device == device]
            fits = [j for j in same if self._free[j].numel() >= n]
            buf = None
            if fits:
                buf = self._free.pop(min(fits, key=lambda j: self._free[j].numel()))
            else:  # the smaller ones are superseded: keep the pool at one buffer per concurrent module
                self._free = [b for j, b in enumerate(self._free) if j not in same]
        if buf is None:
            buf = torch.empty(n, dtype=dtype, device=device)
        try:
            yield buf[:n].view(*shape)
        finally:
            with self._lock:
                self._free.append(buf)

    @property
    def held_bytes(self) -> int:
        """Bytes in free buffers now."""
        with self._lock:
            return sum(b.numel() * b.element_size() for b in self._free)


@contextmanager
def dense(scratch: Scratch | None, shape: Sequence[int], dtype: torch.dtype,
          device: torch.device | str) -> Iterator[torch.Tensor]:
    """A ``shape`` buffer from ``scratch``, or a fresh ``torch.empty`` without one."""
    if scratch is None:
        yield torch.empty(*shape, dtype=dtype, device=device)
    else:
        with scratch.take(shape, dtype, device) as buf:
            yield buf
