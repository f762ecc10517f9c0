"""Shared fixtures: deterministic random adapters and the CLI runner."""

from __future__ import annotations

import os

import pytest
import torch

# Tests never touch the network: PEFT and transformers must not try to reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture
def cli(tmp_path):
    """Run ``lorakit ARGS...`` through the real entry point; returns (exit_code, stdout, stderr)."""
    from click.testing import CliRunner
    from lorakit.cli.main import cli as group

    def run(*args: str):
        runner = CliRunner()
        result = runner.invoke(group, [str(a) for a in args], catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    return run


@pytest.fixture
def tiny_llama_2l():
    """A 2-layer, hidden-64 Llama built from a config (GQA: 2 key/value heads; seed 0), in eval mode."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=97)
    return transformers.LlamaForCausalLM(config).eval()
