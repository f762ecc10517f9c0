"""The read-ahead thread: same values as plain loads, errors reach the caller, bounded lookahead."""

from __future__ import annotations

import threading

import pytest

from lorakit.errors import CorruptFileError
from lorakit.io.prefetch import Prefetcher


def _recorder():
    loads: list[str] = []
    threads: set[int] = set()

    def load(name: str) -> str:
        loads.append(name)
        threads.add(threading.get_ident())
        return name.upper()

    return load, loads, threads


def test_in_order_gets_load_each_name_once_in_one_thread():
    load, loads, threads = _recorder()
    names = [f"m{i}" for i in range(20)]
    p = Prefetcher(load, names, {n: 10 for n in names}, ahead_bytes=25)
    assert [p.get(n) for n in names] == [n.upper() for n in names]
    assert sorted(loads) == sorted(names)  # never twice
    assert threading.get_ident() not in threads and len(threads) == 1
    assert p._pool is None  # the thread ends after the last name


def test_lookahead_is_bounded_by_bytes_but_at_least_one():
    gate = threading.Event()
    load, _, _ = _recorder()

    def slow(name: str) -> str:
        gate.wait(5)
        return load(name)

    names = [f"m{i}" for i in range(10)]
    p = Prefetcher(slow, names, {n: 10 for n in names}, ahead_bytes=0)
    gate.set()
    assert p.get("m0") == "M0"
    assert set(p._pending) == {"m1"}  # one ahead when ahead_bytes is 0
    p2 = Prefetcher(slow, names, {n: 10 for n in names}, ahead_bytes=35)
    assert p2.get("m0") == "M0"
    assert set(p2._pending) == {"m1", "m2", "m3", "m4"}
    p.close()
    p2.close()


def test_out_of_order_and_unknown_names_load_on_demand():
    load, loads, _ = _recorder()
    names = ["a", "b", "c", "d"]
    p = Prefetcher(load, names, {}, ahead_bytes=0)
    assert p.get("c") == "C"
    assert p.get("a") == "A"  # behind the read-ahead: loaded on demand
    assert p.get("zz") == "ZZ"
    assert p.get("d") == "D"
    assert loads.count("d") == 1


def test_a_load_error_reaches_the_caller_of_that_name_unchanged():
    def load(name: str) -> str:
        if name == "bad":
            raise CorruptFileError("truncated", file="x.safetensors", module=name)
        return name

    p = Prefetcher(load, ["ok", "bad", "after"], {}, ahead_bytes=100)
    assert p.get("ok") == "ok"
    with pytest.raises(CorruptFileError, match="truncated"):
        p.get("bad")
    assert p.get("after") == "after"
