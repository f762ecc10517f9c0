"""RunOptions: the one resolution of device, dtype, seed, window and threads."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.run import RunOptions, run_options


def test_auto_and_defaults_follow_the_device():
    run = RunOptions.resolve()
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert run.device.type == want and run.dtype is None and run.seed is None and run.threads is None
    assert run.window_bytes == ((512 << 20) if want == "cuda" else 1)  # linalg.default_window_bytes
    assert RunOptions.resolve("cpu", window_bytes=0).window_bytes == 0
    assert run_options(None) == run and run_options(run) is run


def test_seed_dtype_and_replacement():
    run = RunOptions.resolve("cpu", dtype=torch.float16, seed=7)
    assert run.dtype is torch.float16 and run.seed_or(0) == 7 and RunOptions.resolve("cpu").seed_or(3) == 3
    assert dataclasses.replace(run, seed=None).seed_or(5) == 5 and run.seed == 7  # frozen: with_ copies
    with pytest.raises(AttributeError):
        run.seed = 1  # type: ignore[misc]


def test_threads_are_applied_once_at_resolution():
    before = torch.get_num_threads()
    try:
        assert RunOptions.resolve("cpu", threads=1).threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bad_options_fail_at_resolution():
    with pytest.raises(LorakitError, match="no CUDA device"):
        RunOptions.resolve("cuda")
    with pytest.raises(LorakitError, match="threads"):
        RunOptions.resolve("cpu", threads=0)
    with pytest.raises(LorakitError, match="window"):
        RunOptions.resolve("cpu", window_bytes=-1)
