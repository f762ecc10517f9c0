"""Element-wise merge kernels, written once: trim, elect sign, disjoint merge, DARE and DELLA masks, and exact
magnitude thresholds over a matrix that is only ever seen tile by tile.

Every kernel works on a stack ``x (n, rows, cols)`` of task tiles (already multiplied by their weights); the
whole-module statistics they need (magnitude thresholds, the majority sign) are computed beforehand by a pass
over the tiles, so the dense ΔW of a module never exists n times. The small-space merges (KnOTS, Core Space)
call the same kernels with the whole matrix as one tile.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator

import torch

TILE_ELEMENTS = 1 << 21  # per task: 2M floats (8 MB fp32) per tile
HIST_BINS = 1 << 16

Tiles = Callable[[], Iterator[tuple[int, torch.Tensor]]]  # yields (row0, stack (n, rows, cols)) in row order


def tile_rows(out: int, inn: int) -> int:
    """Rows per tile for an ``out × in`` matrix; a function of the shape only, so random masks are reproducible."""
    return max(1, min(out, TILE_ELEMENTS // max(inn, 1)))


def tile_generator(seed: int, task: int, module: str, row0: int) -> torch.Generator:
    """The RNG of one (task, module, tile): independent of the order tiles are visited in."""
    key = zlib.crc32(f"{seed}:{task}:{module}:{row0}".encode())
    return torch.Generator().manual_seed(key)


def kth_largest_abs(tiles: Tiles, ks: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Exact k-th largest ``|x|`` per task over a matrix seen only as tiles, in two passes and O(tile) memory.

    Pass 1 counts magnitudes in ``HIST_BINS`` linear bins on ``[0, bound_i]``; pass 2 keeps only the entries in
    the bin that holds the k-th largest and selects it exactly.

    Args:
        tiles: the tile stream of ``n`` tasks.
        ks: ``(n, m)`` integer ranks (1 = largest); ``k ≤ 0`` gives ``+inf``, ``k ≥ numel`` gives ``0``.
        bounds: ``(n,)`` upper bounds on ``|x|`` per task (any bound ≥ the max; tighter is faster).

    Returns:
        ``(n, m)`` float64 thresholds ``t`` with exactly ``k`` entries ``≥ t`` when magnitudes are distinct.
    """
    n, m = ks.shape
    scale = HIST_BINS / bounds.double().clamp_min(1e-300)
    counts = torch.zeros(n, HIST_BINS, dtype=torch.int64)
    numel = 0
    for _, x in tiles():
        numel = numel + x[0].numel()
        idx = _bin_index(x, scale)
        for i in range(n):
            counts[i] += torch.bincount(idx[i].reshape(-1), minlength=HIST_BINS).cpu()
    above = counts.flip(1).cumsum(1).flip(1)  # above[i, b] = entries in bins ≥ b
    out = torch.zeros(n, m, dtype=torch.float64)
    want: dict[tuple[int, int], tuple[int, int]] = {}  # (task, j) → (bin, rank inside the bin)
    for i in range(n):
        for j in range(m):
            k = int(ks[i, j])
            if k <= 0:
                out[i, j] = float("inf")
            elif k >= numel:
                out[i, j] = 0.0
            else:
                b = int((above[i] >= k).nonzero().max())  # highest bin with ≥ k entries at or above it
                higher = int(above[i, b + 1]) if b + 1 < HIST_BINS else 0
                want[(i, j)] = (b, k - higher)
    if want:
        bins_needed = {(i, b) for (i, _), (b, _) in want.items()}
        found: dict[tuple[int, int], list[torch.Tensor]] = {key: [] for key in bins_needed}
        for _, x in tiles():
            idx = _bin_index(x, scale)
            for i, b in bins_needed:
                found[(i, b)].append(x[i].abs()[idx[i] == b].double().cpu())
        for (i, j), (b, r) in want.items():
            vals = torch.cat(found[(i, b)])
            out[i, j] = float(torch.topk(vals, r).values[-1])
    return out


