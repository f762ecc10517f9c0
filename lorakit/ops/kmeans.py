"""Seeded, batched k-means (Lloyd with k-means++ initialisation and restarts), device-agnostic torch.

Minimises the inertia ``Σ_c Σ_{x ∈ C_c} ‖x − μ_c‖²`` over ``n`` points of dimension ``d``, for ``P`` independent
problems at once (LoRA-LEGO clusters every module of an adapter: one problem per module):

1. k-means++ (Arthur & Vassilvitskii 2007): the first centre is point ``⌊u₀·n⌋``, each next one is drawn with
   probability ∝ D(x)², the squared distance to the nearest centre chosen so far, by inverting the cumulative
   sum at ``u_t · ΣD²``. A point already chosen has D = 0 and is never chosen twice; when every remaining D is
   0 (duplicate points) the next centre is the ``⌊u_t·m⌋``-th of the ``m`` points not yet chosen, so ``k = n``
   always gives one point per cluster.
2. Lloyd: assign each point to its nearest centre (ties to the lowest index), move each centre to the mean of
   its members; an empty cluster takes the point farthest from its centre. Stops when no assignment changes,
   or after ``max_iter`` steps.
3. ``restarts`` runs, each from its own k-means++ draw; per problem the run with the lowest inertia is kept
   (the first one on ties). The restarts of all problems run as one batch.

The uniforms ``u`` are ``torch.rand((restarts, k), float64)`` from a CPU ``torch.Generator`` seeded with
``seed`` and are the same for every problem of a batch, so a problem gets the same clustering alone or batched
with others, on CPU or CUDA (up to rounding in distance ties). Arithmetic is float64.

Made for few points in a high dimension (n ≪ d: LoRA units, n = Σ ranks, d = out + in): every distance comes
from the Gram matrix ``G = X Xᵀ`` with centroids kept as mixing weights ``μ = M X``, so after the O(n²·d) Gram
each Lloyd step costs O(n²·k) per problem and restart, independent of d; memory O(P·restarts·n²).
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


@dataclass(frozen=True)
class GramKMeans:
    """Batched clustering of ``P`` problems given by their Gram matrices.

    ``labels (P, n)`` int64; ``mix (P, k, n)`` float64 with centroid ``μ_c = Σ_j mix[c, j]·x_j`` (the member
    mean); ``inertia (P,)`` float64; ``restart (P,)`` the index of the kept run; ``n_iter`` the Lloyd steps the
    slowest run took.
    """

    labels: torch.Tensor
    mix: torch.Tensor
    inertia: torch.Tensor
    restart: torch.Tensor
    n_iter: int


def draws(seed: int, restarts: int, k: int) -> torch.Tensor:
    """The uniforms of the k-means++ draws, ``(restarts, k)`` float64 on the CPU (see the module docstring)."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.rand((restarts, k), generator=gen, dtype=torch.float64)


