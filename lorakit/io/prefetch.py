"""Read ahead: load the next items of a known order in one background thread while the caller computes.

Streaming work reads module ``i + 1`` (``pread`` of its tensors, the cast, the NaN check) while module ``i``'s QRs
run: on CPU the read uses the second core, on CUDA it keeps the host busy while the GPU computes. ``pread`` and
torch's kernels release the GIL, so one Python thread is enough. All reads happen in that one thread, so readers
need not be thread-safe among themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")


class Prefetcher(Generic[T]):
    """``get(name)`` returns ``load(name)``; meanwhile the names after it in ``order`` are loaded ahead, up to
    ``ahead_bytes`` of them (by ``nbytes``) outstanding, at least one.

    An exception raised by ``load`` reaches the caller of ``get`` for that name, unchanged. Names asked for out of
    order are loaded on demand, never twice while pending. The thread ends after the last name of ``order`` is
    taken, or at :meth:`close`.
    """

    def __init__(self, load: Callable[[str], T], order: Sequence[str], nbytes: Mapping[str, int],
                 ahead_bytes: int) -> None:
        self._load = load
        self._order = list(order)
        self._position = {n: i for i, n in enumerate(self._order)}
        self._nbytes = nbytes
        self._ahead = ahead_bytes
        self._next = 0  # index in order of the next name to submit
        self._pending: dict[str, Future[T]] = {}
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(1, thread_name_prefix="lorakit-read")

    def get(self, name: str) -> T:
        if self._pool is None:  # closed: plain loads
            return self._load(name)
        future = self._pending.pop(name, None) or self._pool.submit(self._load, name)
        self._next = max(self._next, self._position.get(name, -1) + 1)
        self._fill()
        try:
            return future.result()
        finally:
            if self._next >= len(self._order) and not self._pending:
                self.close()

    def _fill(self) -> None:
        assert self._pool is not None
        outstanding = sum(self._nbytes.get(n, 0) for n in self._pending)
        while self._next < len(self._order) and (not self._pending or outstanding < self._ahead):
            name = self._order[self._next]
            self._next += 1
            if name not in self._pending:
                self._pending[name] = self._pool.submit(self._load, name)
                outstanding += self._nbytes.get(name, 0)

    def close(self) -> None:
        """Stop reading ahead (what is pending is dropped once its read ends)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            self._pending.clear()