def _bin_index(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    s = scale.to(device=x.device, dtype=torch.float64).view(-1, *([1] * (x.ndim - 1)))
    return (x.abs().double() * s).floor().clamp_(0, HIST_BINS - 1).long()


def trim(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """TIES trim / magnitude prune: keep entries with ``|x| ≥ threshold`` (per task), zero the rest."""
    t = threshold.to(device=x.device, dtype=torch.float64).view(-1, *([1] * (x.ndim - 1)))
    return torch.where(x.abs().double() >= t, x, torch.zeros((), dtype=x.dtype))


def band(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Breadcrumbs: keep entries with ``low ≤ |x| < high`` (per task), zero both tails."""
    a = x.abs().double()
    lo = low.to(device=x.device, dtype=torch.float64).view(-1, *([1] * (x.ndim - 1)))
    hi = high.to(device=x.device, dtype=torch.float64).view(-1, *([1] * (x.ndim - 1)))
    return torch.where((a >= lo) & (a < hi), x, torch.zeros((), dtype=x.dtype))


def dare(x: torch.Tensor, density: float, generators: list[torch.Generator]) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` (Bernoulli), divide the kept ones by ``density``."""
    if density >= 1.0:
        return x
    keep = torch.stack([torch.rand(x.shape[1:], generator=g) < density for g in generators]).to(x.device)
    return torch.where(keep, x / density, torch.zeros((), dtype=x.dtype))


def della(x: torch.Tensor, density: float, epsilon: float, generators: list[torch.Generator]) -> torch.Tensor:
    """DELLA MAGPRUNE: per row, keep probability ``p = density − ε + 2ε·rank/(cols−1)`` (rank of ``|x|`` in the
    row, 0 = smallest), Bernoulli keep, kept entries divided by their ``p`` (the paper's rescale)."""
    cols = x.shape[-1]
    rank = x.abs().argsort(dim=-1).argsort(dim=-1).to(torch.float64)
    p = density - epsilon + 2 * epsilon * (rank / max(cols - 1, 1))
    if cols == 1:
        p = torch.full_like(p, density)
    u = torch.stack([torch.rand(x.shape[1:], generator=g, dtype=torch.float64) for g in generators]).to(x.device)
    return torch.where(u < p, (x.double() / p).to(x.dtype), torch.zeros((), dtype=x.dtype))


def elect_sign(x: torch.Tensor) -> torch.Tensor:
    """TIES sign election by mass: ``γ = sign(Σ_i x_i)`` element-wise (0 where the sum is 0)."""
    return torch.sign(x.sum(0))


def disjoint_mean(x: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """TIES disjoint merge: mean over tasks of the nonzero entries whose sign equals ``sign`` (count ≥ 1)."""
    agree = (torch.sign(x) == sign.unsqueeze(0)) & (x != 0)
    total = torch.where(agree, x, torch.zeros((), dtype=x.dtype)).sum(0)
    return total / agree.sum(0).clamp_min(1).to(x.dtype)


class SignedMerge:
    """Elect + disjoint merge over a stream of tiles, with the paper's tie rule: where ``Σ_i x_i = 0`` but some
    entry is nonzero, the elected sign is the module's majority sign ``sign(Σ γ)``, known only after the last
    tile. Ties are rare (measure zero for real data), so both candidates are kept for those entries only and
    the right one is chosen in :meth:`finish`.
    """

    def __init__(self) -> None:
        self.sign_sum = 0.0
        self.ties: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def tile(self, row0: int, x: torch.Tensor) -> torch.Tensor:
        sign = elect_sign(x)
        self.sign_sum += float(sign.sum())
        merged = disjoint_mean(x, torch.where(sign == 0, torch.ones_like(sign), sign))
        tie = (sign == 0) & (x != 0).any(0)
        if bool(tie.any()):
            pos = tie.nonzero()
            neg = disjoint_mean(x, -torch.ones_like(sign))[tie]
            self.ties.append((row0, pos[:, 0], pos[:, 1], neg))
        return merged

    def finish(self, out: torch.Tensor) -> None:
        """Apply the majority rule to the tie entries of the assembled result ``out`` (in place)."""
        if self.sign_sum < 0:
            for row0, r, c, neg in self.ties:
                out[row0 + r, c] = neg.to(out.dtype)
