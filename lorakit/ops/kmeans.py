"""Seeded k-means (Lloyd with k-means++ initialisation and restarts), device-agnostic torch.

Minimises the inertia ``Σ_c Σ_{x ∈ C_c} ‖x − μ_c‖²`` over ``n`` points of dimension ``d``:

1. k-means++ (Arthur & Vassilvitskii 2007): the first centre uniformly, each next one with probability
   ∝ D(x)², the squared distance to the nearest centre chosen so far. A point already chosen has D = 0 and is
   never chosen twice; when every remaining D is 0 (duplicate points) the next centre is drawn uniformly from
   the points not yet chosen, so ``k = n`` always gives one point per cluster.
2. Lloyd: assign each point to its nearest centre (ties to the lowest index), move each centre to the mean of
   its members; an empty cluster takes the point farthest from its centre. Stops when the assignment does not
   change, or after ``max_iter`` steps.
3. ``restarts`` independent runs; the one with the lowest inertia is kept (the first one on ties).

Random draws come from a CPU ``torch.Generator`` seeded with ``seed`` (then moved to the device), and the
arithmetic is float64, so a seed gives the same result on every run and the same clustering on CPU and CUDA
(up to float64 rounding in distance ties).

Made for few points in a high dimension (n ≪ d: LoRA units, n = Σ ranks, d = out + in): every distance is taken
from the Gram matrix ``G = X Xᵀ`` with centroids kept as mixing weights ``μ = M X``, so the cost is O(n²·d) once,
then O(n²·k) per Lloyd step and restart, independent of d; memory O(n·d + n²).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.errors import OperatorParameterError


@dataclass(frozen=True)
class KMeansResult:
    """A clustering: ``centroids (k, d)``, ``labels (n,)`` (int64), ``inertia`` = Σ‖x − μ_label‖²."""

    centroids: torch.Tensor
    labels: torch.Tensor
    inertia: float
    n_iter: int


def _plus_plus(G: torch.Tensor, k: int, x2: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding from the Gram matrix; returns the indices of the ``k`` chosen points."""
    n = G.shape[0]
    chosen = torch.zeros(n, dtype=torch.bool)

    def to_point(j: int) -> torch.Tensor:  # ‖x_i − x_j‖² for every i
        return (x2 + x2[j] - 2.0 * G[:, j]).clamp_min(0.0).cpu()

    first = int(torch.randint(n, (1,), generator=gen))
    idx = [first]
    chosen[first] = True
    d2 = to_point(first)
    d2[chosen] = 0.0
    for _ in range(1, k):
        total = float(d2.sum())
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        if total > 0.0:
            cdf = torch.cumsum(d2, 0)
            nxt = int(torch.searchsorted(cdf, torch.tensor([u * total], dtype=cdf.dtype), right=True)[0])
            nxt = min(nxt, n - 1)
            if chosen[nxt] or d2[nxt] == 0.0:  # rounding at the top of the cdf: take the last positive weight
                nxt = int(torch.nonzero(d2 > 0)[-1])
        else:  # every remaining point duplicates a centre: draw uniformly among the unchosen
            free = torch.nonzero(~chosen)[:, 0]
            nxt = int(free[min(int(u * len(free)), len(free) - 1)])
        idx.append(nxt)
        chosen[nxt] = True
        d2 = torch.minimum(d2, to_point(nxt))
        d2[chosen] = 0.0
    return torch.tensor(idx, dtype=torch.long)


def _sq_dists(G: torch.Tensor, x2: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``‖x_i − μ_c‖²`` for centroids ``μ = M @ X`` given as mixing weights ``M (k, n)``, from the Gram matrix:
    ``‖x_i‖² − 2 (G Mᵀ)_ic + (M G Mᵀ)_cc``, ``(n, k)``, clamped at 0 (the expansion can round below it)."""
    cross = G @ M.T
    return (x2[:, None] - 2.0 * cross + (M * cross.T).sum(1)[None, :]).clamp_min_(0.0)


def _lloyd(X: torch.Tensor, G: torch.Tensor, x2: torch.Tensor, init: torch.Tensor, max_iter: int) -> KMeansResult:
    n, k = G.shape[0], init.numel()
    cols = torch.arange(n, device=G.device)
    M = torch.zeros(k, n, dtype=G.dtype, device=G.device)
    M[torch.arange(k, device=G.device), init] = 1.0
    labels = torch.full((n,), -1, dtype=torch.long, device=G.device)
    it = 0
    for it in range(1, max_iter + 1):
        D = _sq_dists(G, x2, M)
        new = D.argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
        counts = torch.bincount(labels, minlength=k)
        M = torch.zeros_like(M)
        M[labels, cols] = 1.0
        M /= counts.clamp_min(1).unsqueeze(1).to(M.dtype)
        empty = torch.nonzero(counts == 0)[:, 0].tolist()
        if empty:  # give each empty cluster the point that is farthest from its current centre
            far = D.gather(1, labels[:, None])[:, 0].clone()
            for c in empty:
                j = int(far.argmax())
                M[c] = 0.0
                M[c, j] = 1.0
                far[j] = -1.0
            labels = torch.full((n,), -1, dtype=torch.long, device=G.device)  # force another assignment step
    labels = _sq_dists(G, x2, M).argmin(1)
    C = M @ X
    inertia = float(((X - C[labels]) ** 2).sum())  # direct, not the expansion (exact 0 for singletons)
    return KMeansResult(C, labels, inertia, it)


def kmeans(
    X: torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    restarts: int = 4,
    max_iter: int = 100,
) -> KMeansResult:
    """Cluster the rows of ``X (n, d)`` into ``k`` clusters (see the module docstring for the algorithm).

    Runs on ``X``'s device, in float64. Returns the best of ``restarts`` runs; ``centroids`` are float64 on
    ``X``'s device, ``labels`` int64.

    Raises:
        OperatorParameterError: ``k`` outside ``[1, n]``, ``restarts`` or ``max_iter`` below 1.
    """
    n = int(X.shape[0])
    if X.ndim != 2:
        raise OperatorParameterError(f"k-means needs a 2-D (points, dim) tensor, got shape {tuple(X.shape)}")
    if not 1 <= k <= n:
        raise OperatorParameterError(f"k-means: k={k} clusters is outside [1, {n}] for {n} points", parameter="k")
    if restarts < 1 or max_iter < 1:
        raise OperatorParameterError("k-means: restarts and max_iter must be at least 1", parameter="restarts")
    X = X.to(torch.float64)
    G = X @ X.T
    x2 = G.diagonal().clone()
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    best: KMeansResult | None = None
    for _ in range(restarts):
        init = _plus_plus(G, k, x2, gen).to(X.device)
        run = _lloyd(X, G, x2, init, max_iter)
        if best is None or run.inertia < best.inertia:
            best = run
    assert best is not None
    return best


__all__ = ["KMeansResult", "kmeans"]
