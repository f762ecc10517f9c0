"""Adapters made by PEFT itself, on tiny float64 models built from configs (no downloads).

Each case is one kind of adapter a PEFT user trains: ``get_peft_model`` on a tiny Llama, GPT-2 or conv net,
every LoRA parameter (and every ``modules_to_save`` copy) set to random non-zero values so that ΔW ≠ 0 and the
saved modules differ from the base, then ``save_pretrained``. The fixtures hand the tests the PEFT model (the
producer's own computation: ``get_delta_weight``, forward, ``merge_and_unload``), the saved directory, and a
factory for a fresh base model (for ``PeftModel.from_pretrained``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

PREFIX = "base_model.model."
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(bias: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=32, tie_word_embeddings=False, attention_bias=bias, mlp_bias=bias,
    )
    return transformers.LlamaForCausalLM(cfg).double().eval()


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


class TinyConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv3 = torch.nn.Conv2d(4, 6, 3, padding=1)
        self.conv1 = torch.nn.Conv2d(6, 5, 1)
        self.head = torch.nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv1(torch.relu(self.conv3(x))).mean(dim=(2, 3)))


def tiny_convnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyConvNet().double().eval()


@dataclass(frozen=True)
class Case:
    """One kind of PEFT adapter: the base model factory and the ``LoraConfig`` arguments."""

    base: Callable[[], torch.nn.Module]
    config: dict[str, Any]
    inputs: str = "tokens"  # or "image"

    @property
    def dora(self) -> bool:
        return bool(self.config.get("use_dora"))


CASES: dict[str, Case] = {
    "plain": Case(tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_TARGETS}),
    "lora_bias": Case(lambda: tiny_llama(bias=True),
                      {"r": 4, "lora_alpha": 6, "target_modules": LLAMA_TARGETS, "lora_bias": True}),
    "modules_to_save": Case(tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                         "modules_to_save": ["lm_head", "model.norm"]}),
    "bias_all": Case(lambda: tiny_llama(bias=True), {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                                      "bias": "all"}),
    "dora": Case(tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
                              "use_dora": True}),
    "rslora": Case(tiny_llama, {"r": 8, "lora_alpha": 16, "target_modules": LLAMA_TARGETS, "use_rslora": True,
                                "rank_pattern": {"k_proj": 2}}),
    "patterns": Case(tiny_llama, {
        "r": 8, "lora_alpha": 16, "target_modules": LLAMA_TARGETS,
        "rank_pattern": {"q_proj": 4, "model.layers.1.mlp.down_proj": 2},
        "alpha_pattern": {"v_proj": 3, "model.layers.0.self_attn.o_proj": 5.5}}),
    "embedding": Case(tiny_llama, {"r": 4, "lora_alpha": 12, "target_modules": ["embed_tokens", "q_proj", "v_proj"]}),
    "dora_embedding": Case(tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "v_proj"],
                                        "use_dora": True}),
    "conv2d": Case(tiny_convnet, {"r": 3, "lora_alpha": 6, "target_modules": ["conv3", "conv1", "head"],
                                  "rank_pattern": {"conv1": 2}, "lora_bias": True}, "image"),
    "conv2d_dora": Case(tiny_convnet, {"r": 3, "lora_alpha": 6, "target_modules": ["conv3", "conv1", "head"],
                                       "use_dora": True}, "image"),
    "gpt2_fan_in_fan_out": Case(tiny_gpt2, {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc"],
                                            "fan_in_fan_out": True}),
    "gpt2_dora": Case(tiny_gpt2, {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"],
                                  "fan_in_fan_out": True, "use_dora": True}),
}


def randomize(model: torch.nn.Module, seed: int = 1) -> None:
    """PEFT initialises B (or embedding A) to zero and saved modules to copies of the base: make every LoRA
    parameter random and non-zero (DoRA magnitudes stay positive) and every other trained parameter (saved modules,
    ``bias="all"`` biases) differ from the base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            if "lora_magnitude_vector" in name:
                p.copy_(p * (0.5 + torch.rand(p.shape, generator=g, dtype=torch.float64).to(p.dtype)))
            elif "lora_" in name:
                p.copy_(noise * 0.2)
            elif p.requires_grad:  # trained with the adapter: modules_to_save copies, bias="all" biases
                p.add_(noise * 0.3)


def model_inputs(case: Case) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    if case.inputs == "image":
        return {"x": torch.randn(2, 4, 7, 7, generator=g, dtype=torch.float64)}
    return {"input_ids": torch.randint(0, 64, (2, 10), generator=g)}


def outputs(model: torch.nn.Module, case: Case) -> torch.Tensor:
    with torch.no_grad():
        out = model(**model_inputs(case))
    return (out.logits if hasattr(out, "logits") else out).double()


def lora_layers(model: torch.nn.Module) -> dict[str, Any]:
    """PEFT's LoRA layers by lorakit module name (``base_model.model.`` stripped)."""
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix(PREFIX): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def save_base(model: torch.nn.Module, path: Path) -> Path:
    """The base checkpoint as a user has it: ``save_pretrained`` for transformers models (model.safetensors +
    config.json), a plain state dict in safetensors for the conv net."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(path)
    else:
        from safetensors.torch import save_file

        path.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    return path


@dataclass
class Made:
    """A PEFT-made adapter: the case, the live PEFT model, where it was saved, and a fresh base factory."""

    name: str
    case: Case
    model: Any
    path: Path

    def fresh_base(self) -> torch.nn.Module:
        return self.case.base()

    def merged(self) -> torch.nn.Module:
        """The producer's own merge: ``merge_and_unload`` on a copy (the live model stays a PeftModel)."""
        return copy.deepcopy(self.model).merge_and_unload()


def make(name: str, root: Path, seed: int = 1) -> Made:
    case = CASES[name]
    model = peft.get_peft_model(case.base(), peft.LoraConfig(**case.config))
    randomize(model, seed)
    model.eval()
    out = root / f"peft-{name}-{seed}"
    model.save_pretrained(out, save_embedding_layers=False)
    return Made(name, case, model, out)


@pytest.fixture(params=sorted(CASES))
def made(request, tmp_path) -> Made:
    return make(request.param, tmp_path)


@pytest.fixture
def maker(tmp_path) -> Callable[..., Made]:
    return lambda name, seed=1: make(name, tmp_path, seed)
