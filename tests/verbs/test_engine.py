"""The shared module loop (verbs.engine.ModuleStream): windows, hand-out once, read-ahead, progress, errors."""

from __future__ import annotations

import threading

import pytest

from lorakit.verbs.engine import ModuleStream

ORDER = ["a", "b", "c", "d", "e"]


def _recording_stream(window_bytes: int, *, keep=lambda n: True, read_ahead: bool = True, progress=None):
    """A stream over ORDER (10 bytes a module) whose work squares a number read per module; it records the
    windows it was given, the names read and the reading threads."""
    windows: list[list[str]] = []
    reads: list[tuple[str, str]] = []

    def read(n: str) -> int:
        reads.append((n, threading.current_thread().name))
        return ORDER.index(n)

    def work(window: list[str], inputs) -> dict[str, int]:
        windows.append(list(window))
        return {n: inputs(n) ** 2 for i, n in enumerate(window) if i == 0 or keep(n)}

    stream = ModuleStream(ORDER, read, work, nbytes=lambda n: 10, window_bytes=window_bytes,
                          read_ahead=read_ahead, progress=progress, label="test")
    return stream, windows, reads


def test_one_module_at_a_time_without_a_window():
    stream, windows, _ = _recording_stream(0)
    assert list(stream) == [(n, i * i) for i, n in enumerate(ORDER)]
    assert windows == [[n] for n in ORDER]


def test_windows_are_cut_by_bytes_and_results_handed_out_once():
    stream, windows, _ = _recording_stream(25)  # 10 bytes a module: three per window (cut once ≥ 25)
    assert [stream.get(n) for n in ORDER] == [0, 1, 4, 9, 16]
    assert windows == [["a", "b", "c"], ["d", "e"]]
    # asked for again: computed again, with the window that starts at it (what is done is not redone)
    assert stream.get("b") == 1
    assert windows[-1] == ["b"]


def test_names_the_work_leaves_out_start_a_later_window():
    stream, windows, _ = _recording_stream(1000, keep=lambda n: n != "c")
    assert [stream.get(n) for n in ORDER] == [0, 1, 4, 9, 16]
    assert windows == [ORDER, ["c"]]


def test_reads_run_ahead_in_one_background_thread():
    stream, _, reads = _recording_stream(0)
    list(stream)
    assert sorted(n for n, _ in reads) == ORDER  # each module read once
    assert {t for _, t in reads} != {threading.current_thread().name}
    assert all(t.startswith("lorakit-read") for _, t in reads)


def test_without_read_ahead_reads_are_inline():
    stream, _, reads = _recording_stream(0, read_ahead=False)
    list(stream)
    assert reads == [(n, threading.current_thread().name) for n in ORDER]


def test_progress_wraps_the_names_when_iterated():
    seen = []

    def progress(names, total, label):
        seen.append((total, label))
        for n in names:
            seen.append(n)
            yield n

    stream, _, _ = _recording_stream(0, progress=progress)
    assert [n for n, _ in stream] == ORDER
    assert seen == [(5, "test"), *ORDER]


def test_an_error_in_read_or_work_reaches_the_caller_unchanged():
    def read(n: str) -> int:
        if n == "c":
            raise ValueError("bad c")
        return 1

    stream = ModuleStream(ORDER, read, lambda w, inputs: {w[0]: inputs(w[0])}, nbytes=lambda n: 1)
    assert stream.get("a") == 1 and stream.get("b") == 1
    with pytest.raises(ValueError, match="bad c"):
        stream.get("c")


def test_streamed_adapter_reads_ahead_and_applies_its_function():
    from dataclasses import replace

    import torch

    from lorakit.testing import random_adapter
    from lorakit.verbs.engine import streamed

    from ._spy import spied

    a = random_adapter({"q": (6, 4), "v": (3, 4), "o": (4, 6)}, 2, seed=0)
    reads: list[tuple[str, str]] = []
    plain = streamed(spied(a, reads))
    assert list(plain) == list(a) and plain.infos() == a.infos() and plain.meta is a.meta
    for n in plain:
        f = plain[n]
        assert torch.equal(f.B, a[n].B) and torch.equal(f.A, a[n].A)
    assert sorted(n for n, _ in reads) == sorted(a)  # each read once, ahead, in the background
    assert all(t.startswith("lorakit-read") for _, t in reads)
    half = streamed(a, lambda _n, f: f.to(dtype=torch.float16),
                    {n: replace(i, dtype=torch.float16) for n, i in a.infos().items()})
    assert half["v"].A.dtype == torch.float16 and half.info("v").dtype == torch.float16
