"""Teacher role: the source model with the task LoRA applied labels the accepted synthetic inputs.

Greedy decoding up to the first newline (the paper does not state greedy vs sampled; greedy is deterministic).
The LoRA is applied by adding ``ΔW = s·B@A`` to the base weights (exact, any lorakit-readable format).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lorakit.transfer.models import greedy, render


@dataclass
class Teacher:
    model: Any
    tok: Any
    max_new_tokens: int = 48

    def complete(self, inputs: Sequence[str]) -> list[str]:
        """The teacher's answer to each input (without the trailing newline)."""
        return greedy(self.model, self.tok, [render(x) for x in inputs], max_new_tokens=self.max_new_tokens)
