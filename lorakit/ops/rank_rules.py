"""Rank selection from a spectrum: the one implementation behind ``--rank``, ``--energy``, ``--sv-ratio``,
``--sv-cumulative`` and ``--error`` (resize, the ``svd`` merge, LEGO's k...).

Given singular values ``σ_1 ≥ … ≥ σ_n`` of a module's ΔW:

- ``rank K``: ``min(K, n)`` (the caller decides whether K > n is an error or zero padding);
- ``energy E`` ∈ (0, 1]: the smallest k with ``Σ_{i≤k} σ_i² ≥ E·Σ σ_i²``;
- ``sv_ratio T`` > 1: keep ``σ_i ≥ σ_1 / T`` (kohya's ``sv_ratio``);
- ``sv_cumulative T`` ∈ (0, 1]: the smallest k with ``Σ_{i≤k} σ_i ≥ T·Σ σ_i`` (kohya's ``sv_cumulative``);
- ``error E`` ∈ [0, 1): the smallest k with relative Frobenius error ``sqrt(Σ_{i>k} σ_i² / Σ σ_i²) ≤ E``.

Every rule keeps at least rank 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lorakit.errors import OperatorParameterError

RuleKind = Literal["rank", "energy", "sv_ratio", "sv_cumulative", "error"]


@dataclass(frozen=True)
class RankRule:
    """A rank-selection rule; build with :func:`rank_rule` to get validation."""

    kind: RuleKind
    value: float

    def __str__(self) -> str:
        return f"{self.kind.replace('_', '-')} {int(self.value) if self.kind == 'rank' else self.value}"

    def select(self, S: torch.Tensor) -> int:
        """The rank this rule keeps for singular values ``S`` (1-D, descending)."""
        n = int(S.numel())
        if n == 0:
            return 0
        if self.kind == "rank":
            return min(int(self.value), n)
        s = S.double().clamp_min(0)
        if float(s[0]) == 0.0:
            return 1
        if self.kind == "sv_ratio":
            return max(1, int((s >= s[0] / self.value).sum()))
        if self.kind == "sv_cumulative":
            c = torch.cumsum(s, 0) / s.sum()
            return max(1, min(n, int((c < self.value - 1e-12).sum()) + 1))
        s2 = s**2
        total = s2.sum()
        if self.kind == "energy":
            c = torch.cumsum(s2, 0) / total
            return max(1, min(n, int((c < self.value - 1e-12).sum()) + 1))
        # error: tail energy after k must be ≤ E²·total
        tail = (total - torch.cumsum(s2, 0)).clamp_min(0) / total  # tail[k-1] = error² at rank k
        ok = torch.nonzero(tail <= self.value**2 + 1e-15)
        return max(1, int(ok[0]) + 1) if len(ok) else n


def rank_rule(
    *, rank: int | None = None, energy: float | None = None, sv_ratio: float | None = None,
    sv_cumulative: float | None = None, error: float | None = None, default: RankRule | None = None,
) -> RankRule | None:
    """Validate the user's choice (at most one rule) and return it, or ``default`` when none is given.

    Raises:
        OperatorParameterError: more than one rule, or a value out of range.
    """
    given = {k: v for k, v in {"rank": rank, "energy": energy, "sv_ratio": sv_ratio, "sv_cumulative": sv_cumulative,
                                   "error": error}.items() if v is not None}
    if len(given) > 1:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise OperatorParameterError(f"give one rank rule, not {flags}", parameter="rank")
    if not given:
        return default
    (kind, value), = given.items()
    checks = {
        "rank": (value >= 1 and float(value).is_integer(), "a positive integer"),
        "energy": (0 < value <= 1, "in (0, 1]"),
        "sv_ratio": (value > 1, "greater than 1"),
        "sv_cumulative": (0 < value <= 1, "in (0, 1]"),
        "error": (0 <= value < 1, "in [0, 1)"),
    }
    ok, what = checks[kind]
    if not ok:
        raise OperatorParameterError(f"--{kind.replace('_', '-')} must be {what}, got {value}", parameter=kind)
    return RankRule(kind, float(value))  # type: ignore[arg-type]
