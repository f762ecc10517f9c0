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
SAMPLE = 1 << 16  # sampled magnitudes per task that bracket a top-k threshold
BRACKET_SIGMAS = 6.0

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


def sample_abs(Bs: list[torch.Tensor], As: list[torch.Tensor], count: int, seed: int = 0) -> torch.Tensor:
    """``(n, count)`` magnitudes ``|τ_i[j, k]| = |B_i[j]·A_i[:, k]|`` at uniform random entries, from the factors.

    O(count·r) per task, no dense tile. The same positions serve every task (they are an unbiased sample of
    each); values may differ from a tile's GEMM in the last bit, which is harmless because they only bracket a
    threshold that :func:`kth_largest_abs_bracketed` then selects exactly from the tiles.
    """
    out, inn = Bs[0].shape[0], As[0].shape[1]
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(out, (count,), generator=g).to(Bs[0].device)
    cols = torch.randint(inn, (count,), generator=g).to(Bs[0].device)
    # gathers of whole rows of B and of Aᵀ are contiguous (a column gather of A is 2× slower)
    # index_select, not B[rows]: the same rows, 10× faster (advanced indexing takes a generic path)
    return torch.stack([(B.index_select(0, rows) * A.T.contiguous().index_select(0, cols)).sum(1).abs()
                        for B, A in zip(Bs, As)])


def kth_largest_abs_bracketed(tiles: Tiles, ks: torch.Tensor, sample: torch.Tensor, numel: int,
                              *, sigmas: float = BRACKET_SIGMAS) -> torch.Tensor:
    """The exact k-th largest ``|x|`` per task, from a sample that brackets it and one counting pass.

    In a uniform sample of ``s`` magnitudes, the number above the k-th largest of ``N`` is Binomial(s, k/N);
    the sample order statistics ``sigmas`` standard deviations (plus two) either side of ``s·k/N`` bracket the
    threshold ``[lo, hi)`` with overwhelming probability. One pass over the tiles counts the entries ``≥ hi``
    and collects those in ``[lo, hi)`` (a few percent of the entries); when ``count(≥ hi) < k ≤ count(≥ lo)`` the
    threshold is the ``(k − count(≥ hi))``-th largest collected value, exactly, ties included (equal magnitudes
    fall on the same side of both bounds). A bracket the sample got wrong falls back to the exact two-pass
    histogram (:func:`kth_largest_abs`) for that task, so the result never depends on the sample.

    Args:
        tiles: the tile stream of ``n`` tasks; ``ks``: ``(n, m)`` ranks (1 = largest); ``sample``: ``(n, s)``
            magnitudes (:func:`sample_abs`); ``numel``: entries per task.

    Returns:
        ``(n, m)`` thresholds in the tiles' dtype: ``k ≤ 0`` gives ``+inf``, ``k ≥ numel`` gives ``0``.

    Cost: one tile pass with two comparisons per entry and bracket; memory O(tile + bracket).
    """
    lo, hi, out, todo = brackets(ks, sample, numel, sigmas)
    if not todo:
        return out
    above = {key: 0 for key in todo}
    found: dict[tuple[int, int], list[torch.Tensor]] = {key: [] for key in todo}
    dtype = None
    ws = getattr(tiles, "workspace", None)
    for _, x in tiles():
        dtype = x.dtype
        ws = Workspace.for_tile(x, ws)
        a, ge_hi, inside = ws.stack(x.shape[1])
        torch.abs(x, out=a)
        for i, j in todo:
            h, low = float(hi[i, j]), float(lo[i, j])
            # count(≥ hi) = count(≥ lo) − count([lo, hi)); the gather is on flat views (a 2-D boolean index
            # goes through a much slower path)
            n_lo = int(torch.count_nonzero(torch.ge(a[i], low, out=inside[i])))
            if h != float("inf"):
                inside[i].logical_and_(torch.lt(a[i], h, out=ge_hi[i]))
            vals = a[i].reshape(-1)[inside[i].reshape(-1)]
            above[(i, j)] += n_lo - vals.numel()
            found[(i, j)].append(vals)
    missed = []
    for key in todo:
        vals = torch.cat(found.pop(key))
        r = ks[key].item() - above[key]
        if 0 < r <= vals.numel():
            out[key] = float(kth_largest(vals, int(r)))
        else:
            missed.append(key)
    if missed:  # the sample misled the bracket (astronomically rare): the exact histogram for those tasks
        bounds = sample.new_empty(0)
        for _, x in tiles():
            a = x.abs().flatten(1).amax(1).double()
            bounds = a if bounds.numel() == 0 else torch.maximum(bounds, a)
        exact = kth_largest_abs(tiles, ks, bounds.cpu() * (1 + 1e-6) + 1e-30)
        for key in missed:
            out[key] = exact[key]
    return out.to(dtype or torch.float64)


