"""Independent work on the CPU's cores: each item on its own thread, each thread running torch on one core.

Why: the delta-space merges of one module are a sequence of small passes (a GEMM, a C loop, another GEMM) over
cache-sized tiles. Split over two torch threads, every pass meets at the thread pool's barrier, and a module at
two threads measured only 1.4× the speed of one thread (8.6 against 12.6 ns an entry of an 8B ``gate_proj``
TIES pair). Two modules at a time, each on one torch thread, keep both cores on whole modules. ctypes calls and
torch's kernels release the GIL, so Python threads suffice.

``torch.set_num_threads(1)`` in a worker sets that thread's own OpenMP and MKL thread counts (and the default a
thread starts with); the calling thread keeps its own, so GEMMs outside the workers still use every thread. A
result computed in a worker is the result of a one-thread run, whatever the number of workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_pools: dict[int, ThreadPoolExecutor] = {}


def _one_torch_thread() -> None:
    torch.set_num_threads(1)


def workers() -> int:
    """How many items :func:`parallel_map` runs at once: torch's thread count in this thread."""
    return torch.get_num_threads()


def parallel_map(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[fn(x) for x in items]``, on up to :func:`workers` threads of one torch thread each, results in the order
    of ``items``; in this thread, in order, when torch runs one thread or there is one item. An exception in
    ``fn`` is raised here (the other items still finish first)."""
    todo = list(items)
    threads = min(workers(), len(todo))
    if threads <= 1:
        return [fn(x) for x in todo]
    pool = _pools.get(threads)
    if pool is None:
        pool = _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="lorakit-worker",
                                                    initializer=_one_torch_thread)
    futures = [pool.submit(fn, x) for x in todo]
    errors = [f.exception() for f in futures]
    for e in errors:
        if e is not None:
            raise e
    return [f.result() for f in futures]
