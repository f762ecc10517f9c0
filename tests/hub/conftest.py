"""Fixtures for the hub tests: a loopback fake Hub, an isolated cache, and helpers to publish adapters to it.

The real ``huggingface_hub`` client talks to the fake over HTTP. ``tests/conftest.py`` sets ``HF_HUB_OFFLINE=1``
for the whole suite (and huggingface_hub may have read it at import), so :func:`hub_env` turns online mode back
on, both in the environment lorakit reads at call time and in ``huggingface_hub.constants``.

    def test_x(fake_hub, hub_env):
        fake_hub.add_repo("org/a", peft_repo_files(seed=0), tags=["peft", "lora"])
        lorakit.load("hf://org/a")
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub")

from tests.hub.fake_hub import FakeHub

SHAPES = {"model.layers.0.self_attn.q_proj": (16, 16), "model.layers.0.self_attn.v_proj": (8, 16)}


@pytest.fixture
def fake_hub():
    """A running :class:`FakeHub` on 127.0.0.1 (its ``url`` is the endpoint); stopped after the test."""
    hub = FakeHub().start()
    yield hub
    hub.stop()


@pytest.fixture
def hub_env(fake_hub, tmp_path, monkeypatch):
    """Point lorakit (and huggingface_hub) at ``fake_hub`` with a fresh cache; returns the cache dir."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("LORAKIT_HUB_ENDPOINT", fake_hub.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_TOKEN", fake_hub.token)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))  # no stored login
    return cache


def _save_to_bytes(adapter, name: str, fmt: str) -> dict[str, bytes]:
    import lorakit

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / name
        lorakit.save(adapter, out, format=fmt)
        if out.is_dir():
            return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        return {name: out.read_bytes()}


def peft_repo_files(seed: int = 0, base_model: str = "org/base", rank: int = 4) -> dict[str, bytes]:
    """``adapter_config.json`` + ``adapter_model.safetensors`` of a random PEFT adapter, plus a card and a
    training pickle that a pull must not fetch."""
    from lorakit.adapter import AdapterMeta
    from lorakit.testing import random_adapter

    a = random_adapter(SHAPES, rank=rank, seed=seed, meta=AdapterMeta(base_model=base_model))
    files = _save_to_bytes(a, "adapter", "peft")
    cfg = json.loads(files["adapter_config.json"])
    cfg["base_model_name_or_path"] = base_model
    files["adapter_config.json"] = json.dumps(cfg).encode()
    files["README.md"] = b"---\nlibrary_name: peft\n---\n# adapter\n"
    files["training_args.bin"] = b"not an adapter, never fetched"
    files["checkpoint-10/adapter_model.safetensors"] = files["adapter_model.safetensors"]
    return files


def kohya_repo_files(seed: int = 1, name: str = "style.safetensors") -> dict[str, bytes]:
    """One kohya-format ``.safetensors`` file (and a sample image that a pull must not fetch)."""
    from lorakit.testing import random_adapter

    a = random_adapter(SHAPES, rank=4, seed=seed)
    files = _save_to_bytes(a, name, "kohya")
    files["sample.png"] = b"\x89PNG not fetched"
    return files


def go_offline(monkeypatch) -> None:
    """Offline mode as a user sets it: ``HF_HUB_OFFLINE=1`` (lorakit reads it per call; the client per import)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def blobs(cache: Path) -> list[Path]:
    """Every complete blob in a Hugging Face cache."""
    return [p for p in cache.glob("models--*/blobs/*") if not p.name.endswith(".incomplete")]


@pytest.fixture
def publish(fake_hub):
    """``publish(repo_id, files_or_kind, **attrs) -> commit``: create a repo on the fake hub."""

    def make(repo_id: str, files: dict[str, bytes] | str = "peft", **attrs):
        if isinstance(files, str):
            files = peft_repo_files() if files == "peft" else kohya_repo_files()
        return fake_hub.add_repo(repo_id, files, **attrs)

    return make
