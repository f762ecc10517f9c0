"""A lazy adapter that records which module is read, and in which thread (to see a verb's reads go through the
engine's background read-ahead, and that a refused input is refused before any read)."""

from __future__ import annotations

import threading
from functools import partial

from lorakit.adapter import Adapter


def spied(adapter: Adapter, reads: list[tuple[str, str]]) -> Adapter:
    """``adapter`` made lazy; each read appends ``(module, thread name)`` to ``reads``."""

    def read(n: str):
        reads.append((n, threading.current_thread().name))
        return adapter[n]

    return Adapter({n: partial(read, n) for n in adapter}, adapter.meta, adapter.infos())
