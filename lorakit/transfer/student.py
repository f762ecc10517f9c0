"""Student role: a fresh LoRA on the target model, distilled from the teacher's completions.

Sequence-level knowledge distillation (Trans-LoRA): cross-entropy on the teacher's completions of the synthetic
inputs; works across tokenizers. ``token_kl=True`` (same vocabulary only) instead matches the teacher's
next-token distributions on the same positions, KL(teacher ‖ student).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lorakit.adapter import Adapter
from lorakit.errors import LorakitError
from lorakit.transfer.models import STOP, render
from lorakit.transfer.train import TrainConfig, train_lora


def distillation_pairs(inputs: Sequence[str], completions: Sequence[str]) -> list[tuple[str, str]]:
    return [(render(x), y + STOP) for x, y in zip(inputs, completions, strict=True)]


def train_student(target_model: Any, tok: Any, inputs: Sequence[str], completions: Sequence[str],
                  config: TrainConfig, *, device: torch.device | str = "cpu", checkpoint: str | Path | None = None,
                  teacher_model: Any | None = None, teacher_tok: Any | None = None,
                  on_step: Callable[[int, int, float], None] | None = None,
                  base_model_name: str | None = None) -> Adapter:
    """Train the student LoRA; ``teacher_model`` given means token-level KL (tokenizers must match)."""
    if teacher_model is not None and (teacher_tok is None or teacher_tok.get_vocab() != tok.get_vocab()):
        raise LorakitError("token-level KL needs the source and target to share a tokenizer",
                           hint="drop --token-kl: sequence-level distillation works across tokenizers")
    return train_lora(target_model, tok, distillation_pairs(inputs, completions), config, device=device,
                      checkpoint=checkpoint, teacher=teacher_model, on_step=on_step,
                      base_model_name=base_model_name)
