"""Tiny safetensors checkpoints (single file or sharded with an index) for the apply/extract tests."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from lorakit.io.writer import write_safetensors


def write_checkpoint(path: Path, tensors: Mapping[str, torch.Tensor], shards: int = 1) -> Path:
    """``path.safetensors`` for one shard, else a directory with ``model-0000i-of-0000n.safetensors`` + index."""
    if shards == 1:
        write_safetensors(path, tensors, {"format": "pt"})
        return path
    path.mkdir()
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        write_safetensors(path / shard, part, {"format": "pt"})
        weight_map.update({n: shard for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (path / "config.json").write_text('{"model_type": "toy"}')
    return path
