"""A plain float64 LoRA-LEGO, written from the paper's description with loops, sharing no code with
``lorakit.ops.lego`` / ``lorakit.ops.kmeans``: the reference the operator is tested and benchmarked against.

Zhao et al., *Merging LoRAs like Playing LEGO* (ICLR 2025, arXiv 2409.16167), per module:

1. every rank j of every input LoRA i is a Minimal Semantic Unit ``u = [b_j; a_j]`` (column j of B, row j of A).
   The inputs' scale ``s_i`` (α/r) and merge weight ``w_i`` are folded in as ``√|w_i·s_i|`` on each side (the
   sign into b): with equal scales and weights this multiplies every unit by the same number, so the clustering
   is the paper's clustering of the stored factors and ``Σ b aᵀ`` is ``Σ w_i s_i B_i A_i``;
2. the units of all inputs are pooled and clustered by k-means into κ clusters: k-means++ seeding with the
   uniforms ``torch.rand((restarts, κ), float64)`` of a CPU generator seeded with ``seed`` (first centre
   ``⌊u₀·n⌋``, then inverse-CDF on D²), Lloyd steps until no assignment changes (an empty cluster takes the
   point farthest from its centre), the restart of lowest inertia kept. The pool is taken in descending norm;
3. each centroid (member mean) becomes one rank of the merged LoRA;
4. parameter reweighting rescales each centroid to the mean norm of its members; output reweighting scales the
   merged update by ``γ = √(r̄/κ)``, r̄ the mean input rank.

Loops over points, clusters and restarts; distances from the vectors themselves. Slow by design: for tests and
the small merge-quality models only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

F64 = torch.float64


@dataclass
class ReferenceLego:
    """``delta`` the merged ``γ·B@A`` (out, in); ``B (out, κ)``, ``A (κ, in)``, ``gamma``; ``labels`` the
    cluster of every unit in pool order (input order, then rank order); ``inertia`` of the kept run."""

    delta: torch.Tensor
    B: torch.Tensor
    A: torch.Tensor
    gamma: float
    labels: list[int]
    inertia: float


def units_of(inputs: Sequence[tuple[torch.Tensor, torch.Tensor, float]], weights: Sequence[float]) -> list[torch.Tensor]:
    """The pooled MSUs ``[b; a]`` of ``(B, A, scale)`` inputs at ``weights`` (input order, then rank order)."""
    pool = []
    for (B, A, s), w in zip(inputs, weights):
        root = math.sqrt(abs(w * s))
        sign = -1.0 if w * s < 0 else 1.0
        for j in range(A.shape[0]):
            pool.append(torch.cat([B[:, j].to(F64) * root * sign, A[j].to(F64) * root]))
    return pool


def _sq(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(((x - y) ** 2).sum())


def _seed(X: list[torch.Tensor], k: int, u: list[float]) -> list[int]:
    n = len(X)
    chosen = [min(int(u[0] * n), n - 1)]
    d2 = [_sq(x, X[chosen[0]]) for x in X]
    for i in chosen:
        d2[i] = 0.0
    for t in range(1, k):
        total = sum(d2)
        if total > 0:
            target, acc, nxt = u[t] * total, 0.0, n - 1
            for i in range(n):
                acc += d2[i]
                if acc > target:
                    nxt = i
                    break
            if d2[nxt] == 0.0:  # rounding at the top: the last point with a positive weight
                nxt = max(i for i in range(n) if d2[i] > 0)
        else:
            free = [i for i in range(n) if i not in chosen]
            nxt = free[min(int(u[t] * len(free)), len(free) - 1)]
        chosen.append(nxt)
        for i in range(n):
            d2[i] = 0.0 if i in chosen else min(d2[i], _sq(X[i], X[nxt]))
    return chosen


def _lloyd(X: list[torch.Tensor], init: list[int], max_iter: int) -> tuple[list[int], list[torch.Tensor], float]:
    n, k = len(X), len(init)
    C = [X[i].clone() for i in init]
    labels: list[int] = [-1] * n
    for _ in range(max_iter):
        dist = [[_sq(x, c) for c in C] for x in X]
        new = [min(range(k), key=lambda c, d=d: (d[c], c)) for d in dist]
        if new == labels:
            break
        labels = new
        members = [[i for i in range(n) if labels[i] == c] for c in range(k)]
        far = [dist[i][labels[i]] for i in range(n)]
        for c in range(k):
            if members[c]:
                C[c] = sum(X[i] for i in members[c]) / len(members[c])
        empties = [c for c in range(k) if not members[c]]
        for c in empties:
            j = max(range(n), key=lambda i: (far[i], -i))
            C[c] = X[j].clone()
            far[j] = -1.0
        if empties:
            labels = [-1] * n
    dist = [[_sq(x, c) for c in C] for x in X]
    labels = [min(range(k), key=lambda c, d=d: (d[c], c)) for d in dist]
    C = [sum(X[i] for i in range(n) if labels[i] == c) / max(1, labels.count(c)) if labels.count(c) else C[c]
         for c in range(k)]
    inertia = sum(_sq(X[i], C[labels[i]]) for i in range(n))
    return labels, C, inertia


def reference_lego(
    inputs: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
    weights: Sequence[float],
    k: int,
    *,
    seed: int = 0,
    restarts: int = 8,
    max_iter: int = 100,
    param_reweight: bool = True,
    output_reweight: bool = True,
) -> ReferenceLego:
    """LoRA-LEGO of one module from ``(B (out, r_i), A (r_i, in), scale)`` inputs (see the module docstring)."""
    out = inputs[0][0].shape[0]
    pool = units_of(inputs, weights)
    n = len(pool)
    order = sorted(range(n), key=lambda i: -float(pool[i].norm()))  # descending norm, stable
    X = [pool[i] for i in order]
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    u = torch.rand((restarts, k), generator=gen, dtype=F64).tolist()
    best: tuple[list[int], list[torch.Tensor], float] | None = None
    for r in range(restarts):
        run = _lloyd(X, _seed(X, k, u[r]), max_iter)
        if best is None or run[2] < best[2]:
            best = run
    assert best is not None
    labels_sorted, C, inertia = best
    if param_reweight:
        for c in range(k):
            members = [X[i] for i in range(n) if labels_sorted[i] == c]
            norm = float(C[c].norm())
            if members and norm > 0:
                C[c] = C[c] * (sum(float(m.norm()) for m in members) / len(members) / norm)
    gamma = math.sqrt((n / len(inputs)) / k) if output_reweight else 1.0
    B = torch.stack([c[:out] for c in C], 1)
    A = torch.stack([c[out:] for c in C], 0)
    labels = [0] * n
    for pos, i in enumerate(order):
        labels[i] = labels_sorted[pos]
    return ReferenceLego(gamma * B @ A, B, A, gamma, labels, inertia)


__all__ = ["ReferenceLego", "reference_lego", "units_of"]
