"""Checkpoint reading/writing: single file and sharded with index, plain reads, atomic layout-preserving writes."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.errors import CorruptFileError, FormatError
from lorakit.io.checkpoint import Checkpoint, CheckpointWriter
from tests.io._checkpoints import write_checkpoint


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "b.weight": torch.randn(4, generator=g, dtype=torch.float64),
        "c.weight": torch.randn(2, 3, 2, 2, generator=g),
        "d.empty": torch.zeros(0, 3),
        "e.ids": torch.arange(6, dtype=torch.int64),
    }


@pytest.mark.parametrize("shards", [1, 2])
def test_read_every_dtype_and_layout(tmp_path, shards):
    ts = _tensors()
    path = write_checkpoint(tmp_path / ("m.safetensors" if shards == 1 else "m"), ts, shards)
    ck = Checkpoint(path)
    assert set(ck.keys()) == set(ts) and ck.sharded == (shards > 1) and len(ck.shards) == shards
    for k, t in ts.items():
        got = ck.get(k)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)
        assert ck.shape(k) == tuple(t.shape)
    if shards > 1:
        assert Checkpoint(path / "model.safetensors.index.json").keys() == ck.keys()


def test_writer_keeps_layout_and_is_atomic(tmp_path):
    ts = _tensors()
    src = Checkpoint(write_checkpoint(tmp_path / "m", ts, 2))
    for out, tensors in [(tmp_path / "copy", None), (tmp_path / "in-place", src.tensor_layout())]:
        with CheckpointWriter(out, src.layout(), companions=[tmp_path / "m" / "config.json"], tensors=tensors) as w:
            for names in src.layout().values():
                for k in names:
                    w.add(k, src.get(k))
    for shard in src.layout():  # the dtypes and shapes given up front change nothing in the files
        assert (tmp_path / "in-place" / shard).read_bytes() == (tmp_path / "copy" / shard).read_bytes()
    out = tmp_path / "copy"
    copy = Checkpoint(out)
    assert copy.layout() == src.layout() and (out / "config.json").exists()
    assert all(torch.equal(copy.get(k), ts[k]) for k in ts)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ts.values())
    # a failure midway leaves nothing behind
    failed = tmp_path / "failed"
    with pytest.raises(RuntimeError), CheckpointWriter(failed, src.layout()) as w:
        w.add(src.layout()[next(iter(src.layout()))][0], torch.zeros(1))
        raise RuntimeError("boom")
    assert not failed.exists()
    with pytest.raises(FormatError, match="missing"), CheckpointWriter(tmp_path / "short", src.layout()) as w:
        w.add(src.layout()[next(iter(src.layout()))][0], torch.zeros(1))
    assert not (tmp_path / "short").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "in-place", "m"]


def test_bad_checkpoints(tmp_path):
    path = write_checkpoint(tmp_path / "m", _tensors(), 2)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FormatError, match="ghost.weight"):
        Checkpoint(path)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FormatError, match="missing"):
        Checkpoint(path)
    (tmp_path / "t.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CorruptFileError):
        Checkpoint(tmp_path / "t.safetensors")
    with pytest.raises(FormatError, match="no such"):
        Checkpoint(tmp_path / "nothing")
