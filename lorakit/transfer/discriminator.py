"""Discriminator role: a LoRA on the *source* model that answers whether an input belongs to the task.

Query ``t(x) = "{x}\\nIs the above question from {NAME} dataset? "``; trained, while the task data exists, with
cross-entropy towards ``yes`` on real inputs and ``no`` on inputs the source model generated from the seeds
(Trans-LoRA §3). At transfer time it only scores: an input is kept iff
``log p(yes | t(x)) − log p(no | t(x)) > τ`` (strict; decided at the first token where the answers differ, so any
tokenizer works). ``τ = 0`` is the paper's rule. ``prepare`` lowers τ below 0 only when the trained
discriminator would reject more than ``1 − recall`` of held-out *real* inputs (:func:`calibrate_threshold`): when the generated inputs look like the real ones, a
cross-entropy-trained discriminator is near-constant and its sign arbitrary, and the paper's rule then rejects
(almost) everything, so the rejection sampling never ends. It never trains on target-generated data: the only
training entry point, :func:`train_discriminator`, is called by ``prepare``, which has no target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.adapter import Adapter
from lorakit.errors import LorakitError
from lorakit.transfer.models import continuation_logprob, encode
from lorakit.transfer.train import TrainConfig, train_lora

YES, NO = "yes", "no"


def question(x: str, task: str) -> str:
    return f"{x}\nIs the above question from {task} dataset? "


def accept(logp_yes: torch.Tensor, logp_no: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """The rejection rule: keep iff ``log p(yes) − log p(no) > threshold``, strictly (a tie is rejected);
    ``threshold = 0`` is p(yes) > p(no) (for finite floats a − b > 0 exactly when a > b)."""
    return logp_yes - logp_no > threshold


def calibrate_threshold(log_odds_real: torch.Tensor, recall: float) -> float:
    """The largest τ ≤ 0 under which :func:`accept` keeps at least ``ceil(recall·n)`` of the ``n`` held-out real
    inputs, whose ``log p(yes) − log p(no)`` are ``log_odds_real``: 0 (the paper's rule) when that already keeps
    them, else just below the ``(n − ceil(recall·n) + 1)``-th smallest log-odds. ``recall = 0`` returns 0.
    Cost: one sort of n values."""
    if not 0.0 <= recall <= 1.0:
        raise LorakitError(f"the real-input recall must lie in [0, 1] (got {recall})")
    n = log_odds_real.numel()
    need = math.ceil(recall * n - 1e-9)
    if n == 0 or need == 0:
        return 0.0
    s = torch.sort(log_odds_real.double().reshape(-1)).values
    kth = float(s[n - need])  # accepting every value >= kth keeps at least `need`
    return min(0.0, math.nextafter(kth, -math.inf))


@dataclass
class Discriminator:
    """The source model with the discriminator LoRA applied (see :func:`lorakit.transfer.models.apply_adapter`)."""

    model: Any
    tok: Any
    task: str
    threshold: float = 0.0

    def scores(self, inputs: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log p(yes), log p(no))`` per input, float64.

        The answer is decided at the first token where ``yes`` and ``no`` differ (their first token with usual
        tokenizers, where each is one token): comparing whole-sequence probabilities would favour the answer
        with fewer tokens under a character-level tokenizer."""
        qs = [question(x, self.task) for x in inputs]
        y, n = encode(self.tok, YES), encode(self.tok, NO)
        k = next((i for i, (a, b) in enumerate(zip(y, n)) if a != b), None)
        if k is None:  # one is a prefix of the other: compare the whole sequences
            return (continuation_logprob(self.model, self.tok, qs, y),
                    continuation_logprob(self.model, self.tok, qs, n))
        return (continuation_logprob(self.model, self.tok, qs, y[: k + 1]),
                continuation_logprob(self.model, self.tok, qs, n[: k + 1]))

    def keep(self, inputs: Sequence[str]) -> list[bool]:
        if not inputs:
            return []
        return accept(*self.scores(inputs), self.threshold).tolist()

    def log_odds(self, inputs: Sequence[str]) -> torch.Tensor:
        """``log p(yes) − log p(no)`` per input (float64)."""
        yes, no = self.scores(inputs)
        return yes - no


def train_discriminator(source_model: Any, tok: Any, real: Sequence[str], source_generated: Sequence[str],
                        task: str, config: TrainConfig, *, device: torch.device | str = "cpu",
                        base_model_name: str | None = None) -> Adapter:
    """Train the discriminator LoRA on ``real`` (yes) vs ``source_generated`` (no); balanced by repetition of
    the smaller class. Inputs that occur among the real ones are removed from the negatives."""
    real_set = set(real)
    fake = [x for x in source_generated if x not in real_set]
    if not real or not fake:
        raise LorakitError(f"the discriminator needs real and generated inputs (got {len(real)} real, "
                           f"{len(fake)} generated that differ from the real ones)",
                           hint="give more task data, or raise --negatives / the generation budget")
    pos = [(question(x, task), YES) for x in real]
    neg = [(question(x, task), NO) for x in fake]
    if neg and len(neg) < len(pos):
        neg = (neg * (len(pos) // len(neg) + 1))[: len(pos)]
    elif pos and len(pos) < len(neg):
        pos = (pos * (len(neg) // len(pos) + 1))[: len(neg)]
    return train_lora(source_model, tok, pos + neg, config, device=device, base_model_name=base_model_name)