def _plus_plus(G: torch.Tensor, x2: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """k-means++ seeding of ``Q`` problems from their Gram matrices ``(Q, n, n)``; ``u (Q, k)``.

    Returns the indices of the chosen points, ``(Q, k)`` int64.
    """
    Q, n = x2.shape
    k = u.shape[1]
    rows = torch.arange(Q, device=G.device)
    last = n - 1

    def to_point(j: torch.Tensor) -> torch.Tensor:  # ‖x_i − x_j‖² for every i, per problem
        return (x2 + x2[rows, j][:, None] - 2.0 * G[rows, :, j]).clamp_min(0.0)

    idx = torch.empty(Q, k, dtype=torch.long, device=G.device)
    idx[:, 0] = (u[:, 0] * n).long().clamp_max(last)
    chosen = torch.zeros(Q, n, dtype=torch.bool, device=G.device)
    chosen[rows, idx[:, 0]] = True
    d2 = to_point(idx[:, 0]).masked_fill(chosen, 0.0)
    for t in range(1, k):
        total = d2.sum(1)
        cdf = torch.cumsum(d2, 1)
        nxt = torch.searchsorted(cdf, (u[:, t] * total)[:, None].contiguous(), right=True)[:, 0].clamp_max(last)
        # rounding at the top of the cdf can land on a zero weight: take the last positive one instead
        positive = d2 > 0
        last_positive = last - positive.flip(1).to(torch.int8).argmax(1)
        bad = ~positive[rows, nxt]
        nxt = torch.where(bad, last_positive, nxt)
        # every remaining point duplicates a centre: the ⌊u·m⌋-th of the m points not yet chosen
        free = (~chosen).to(torch.long)
        m = free.sum(1)
        pick = (u[:, t] * m).long().clamp_max((m - 1).clamp_min(0))
        uniform = torch.searchsorted(torch.cumsum(free, 1), (pick + 1)[:, None].contiguous())[:, 0].clamp_max(last)
        nxt = torch.where(total > 0, nxt, uniform)
        idx[:, t] = nxt
        chosen[rows, nxt] = True
        d2 = torch.minimum(d2, to_point(nxt)).masked_fill(chosen, 0.0)
    return idx


def _sq_dists(G: torch.Tensor, x2: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``‖x_i − μ_c‖²`` for centroids ``μ = M @ X`` given as mixing weights ``M (Q, k, n)``, from the Gram
    matrices: ``‖x_i‖² − 2 (G Mᵀ)_ic + (M G Mᵀ)_cc``, ``(Q, n, k)``, clamped at 0 (the expansion can round below)."""
    cross = G @ M.transpose(1, 2)
    return (x2[:, :, None] - 2.0 * cross + (M * cross.transpose(1, 2)).sum(2)[:, None, :]).clamp_min_(0.0)


def _mix(labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Member-mean mixing weights ``(Q, k, n)`` and the cluster sizes ``(Q, k)`` of an assignment."""
    one_hot = torch.nn.functional.one_hot(labels, k).to(torch.float64).transpose(1, 2)
    counts = one_hot.sum(2)
    return one_hot / counts.clamp_min(1.0)[:, :, None], counts


def _lloyd(G: torch.Tensor, x2: torch.Tensor, init: torch.Tensor, max_iter: int) -> tuple[torch.Tensor, ...]:
    Q, n = x2.shape
    k = init.shape[1]
    M = torch.zeros(Q, k, n, dtype=G.dtype, device=G.device)
    M.scatter_(2, init[:, :, None], 1.0)
    labels = torch.full((Q, n), -1, dtype=torch.long, device=G.device)
    it = 0
    for it in range(1, max_iter + 1):
        D = _sq_dists(G, x2, M)
        new = D.argmin(2)
        if torch.equal(new, labels):
            break
        labels = new
        M, counts = _mix(labels, k)
        empty = counts == 0
        if bool(empty.any()):  # give each empty cluster the point that is farthest from its current centre
            far = D.gather(2, labels[:, :, None])[:, :, 0]
            for q in torch.nonzero(empty.any(1))[:, 0].tolist():
                f = far[q].clone()
                for c in torch.nonzero(empty[q])[:, 0].tolist():
                    j = int(f.argmax())
                    M[q, c] = 0.0
                    M[q, c, j] = 1.0
                    f[j] = -1.0
                labels[q] = -1  # force another assignment step
    D = _sq_dists(G, x2, M)
    labels = D.argmin(2)
    M, _ = _mix(labels, k)
    inertia = _sq_dists(G, x2, M).gather(2, labels[:, :, None])[:, :, 0].sum(1)
    return labels, M, inertia, torch.tensor(it)


def kmeans_gram(
    G: torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    restarts: int = 4,
    max_iter: int = 100,
) -> GramKMeans:
    """Cluster ``P`` problems of ``n`` points each, given by their Gram matrices ``G (P, n, n)`` (or ``(n, n)``),
    into ``k`` clusters each (algorithm: module docstring). Runs on ``G``'s device in float64.

    Cost: O(restarts·k·P·n) for the seeding, then O(restarts·P·n²·k) per Lloyd step; the batch of
    ``P·restarts`` runs iterates until its slowest run converges.

    Raises:
        OperatorParameterError: ``k`` outside ``[1, n]``, ``restarts`` or ``max_iter`` below 1.
    """
    if G.ndim == 2:
        G = G[None]
    if G.ndim != 3 or G.shape[1] != G.shape[2]:
        raise OperatorParameterError(f"k-means needs (problems, n, n) Gram matrices, got shape {tuple(G.shape)}")
    P, n = int(G.shape[0]), int(G.shape[1])
    if not 1 <= k <= n:
        raise OperatorParameterError(f"k-means: k={k} clusters is outside [1, {n}] for {n} points", parameter="k")
    if restarts < 1 or max_iter < 1:
        raise OperatorParameterError("k-means: restarts and max_iter must be at least 1", parameter="restarts")
    G = G.to(torch.float64)
    # every restart of every problem is one run of the batch: run q = problem (q // restarts), restart q % restarts
    Gq = G.repeat_interleave(restarts, 0)
    x2 = Gq.diagonal(dim1=1, dim2=2).clone()
    u = draws(seed, restarts, k).to(G.device).repeat(P, 1)
    init = _plus_plus(Gq, x2, u)
    labels, M, inertia, it = _lloyd(Gq, x2, init, max_iter)
    best = inertia.view(P, restarts).argmin(1)  # first of the lowest on ties
    pick = torch.arange(P, device=G.device) * restarts + best
    return GramKMeans(labels[pick], M[pick], inertia[pick], best, int(it))


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
    if X.ndim != 2:
        raise OperatorParameterError(f"k-means needs a 2-D (points, dim) tensor, got shape {tuple(X.shape)}")
    X = X.to(torch.float64)
    run = kmeans_gram(X @ X.T, k, seed=seed, restarts=restarts, max_iter=max_iter)
    labels, C = run.labels[0], run.mix[0] @ X
    inertia = float(((X - C[labels]) ** 2).sum())  # direct, not the expansion (exact 0 for singletons)
    return KMeansResult(C, labels, inertia, run.n_iter)


__all__ = ["GramKMeans", "KMeansResult", "draws", "kmeans", "kmeans_gram"]