def kth_largest(vals: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest of a 1-D tensor (``1 ≤ k ≤ len``), by selection: ``kthvalue`` is O(len) where a
    ``topk`` of a large ``k`` sorts (3-5× slower on a bracket of 10⁶ values)."""
    return torch.kthvalue(vals, vals.numel() - k + 1).values


def brackets(ks: torch.Tensor, sample: torch.Tensor, numel: int, sigmas: float = BRACKET_SIGMAS
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """The sample's bracket ``[lo, hi)`` of each k-th largest ``|x|`` (see :func:`kth_largest_abs_bracketed`).

    Returns float64 ``(n, m)`` ``lo``, ``hi``, the thresholds known without a pass (``+inf`` for ``k ≤ 0``, 0 for
    ``k ≥ numel``, 0 elsewhere) and the ``(task, j)`` keys that need one."""
    n, m = ks.shape
    s = sample.shape[1]
    sample = sample.double().cpu()
    lo = torch.zeros(n, m, dtype=torch.float64)
    hi = torch.full((n, m), float("inf"), dtype=torch.float64)
    out = torch.zeros(n, m, dtype=torch.float64)
    todo: list[tuple[int, int]] = []
    for i in range(n):
        for j in range(m):
            k = int(ks[i, j])
            if k <= 0:
                out[i, j] = float("inf")
                continue
            if k >= numel:
                continue  # 0: every entry is kept
            p = k / numel
            centre, spread = s * p, sigmas * (s * p * (1 - p)) ** 0.5 + 2
            i_hi, i_lo = int(centre - spread), int(centre + spread) + 1
            if i_hi >= 0:  # the (i_hi + 1)-th largest sample value
                hi[i, j] = torch.kthvalue(sample[i], s - i_hi).values
            if i_lo < s:
                lo[i, j] = torch.kthvalue(sample[i], s - i_lo).values
            todo.append((i, j))
    return lo, hi, out, todo


# A fold that would record more than this many entries of a module (max of a fraction and a floor, so small
# modules, whose brackets are relatively wide, never give up) takes the two-pass path instead.
FOLD_MAX_FRACTION = 0.25
FOLD_MIN_LIMIT = 1 << 16


class FoldedThresholds:
    """Exact top-k magnitude thresholds found *during* the merge pass, instead of in a counting pass before it.

    Each threshold ``t_ij`` (the ``k_ij``-th largest ``|x_i|``) lies in its sample bracket ``[lo, hi)``
    (:func:`brackets`). A threshold whose kept side is ``|x| ≥ t`` (``keep_above[j]``) is applied provisionally
    at ``hi``, one whose kept side is ``|x| < t`` at ``lo``: an entry outside every bracket is then pruned
    exactly as it will be by the exact threshold. The positions where any task is inside a bracket (a few
    percent) are recorded with every task's values there, and ``count(|x_i| ≥ hi)`` is counted; after the pass
    :meth:`thresholds` selects each ``t_ij`` exactly from the recorded values (ties included, as in
    :func:`kth_largest_abs_bracketed`), and the caller re-merges the recorded positions. ``None`` from
    :meth:`thresholds` (or :attr:`overflow`) means the sample misled a bracket: the caller must take the exact
    two-pass route, so the result never depends on the sample.

    Cost per task entry: about five float passes over the tile stack (``|x|``, two comparisons and a count per
    bracket, one subtraction) plus one plane sum and ``nonzero`` per tile, against a separate counting pass's
    tile formation, comparisons and boolean gathers. Memory: the recorded positions (int32 within a tile) and
    ``n`` values each, bounded by :data:`FOLD_MAX_FRACTION` of the module.
    """

    def __init__(self, ks: torch.Tensor, sample: torch.Tensor, numel: int, keep_above: tuple[bool, ...],
                 dtype: torch.dtype, device: torch.device | str, *, sigmas: float = BRACKET_SIGMAS) -> None:
        self.ks = ks
        lo, hi, self.known, self.todo = brackets(ks, sample, numel, sigmas)
        for i in range(ks.shape[0]):  # thresholds known up front: an empty bracket at the value itself
            for j in range(ks.shape[1]):
                if (i, j) not in self.todo:
                    lo[i, j] = hi[i, j] = self.known[i, j]
        self.dtype = dtype
        lo, hi = lo.to(dtype), hi.to(dtype)
        # The bracket is closed at the sample's upper bound too, [lo, hi] = [lo, hi⁺) with hi⁺ the next float:
        # a threshold equal to hi (ties at a sampled value) then needs no fallback. A bracket at 0 (the task is
        # mostly zero here) is made empty instead of recording every zero: pruning a zero at any threshold leaves
        # its bits as they are, and the threshold is then 0 exactly when count(|x| > 0) < k.
        self.zero = [(i, j) for i, j in self.todo if float(hi[i, j]) == 0.0]
        for i, j in self.todo:
            hi[i, j] = torch.nextafter(hi[i, j], hi.new_tensor(float("inf")))
            if (i, j) in self.zero:
                lo[i, j] = hi[i, j]
        self.lo, self.hi = lo.to(device), hi.to(device)
        self.keep_above = keep_above
        # the provisional thresholds the pass prunes at, in the (n, m) layout of the exact ones
        self.provisional = torch.stack([self.hi[:, j] if up else self.lo[:, j] for j, up in enumerate(keep_above)], 1)
        self.above = torch.zeros(ks.shape, dtype=torch.float64)  # count(|x| ≥ hi⁺) = count(|x| > hi)
        self.records: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (row0, flat index in the tile, (n, len))
        self.recorded, self.limit = 0, max(int(FOLD_MAX_FRACTION * numel), FOLD_MIN_LIMIT)
        self.overflow = False

    def prune_(self, row0: int, x: torch.Tensor, ws: Workspace) -> torch.Tensor:
        """Prune the tile stack ``x`` in place at the provisional thresholds and record its bracket entries."""
        ws = Workspace.for_tile(x, ws)
        rows = x.shape[1]
        a, _, _ = ws.stack(rows)
        ins, h = ws.extra(0, rows), ws.extra(1, rows)
        torch.abs(x, out=a)
        m = len(self.keep_above)
        for j in range(m):  # ins = Σ_j [lo_j ≤ |x| < hi_j] as 0/1 floats; counts of |x| ≥ hi_j
            torch.ge(a, _per_task(self.lo[:, j], a), out=ins if j == 0 else h)
            if j:
                ins.add_(h)
            torch.ge(a, _per_task(self.hi[:, j], a), out=h)
            # exact: a tile's 0/1 count is an integer below 2^24
            self.above[:, j] += h.sum((1, 2)).double().cpu()
            ins.sub_(h)
        if not self.overflow:
            # the number of tasks inside a bracket, per entry (0/1 floats, so any order of adds is exact; two
            # plane adds cost 2/3 of a sum over the task axis)
            plane = ws.plane(0, rows)
            if x.shape[0] == 1:
                plane.copy_(ins[0])
            else:
                torch.add(ins[0], ins[1], out=plane)
                for i in range(2, x.shape[0]):
                    plane.add_(ins[i])
            idx = plane.reshape(-1).nonzero().squeeze(1)
            self.recorded += idx.numel()
            if self.recorded > self.limit:
                self.overflow = True
                self.records.clear()
            elif idx.numel():
                self.records.append((row0, idx.to(torch.int32), x.reshape(x.shape[0], -1).index_select(1, idx)))
        for j, up in enumerate(self.keep_above):  # 0/1 float masks (see trim_); h still holds |x| ≥ hi_{m-1}
            if j == m - 1 and up:
                x.mul_(h)
            elif up:
                x.mul_(torch.ge(a, _per_task(self.hi[:, j], a), out=ins))
            else:
                x.mul_(torch.lt(a, _per_task(self.lo[:, j], a), out=ins))
        return x

    def thresholds(self) -> torch.Tensor | None:
        """The exact ``(n, m)`` thresholds in the tiles' dtype, or ``None`` where the sample misled a bracket."""
        if self.overflow:
            return None
        out = self.known.to(self.dtype)
        for i, j in self.todo:
            if (i, j) in self.zero:
                if int(self.ks[i, j]) <= int(self.above[i, j]):
                    return None
                out[i, j] = 0.0
                continue
            vals = torch.cat([v[i] for _, _, v in self.records]) if self.records else self.lo.new_empty(0)
            a = vals.abs()
            inside = a[(a >= self.lo[i, j]) & (a < self.hi[i, j])]
            r = int(self.ks[i, j]) - int(self.above[i, j])
            if not 0 < r <= inside.numel():
                return None
            out[i, j] = kth_largest(inside, r).cpu()
        return out


class Workspace:
    """Scratch buffers reused across the tiles of a module: a float and two bool ``(n, rows, cols)`` stacks and a
    few ``(rows, cols)`` planes. Fresh multi-MB temporaries are mmap'd and page-faulted on every tile (they cost
    3-4× the arithmetic on this CPU), so the hot kernels write into these with ``out=``."""

    def __init__(self, n: int, rows: int, cols: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.f = torch.empty(n, rows, cols, dtype=dtype, device=device)
        self.b = torch.empty(n, rows, cols, dtype=torch.bool, device=device)
        self.b2 = torch.empty(n, rows, cols, dtype=torch.bool, device=device)
        self.planes = [torch.empty(rows, cols, dtype=dtype, device=device) for _ in range(5)]
        self._extra: list[torch.Tensor] = []

    @staticmethod
    def for_tile(x: torch.Tensor, ws: Workspace | None) -> Workspace:
        if ws is None or ws.f.shape[0] != x.shape[0] or ws.f.shape[1] < x.shape[1] or ws.f.shape[2] != x.shape[2] \
                or ws.f.dtype != x.dtype:
            return Workspace(x.shape[0], x.shape[1], x.shape[2], x.dtype, x.device)
        return ws

    def extra(self, i: int, rows: int) -> torch.Tensor:
        """The ``i``-th extra float ``(n, rows, cols)`` stack, allocated on first use (breadcrumbs' band and the
        folded thresholds need them)."""
        while len(self._extra) <= i:
            self._extra.append(torch.empty_like(self.f))
        return self._extra[i][:, :rows]

    def stack(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.f[:, :rows], self.b[:, :rows], self.b2[:, :rows]

    def plane(self, i: int, rows: int) -> torch.Tensor:
        return self.planes[i][:rows]


def trim(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """TIES trim / magnitude prune: keep entries with ``|x| ≥ threshold`` (per task), zero the rest."""
    return trim_(x.clone(), threshold)


def trim_(x: torch.Tensor, threshold: torch.Tensor, ws: Workspace | None = None) -> torch.Tensor:
    """:func:`trim` in place. The comparison runs in ``x``'s dtype: a threshold is one of the entries'
    magnitudes, so it is exact in that dtype and no float64 copy of the tile is needed."""
    f, _, _ = Workspace.for_tile(x, ws).stack(x.shape[1])
    torch.abs(x, out=f)
    # the mask as 0/1 floats in place of |x|: multiplying by a bool tensor is 20-40× slower (a casting path)
    return x.mul_(torch.ge(f, _per_task(threshold, x), out=f))


def _per_task(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))


def band(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, ws: Workspace | None = None) -> torch.Tensor:
    """Breadcrumbs: keep entries with ``low ≤ |x| < high`` (per task), zero both tails (in place)."""
    ws = Workspace.for_tile(x, ws)
    f, _, _ = ws.stack(x.shape[1])
    torch.abs(x, out=f)
    x.mul_(torch.lt(f, _per_task(high, x), out=ws.extra(0, x.shape[1])))  # 0/1 floats (see trim_)
    return x.mul_(torch.ge(f, _per_task(low, x), out=f))


def dare(x: torch.Tensor, density: float, generators: list[torch.Generator]) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` (Bernoulli), divide the kept ones by ``density``."""
    return x if density >= 1.0 else dare_(x.clone(), density, generators)


def dare_(x: torch.Tensor, density: float, generators: list[torch.Generator], *,
          rescale: bool = True, ws: Workspace | None = None) -> torch.Tensor:
    """:func:`dare` in place. The mask of task ``i`` is ``torch.rand(rows, cols, generator=generators[i]) <
    density`` (the documented stream). ``rescale=False`` leaves the ``1/density`` to the caller: the delta merges
    fold it into the module's final scale, one multiplication per module instead of one per entry."""
    if density >= 1.0:
        return x
    f, _, _ = Workspace.for_tile(x, ws).stack(x.shape[1])
    u = f if x.dtype == torch.float32 and x.device.type == "cpu" else torch.empty(x.shape, dtype=torch.float32)
    for i, g in enumerate(generators):
        torch.rand(x.shape[1:], generator=g, out=u[i])
    # the mask as 0/1 floats: multiplying by a bool tensor is 20-40× slower (a casting path)
    same = u.dtype == x.dtype and u.device == x.device
    x.mul_(torch.lt(u, density, out=u) if same else torch.lt(u.to(x.device), density).to(x.dtype))
    return x.div_(density) if rescale else x


def della(x: torch.Tensor, density: float, epsilon: float, generators: list[torch.Generator]) -> torch.Tensor:
    """DELLA MAGPRUNE: per row, keep probability ``p = density − ε + 2ε·rank/(cols−1)`` (rank of ``|x|`` in the
    row, 0 = smallest), Bernoulli keep, kept entries divided by their ``p`` (the paper's rescale).

    Runs in ``x``'s dtype (float32 for 16-bit adapters: the ranks and probabilities are exact there up to
    2^24 columns); the uniforms are drawn in that dtype from each task's tile generator.
    """
    cols = x.shape[-1]
    # Magnitudes are non-negative, so their bit patterns as integers sort in the same order; an integer sort
    # is 25% faster than a float one on CPU, and the sort is most of DELLA's cost (~45 ns an entry).
    a = x.abs()
    keys = {torch.float32: torch.int32, torch.float64: torch.int64}.get(a.dtype)
    order = (a.view(keys) if keys is not None else a).argsort(dim=-1)
    rank = torch.empty_like(x)
    rank.scatter_(-1, order, torch.arange(cols, dtype=x.dtype, device=x.device).expand_as(x))
    if cols == 1:
        p = torch.full_like(x, density)
    else:
        p = rank.mul_(2 * epsilon / (cols - 1)).add_(density - epsilon)
    u = torch.stack([torch.rand(x.shape[1:], generator=g, dtype=x.dtype) for g in generators]).to(x.device)
    return torch.where(u < p, x / p, torch.zeros((), dtype=x.dtype))


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

    One tile costs a handful of element-wise passes: with ``s = Σ_i x_i``, ``P = Σ_i max(x_i, 0)`` and
    ``p``/``q`` the counts of positive/negative entries, the disjoint mean is ``P/p`` where ``s > 0`` and
    ``(s − P)/q`` where ``s < 0``; at a tie (``s = 0``, ``P > 0``) both are at hand.
    """

    def __init__(self) -> None:
        self.sign_sum = 0.0
        self.ties: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        # flat positions re-merged by :meth:`patch` (ascending over the calls): their tile ties are void
        self.patched: list[torch.Tensor] = []
        self.patch_ties: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def tile(self, row0: int, x: torch.Tensor, out: torch.Tensor | None = None,
             ws: Workspace | None = None) -> torch.Tensor:
        """The merged ``(rows, cols)`` tile (written into ``out`` when given); ``+`` mean at ties for now."""
        merged, sig_sum, ties = self._elect(x, out, ws)
        self.sign_sum += sig_sum
        if ties is not None:
            where, neg, pos = ties
            self.ties.append((row0, where[:, 0], where[:, 1], neg, pos))
        return merged

    def patch(self, flat: torch.Tensor, cols: int, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Re-merge entries already merged by :meth:`tile`: ``old``/``new`` are the ``(n, 1, len)`` pruned task
        values at the flat positions ``flat`` of the ``(·, cols)`` result, as the tiles had them and as they
        should have been. Returns the new merged values (``(len,)``, the same bits :meth:`tile` gives for
        ``new``); the majority-sign count and the tie list are corrected. Calls come in
        ascending position order (``flat`` ascending, and after the previous call's), as the fold makes them."""
        self.sign_sum -= float(torch.sign(torch.sum(old, 0)).sum())
        merged, sig_sum, ties = self._elect(new, None, None)
        self.sign_sum += sig_sum
        self.patched.append(flat)
        if ties is not None:
            where, neg, pos = ties
            at = flat[where[:, 1]]
            self.patch_ties.append((0, at // cols, at % cols, neg, pos))
        return merged.reshape(-1)

    def _elect(self, x: torch.Tensor, out: torch.Tensor | None, ws: Workspace | None
               ) -> tuple[torch.Tensor, float, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
        """The merged tile, its ``Σ sign(s)`` and its ties ``(where, −mean, +mean)`` (or ``None``).

        Branch-free (a ``where`` on a random mask costs 4 ns an entry on CPU): with ``σ = sign(s)``,
        ``D = Σ_i sign(x_i) = p − q`` and ``T = Σ_i |sign(x_i)| = p + q``, the agreeing mass is
        ``(s − σ·(s − 2P))/2`` (``P`` where ``σ = 1``, ``s − P`` where ``σ = −1``) and the agreeing count is
        ``(T + σ·D)/2``; the halves cancel. Each is exact up to a rounding of the result's own size.
        """
        ws = Workspace.for_tile(x, ws)
        rows = x.shape[1]
        f, _, _ = ws.stack(rows)
        s, P, D, T, sig = (ws.plane(i, rows) for i in range(5))
        torch.sum(x, 0, out=s)
        torch.sum(torch.clamp(x, min=0, out=f), 0, out=P)
        torch.sum(torch.sign(x, out=f), 0, out=D)
        torch.sum(f.abs_(), 0, out=T)
        torch.sign(s, out=sig)
        sig_sum = float(sig.sum())
        # Ties (s = 0 with some entry nonzero) are where s = 0 but not T = 0, as {T = 0} ⊆ {s = 0}.
        # Every term of Σ T·(|σ| − 1) is ≤ 0 and it is < 0 exactly at a tie (T > 0, σ = 0), so the sum is < 0
        # iff the tile has one: two cheap float passes and a dot instead of two boolean counts (~4× the cost).
        w = torch.abs(sig, out=f[0]).sub_(1)
        n_tie = 0
        ties = None
        if float(torch.dot(T.reshape(-1), w.reshape(-1))) < 0:
            tie = (s == 0) & (T > 0)
            n_tie = int(tie.sum())
        if n_tie:
            where = tie.nonzero()
            p_cnt, q_cnt = (T[tie] + D[tie]) / 2, (T[tie] - D[tie]) / 2
            pos = P[tie] / p_cnt
            neg = -P[tie] / q_cnt.clamp(min=1)  # s = 0: the negative mass is −P
            ties = (where, neg, pos)
        num = torch.sub(s, P, alpha=2, out=P)            # s − 2P
        num = torch.addcmul(s, sig, num, value=-1, out=num)  # s − σ(s − 2P) = 2·agreeing mass
        den = torch.addcmul(T, sig, D, out=D).clamp_(min=1)  # T + σD = 2·agreeing count
        merged = torch.div(num, den, out=out) if out is not None else num / den
        if n_tie:
            merged[where[:, 0], where[:, 1]] = pos.to(merged.dtype)
        return merged, sig_sum, ties

    def finish(self, out: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Apply the majority rule to the tie entries of the assembled result ``out`` (in place).

        Returns the changes as ``(rows, cols, old, new)`` so a caller holding products or norms of ``out`` can
        update them."""
        changes = []
        if self.sign_sum < 0:
            # ascending: patches come in tile order, each in position order (so a binary search, not a sort)
            patched = torch.cat(self.patched) if self.patched else None
            for row0, r, c, neg, pos in self.ties:
                if patched is not None and patched.numel():  # a tile's tie at a position re-merged since is void
                    key = (row0 + r) * out.shape[1] + c
                    at = torch.searchsorted(patched, key).clamp_(max=patched.numel() - 1)
                    keep = patched[at] != key
                    r, c, neg, pos = r[keep], c[keep], neg[keep], pos[keep]
                out[row0 + r, c] = neg.to(out.dtype)
                changes.append((row0 + r, c, pos.to(out.dtype), neg.to(out.dtype)))
            for row0, r, c, neg, pos in self.patch_ties:
                out[r, c] = neg.to(out.dtype)
                changes.append((r, c, pos.to(out.dtype), neg.to(out.dtype)))
        return changes
