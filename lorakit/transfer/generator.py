"""Generator role: writes new task inputs from the seed examples, by in-context sampling.

The prompt is the seeds rendered as ``Q: x\\nA: y\\n`` (their order shuffled per round) followed by ``Q: ``; the
model's continuation up to the first newline is one synthetic input. Trans-LoRA uses the target model as the
generator at transfer time and the source model (for the discriminator's negatives) at prepare time; lorakit's
``run`` lets the target and the source take turns by round (:data:`lorakit.transfer.pipeline.DEFAULT_GENERATORS`).
Round ``k`` samples from ``seed·1_000_003 + k``, so a run (and a resumed run) is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.transfer.models import encode, render, sample, stop_id


@dataclass
class Generator:
    """A causal LM that writes task inputs like the seeds'.

    Args:
        model, tok: the generating model and its tokenizer.
        name: what produced the samples (recorded in the kit/run state).
        temperature: sampling temperature; max_new_tokens: the longest input it may write.
    """

    model: Any
    tok: Any
    name: str
    temperature: float = 1.0
    max_new_tokens: int = 48

    def prompt(self, seeds: Sequence[tuple[str, str]], round_: int, seed: int) -> str:
        order = torch.randperm(len(seeds), generator=torch.Generator().manual_seed(seed * 7919 + round_)).tolist()
        return "".join(render(*seeds[i]) for i in order) + "Q: "

    def generate(self, seeds: Sequence[tuple[str, str]], n: int, *, round_: int = 0, seed: int = 0) -> list[str]:
        """Up to ``n`` inputs for one round (continuations that never end, or are empty, are dropped)."""
        gen = torch.Generator().manual_seed(seed * 1_000_003 + round_)
        ids = encode(self.tok, self.prompt(seeds, round_, seed))
        outs = sample(self.model, ids, n, max_new_tokens=self.max_new_tokens, stop=stop_id(self.tok),
                      temperature=self.temperature, generator=gen)
        texts = [self.tok.decode(o).strip() for o in outs if o]
        return [t for t in texts if t]
