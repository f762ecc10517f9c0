"""Micro causal LMs (trained for a few seconds here), a task data set and a source LoRA, shared by the tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import lorakit
from lorakit.run import RunOptions
from lorakit.testing import random_factors
from lorakit.transfer.tiny import char_tokenizer, pretrain, random_word, save_base, tiny_model


def task_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(w, w[::-1].upper()) for w in (random_word(rng) for _ in range(n))]


def write_task(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"input": x, "output": y}) + "\n" for x, y in pairs))
    return path


@pytest.fixture(scope="session")
def micro(tmp_path_factory):
    """Paths: two micro bases (gpt2 source, llama target), a third source-like base, task data, a source LoRA."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("transfer")
    tok = char_tokenizer()
    paths = {}
    for name, arch, hidden, seed in (("source", "gpt2", 32, 1), ("target", "llama", 32, 2), ("other", "gpt2", 32, 3)):
        model = tiny_model(arch, hidden=hidden, layers=1, heads=2, seed=seed)
        if name != "other":  # enough steps to write newline-terminated inputs; "other" only needs to differ
            pretrain(model, tok, steps=25, batch=8, seed=seed, lr=1e-2)
        paths[name] = str(save_base(model, tok, root / name))
    from lorakit.adapter import Adapter, AdapterMeta
    from lorakit.transfer.models import load_causal_lm
    from lorakit.transfer.projection import model_weights

    src = load_causal_lm(paths["source"])[0]

    mods = {}
    for i, (name, w) in enumerate(model_weights(src).items()):
        mods[name] = random_factors(w.shape[0], w.shape[1], 4, scale=0.5, generator=torch.Generator().manual_seed(i))
    lora_path = root / "source-lora"
    lorakit.save(Adapter(mods, AdapterMeta(base_model=paths["source"])), lora_path, format="peft")
    paths["lora"] = str(lora_path)
    paths["data"] = str(write_task(root / "revupper.jsonl", task_pairs(48, 0)))
    return paths


@pytest.fixture(scope="session")
def kit(micro, tmp_path_factory):
    """A transfer kit prepared from the micro source (small discriminator budget)."""
    from lorakit.transfer import pipeline
    from lorakit.transfer.train import TrainConfig

    out = tmp_path_factory.mktemp("kit") / "kit"
    pipeline.prepare(micro["lora"], micro["source"], micro["data"], out, seeds=5, negatives=24,
                     generation_round=24, disc_config=TrainConfig(epochs=1, rank=2, batch_size=16),
                     run=RunOptions.resolve("cpu"), seed=0)
    return str(out)
