"""Extract a LoRA from two checkpoints: ``ΔW = W_finetuned − W_base`` per weight, then a low-rank fit.

Streamed tensor by tensor (peak memory: the two weights, their difference and the residual, plus the
randomized SVD's ``(out + in)·ℓ`` work), so a checkpoint of any size extracts on a small machine.

Per weight ``D (out, in)`` (conv flattened to ``(out, in·kh·kw)``):

- ``--rank K``: randomized SVD (Halko–Martinsson–Tropp; ``K + oversample`` probes, ``n_iter`` power iterations);
- ``--energy E`` / ``--error E``: ``‖D‖_F²`` is known exactly from D, so the kept rank is chosen against the
  true total (not the truncated spectrum, kohya's pitfall); the probe count doubles until the target is met.

The reported error ``‖D − D_k‖_F / ‖D‖_F`` is measured on the residual itself. The result is scale-1 canonical
factors ``B = U√Σ``, ``A = √Σ Vᵀ``. Embeddings are left out by default (their LoRA is transposed and they are
rarely worth it); 1-D tensors (norms, biases) cannot be low-rank and are listed when they changed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from lorakit.errors import KeyMappingError, ShapeMismatchError
from lorakit.io.checkpoint import Checkpoint
from lorakit.linalg import SVD, randomized_svd
from lorakit.ops.rank_rules import RankRule

DEFAULT_EXCLUDE = r"(embed|wte|wpe|lm_head)"


@dataclass(frozen=True)
class ExtractedModule:
    name: str
    shape: tuple[int, int]
    rank: int
    rel_error: float


def select_weights(base: Checkpoint, tuned: Checkpoint, include: str | None, exclude: str | None) -> list[str]:
    """Header-only plan: the 2-D/4-D float ``*.weight`` tensors to extract, checked present and same-shaped in both.

    Raises:
        KeyMappingError: a selected tensor is missing from one checkpoint.
        ShapeMismatchError: a selected tensor has different shapes in the two checkpoints.
    """
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    names = list(dict.fromkeys([*tuned.keys(), *base.keys()]))
    chosen: list[str] = []
    for k in names:
        if not k.endswith(".weight") or (inc and not inc.search(k)) or (exc and exc.search(k)):
            continue
        ck = tuned if k in tuned else base
        dt = ck.dtype(k)
        if len(ck.shape(k)) not in (2, 4) or dt is None or not dt.is_floating_point:
            continue
        for ckpt, other in ((base, "base"), (tuned, "fine-tuned")):
            if k not in ckpt:
                raise KeyMappingError(f"tensor {k!r} is missing from the {other} checkpoint", file=ckpt.path, key=k,
                                      hint="the checkpoints differ in architecture; select tensors with --include/--exclude")
        if base.shape(k) != tuned.shape(k):
            raise ShapeMismatchError(f"tensor {k!r} is {list(base.shape(k))} in the base but {list(tuned.shape(k))} "
                                     f"in the fine-tune", file=tuned.path, module=k)
        chosen.append(k)
    return chosen


def squared_norm(D: torch.Tensor, rows: int = 256) -> float:
    """‖D‖_F² accumulated in float64 over blocks of rows (a float64 copy of all of D would double the memory)."""
    return sum(float(blk.double().square().sum()) for blk in D.split(rows))


def low_rank_fit(D: torch.Tensor, rule: RankRule, *, oversample: int = 10, n_iter: int = 4, seed: int = 0,
                 max_rank: int | None = None) -> tuple[SVD, float]:
    """Rank-k factors of dense ``D`` under ``rule`` and the relative error of the fit (measured on the residual).

    ``D`` is overwritten by the residual (to keep memory at one dense copy).
    """
    total = squared_norm(D)
    cap = min(D.shape) if max_rank is None else min(max_rank, *D.shape)
    if rule.kind == "rank":
        k_probe = min(int(rule.value), cap)
    else:
        k_probe = min(64, cap)
    while True:
        svd = randomized_svd(D, k_probe, oversample=oversample, n_iter=n_iter, seed=seed, dtype=D.dtype)
        if rule.kind == "rank":
            k = min(int(rule.value), svd.rank)
            break
        s2 = svd.S.double() ** 2
        need = rule.value * total if rule.kind == "energy" else (1 - rule.value**2) * total
        reached = torch.nonzero(torch.cumsum(s2, 0) >= need * (1 - 1e-12))
        if len(reached) or k_probe >= cap:
            k = int(reached[0]) + 1 if len(reached) else svd.rank
            break
        k_probe = min(2 * k_probe, cap)
    svd = svd.truncate(max(k, 1))
    D.addmm_(svd.U * svd.S, svd.Vh, alpha=-1.0)
    err = math.sqrt(squared_norm(D) / total) if total > 0 else 0.0
    return svd, err


