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
# Per task on CPU, for every delta merge: a tile stack and its scratch stacks then stay in the caches between
# the passes over it (TIES 30 → 22-24 ns an entry; docs/performance.md). The random streams of DARE and DELLA
# are still drawn per TILE_ELEMENTS tile (StreamDraws slices them). On a GPU the larger tiles mean fewer launches.
# One torch thread only: with two, each small pass pays the thread pool's barrier, and next to the read-ahead
# thread the small tiles made a whole merge 25-35% slower end to end (4 8B layers: 24.3-26.5 s against
# 15.7-20.3 s with 2^21; one thread: 21.7 s against 23.9-24.4 s; docs/performance.md).
CPU_TILE_ELEMENTS = 1 << 18
HIST_BINS = 1 << 16
SAMPLE = 1 << 17  # sampled magnitudes per task that bracket a top-k threshold (see kth_largest_abs_bracketed)
SAMPLE_CHUNK = 1 << 13  # samples formed at a time (their (chunk, r) gathers stay small and reused)
BRACKET_SIGMAS = 6.0

Tiles = Callable[[], Iterator[tuple[int, torch.Tensor]]]  # yields (row0, stack (n, rows, cols)) in row order


def tile_rows(out: int, inn: int, *, cached: bool = False) -> int:
    """Rows per tile for an ``out × in`` matrix; a function of the shape only, so random masks are reproducible.

    ``cached``: the smaller CPU tiles of :data:`CPU_TILE_ELEMENTS` when torch runs one thread (see there), for
    merges whose result does not depend on the tiling (random streams drawn per standard tile, :class:`StreamDraws`)."""
    small = cached and torch.get_num_threads() == 1
    elements = min(TILE_ELEMENTS, CPU_TILE_ELEMENTS) if small else TILE_ELEMENTS
    return max(1, min(out, elements // max(inn, 1)))


def tile_seed(seed: int, task: int, module: str, row0: int) -> int:
    """The seed of one (task, module, tile)'s RNG: independent of the order tiles are visited in."""
    return zlib.crc32(f"{seed}:{task}:{module}:{row0}".encode())


def tile_generator(seed: int, task: int, module: str, row0: int) -> torch.Generator:
    """The RNG of one (task, module, tile), seeded by :func:`tile_seed`."""
    return torch.Generator().manual_seed(tile_seed(seed, task, module, row0))


def tile_uniform_(out: torch.Tensor, seed: int, keep: float | None = None) -> torch.Tensor:
    """``out`` filled with ``torch.rand(out.shape, generator=torch.Generator().manual_seed(seed))`` (or with
    ``(that < keep)`` as 0/1 floats): the random stream of DARE and DELLA tiles, by the C generator where it
    applies (:func:`lorakit.ops._native.uniform_`, the same values 13× faster), else by torch."""
    from lorakit.ops import _native

    if _native.stream_usable(out):
        return _native.uniform_(out, seed, keep)
    torch.rand(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype, out=out)
    return out if keep is None else torch.lt(out, keep, out=out)


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
    # Gathers of whole rows of B and of Aᵀ are contiguous (a column gather of A is 2× slower), and by
    # index_select: the same rows as B[rows], 10× faster (advanced indexing takes a generic path). In chunks
    # of SAMPLE_CHUNK samples: the (count, r) temporaries would be fresh, page-faulted mmaps (3-4× the work).
    out_ = torch.empty(len(Bs), count, dtype=Bs[0].dtype, device=Bs[0].device)
    for i, (B, A) in enumerate(zip(Bs, As)):
        At = A.T.contiguous()
        for a in range(0, count, SAMPLE_CHUNK):
            r, c = rows[a:a + SAMPLE_CHUNK], cols[a:a + SAMPLE_CHUNK]
            torch.sum(B.index_select(0, r).mul_(At.index_select(0, c)), 1, out=out_[i, a:a + SAMPLE_CHUNK])
    return out_.abs_()


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
    n, m = ks.shape
    s = sample.shape[1]
    sample = sample.cpu().contiguous()
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
                hi[i, j] = float(kth_largest(sample[i], i_hi + 1))
            if i_lo < s:
                lo[i, j] = float(kth_largest(sample[i], i_lo + 1))
            todo.append((i, j))
    if not todo:
        return out
    above = {key: 0 for key in todo}
    found: dict[tuple[int, int], list[torch.Tensor]] = {key: [] for key in todo}
    dtype = None
    ws = getattr(tiles, "workspace", None)
    from lorakit.ops import _native

    for _, x in tiles():
        dtype = x.dtype
        ws = Workspace.for_tile(x, ws)
        a, ge_hi, inside = ws.stack(x.shape[1])
        if _native.usable(x):  # the same counts and values in one C loop per task (no |x| stack, no masks)
            for i, j in todo:
                n_lo, k = _native.bracket(x[i], float(lo[i, j]), float(hi[i, j]), a[i])
                above[(i, j)] += n_lo - k
                found[(i, j)].append(a[i].reshape(-1)[:k].clone())
            continue
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


def kth_largest(vals: torch.Tensor, k: int) -> float:
    """The ``k``-th largest of a 1-D tensor (``1 ≤ k ≤ len``) by selection: the C radix selection for float32
    on the CPU (:func:`lorakit.ops._native.kth_largest`, 2.6 against 13.5 ms on 10^6 values), else
    ``kthvalue`` (O(len), where a ``topk`` of a large ``k`` sorts, 2.5× slower on a bracket of 4·10⁵ values)."""
    from lorakit.ops import _native

    if _native.usable(vals) and vals.ndim == 1 and vals.is_contiguous():
        return _native.kth_largest(vals, k)
    return float(torch.kthvalue(vals, vals.numel() - k + 1).values)


class Workspace:
    """Scratch buffers reused across the tiles of a module: a float and two bool ``(n, rows, cols)`` stacks and a
    few ``(rows, cols)`` planes. Fresh multi-MB temporaries are mmap'd and page-faulted on every tile (they cost
    3-4× the arithmetic on this CPU), so the hot kernels write into these with ``out=``."""

    def __init__(self, n: int, rows: int, cols: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.f = torch.empty(n, rows, cols, dtype=dtype, device=device)
        self.b = torch.empty(n, rows, cols, dtype=torch.bool, device=device)
        self.b2 = torch.empty(n, rows, cols, dtype=torch.bool, device=device)
        self.planes = [torch.empty(rows, cols, dtype=dtype, device=device) for _ in range(8)]
        self._f2: torch.Tensor | None = None

    @staticmethod
    def for_tile(x: torch.Tensor, ws: Workspace | None) -> Workspace:
        if ws is None or ws.f.shape[0] != x.shape[0] or ws.f.shape[1] < x.shape[1] or ws.f.shape[2] != x.shape[2] \
                or ws.f.dtype != x.dtype:
            return Workspace(x.shape[0], x.shape[1], x.shape[2], x.dtype, x.device)
        return ws

    @property
    def f2(self) -> torch.Tensor:
        """A second float ``(n, rows, cols)`` stack, allocated on first use (only breadcrumbs' band needs it)."""
        if self._f2 is None:
            self._f2 = torch.empty_like(self.f)
        return self._f2

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
    x.mul_(torch.lt(f, _per_task(high, x), out=ws.f2[:, :x.shape[1]]))  # 0/1 floats (see trim_)
    return x.mul_(torch.ge(f, _per_task(low, x), out=f))


def dare(x: torch.Tensor, density: float, generators: list[torch.Generator]) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` (Bernoulli), divide the kept ones by ``density``."""
    return x if density >= 1.0 else dare_(x.clone(), density, generators)


def dare_(x: torch.Tensor, density: float, generators: list[torch.Generator]) -> torch.Tensor:
    """:func:`dare` in place. The mask of task ``i`` is ``torch.rand(rows, cols, generator=generators[i]) <
    density`` (the documented stream). (The delta merges draw the same masks through :class:`StreamMasks` and
    fold the ``1/density`` into the module's final scale.)"""
    if density >= 1.0:
        return x
    u = torch.empty(x.shape, dtype=torch.float32)
    for i, g in enumerate(generators):
        torch.rand(x.shape[1:], generator=g, out=u[i])
    # the mask as 0/1 floats: multiplying by a bool tensor is 20-40× slower (a casting path)
    return x.mul_(torch.lt(u, density, out=u).to(device=x.device, dtype=x.dtype)).div_(density)


class StreamDraws:
    """The random draws of the delta merges' tiles, per standard tile (:func:`tile_rows` rows: the documented
    stream) and handed out in slices to the smaller processing tiles inside it (which must not straddle a
    standard tile, see ``merge_delta.TaskTiles``), so cache-sized tiles leave the stream, and the result,
    unchanged. Task ``i``'s draw of the tile at ``row0`` is ``u = torch.rand(rows, cols,
    generator=tile_generator(seed, i, module, row0))`` (:func:`tile_uniform_`): DARE takes its keep masks
    ``u < keep`` as 0/1 floats, DELLA (``keep=None``) the uniforms, in its compute dtype (``dtype``: float32 for
    16-bit inputs, float64 for float64 ones). Drawn on the CPU."""

    def __init__(self, keep: float | None, seed: int, module: str, n: int, shape: tuple[int, int],
                 dtype: torch.dtype = torch.float32) -> None:
        self.keep, self.seed, self.module, self.n = keep, seed, module, n
        self.out, self.cols = shape
        self.rows = tile_rows(*shape)
        self.base = -1
        self.u = torch.empty(n, min(self.rows, self.out), self.cols, dtype=dtype)

    def __call__(self, r0: int, rows: int) -> torch.Tensor:
        """The ``(n, rows, cols)`` draws of rows ``r0 : r0 + rows``."""
        base = r0 - r0 % self.rows
        if base != self.base:
            u = self.u[:, :min(self.rows, self.out - base)]
            for i in range(self.n):
                tile_uniform_(u[i], tile_seed(self.seed, i, self.module, base), keep=self.keep)
            self.base = base
        if r0 + rows > base + self.rows:
            raise ValueError(f"rows {r0}:{r0 + rows} straddle the random-stream tile at row {base}")
        return self.u[:, r0 - base:r0 - base + rows]


def dare_masked_(x: torch.Tensor, masks: StreamDraws, r0: int) -> torch.Tensor:
    """DARE's drop (no ``1/density``: the delta merges fold it into the module's scale) on the tile stack of
    rows ``r0 :``, its masks from ``masks``."""
    m = masks(r0, x.shape[1])
    return x.mul_(m if m.dtype == x.dtype and m.device == x.device else m.to(device=x.device, dtype=x.dtype))


def della_(x: torch.Tensor, density: float, epsilon: float, uniforms: torch.Tensor) -> torch.Tensor:
    """DELLA MAGPRUNE on the task stack ``x (n, rows, cols)``, in place: per row, keep probability
    ``p = density − ε + 2ε·rank/(cols−1)`` (rank of ``|x|`` in the row, 0 = smallest, equal magnitudes ranked by
    column), Bernoulli keep ``u < p`` with the ``(n, rows, cols)`` CPU ``uniforms`` (the merge draws them by
    :class:`StreamDraws`, in ``x``'s dtype), kept entries divided by their ``p`` (the paper's rescale).

    Runs in ``x``'s dtype (float32 for 16-bit adapters: the ranks and probabilities are exact there up to
    2^24 columns). For float32 CPU tiles one C loop per task does it (``_delta.c``: ranks by a radix sort, about
    a tenth of the comparison sort's ~45 ns an entry); the torch path sorts the magnitudes' bit patterns as
    integers (the same order, 25% faster than a float sort), stably, so both rank ties alike and agree.
    """
    from lorakit.ops import _native
    from lorakit.threads import parallel_map

    n, cols = x.shape[0], x.shape[-1]
    assert uniforms.shape == x.shape
    c1, c2 = (2 * epsilon / (cols - 1), density - epsilon) if cols > 1 else (0.0, density)
    if _native.usable(x, uniforms) and x[0].is_contiguous() and uniforms[0].is_contiguous():
        def task(i: int) -> None:  # the tasks are independent
            _native.della_(x[i], uniforms[i], c1, c2)

        parallel_map(task, range(n))  # the sort is most of a tile's cost, and its loop is one thread
        return x
    u = uniforms.to(device=x.device, dtype=x.dtype)
    a = x.abs()
    keys = {torch.float32: torch.int32, torch.float64: torch.int64}.get(a.dtype)
    order = (a.view(keys) if keys is not None else a).argsort(dim=-1, stable=True)
    p = torch.empty_like(x)
    p.scatter_(-1, order, torch.arange(cols, dtype=x.dtype, device=x.device).expand_as(x))
    p.mul_(c1).add_(c2)
    return x.copy_(torch.where(u < p, x / p, torch.zeros((), dtype=x.dtype)))


def elect_sign(x: torch.Tensor) -> torch.Tensor:
    """TIES sign election by mass: ``γ = sign(Σ_i x_i)`` element-wise (0 where the sum is 0)."""
    return torch.sign(x.sum(0))


def disjoint_mean(x: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """TIES disjoint merge: mean over tasks of the nonzero entries whose sign equals ``sign`` (count ≥ 1)."""
    agree = (torch.sign(x) == sign.unsqueeze(0)) & (x != 0)
    total = torch.where(agree, x, torch.zeros((), dtype=x.dtype)).sum(0)
    return total / agree.sum(0).clamp_min(1).to(x.dtype)


def chain_sum(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``Σ_i x_i`` over the task axis as a chain of plane adds in task order, ``((x_0 + x_1) + x_2) + …``: the
    order the fused loop of ``_delta.c`` uses, so both paths give the same bits (``torch.sum``'s order for 5+
    tasks is not a chain). Small-integer planes (counts) are exact in any order."""
    if x.shape[0] == 1:
        return out.copy_(x[0])
    torch.add(x[0], x[1], out=out)
    for i in range(2, x.shape[0]):
        out.add_(x[i])
    return out


class SignedMerge:
    """Elect + disjoint merge over a stream of tiles, with the paper's tie rule: where the masses cancel but
    some entry is nonzero, the elected sign is the module's majority sign ``sign(Σ γ)``, known only after the
    last tile. Ties are rare (measure zero for real data), so both candidates are kept for those entries only
    and the right one is chosen in :meth:`finish`.

    Per entry, with ``P``/``N`` the positive/negative masses (summed in task order) and ``p``/``q`` their
    counts: ``γ = sign(P + N)`` (the sign of ``Σ_i x_i``; exact, as ``P + N = 0`` iff ``N = −P``), and the
    disjoint mean is ``P/p`` where ``γ > 0``, ``N/q`` where ``γ < 0``, 0 where every entry is 0; at a tie both
    are at hand. :mod:`lorakit.ops._native` does the same operations in one loop (float32 on CPU).
    """

    def __init__(self) -> None:
        self.sign_sum = 0.0
        self.ties: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def tile(self, row0: int, x: torch.Tensor, out: torch.Tensor | None = None,
             ws: Workspace | None = None) -> torch.Tensor:
        """The merged ``(rows, cols)`` tile (written into ``out`` when given); ``+`` mean at ties for now.

        Branch-free (a ``where`` on a random mask costs 4 ns an entry on CPU): with ``g = [γ > 0]`` and
        ``l = [γ < 0]`` as 0/1 floats, the mean is ``(P·g + N·l) / max(p·g + q·l, 1)``."""
        ws = Workspace.for_tile(x, ws)
        rows = x.shape[1]
        f, _, _ = ws.stack(rows)
        P, N, p, q, s, g, lt, T = (ws.plane(i, rows) for i in range(8))
        chain_sum(torch.gt(x, 0, out=f), p)
        chain_sum(f.mul_(x), P)
        chain_sum(torch.lt(x, 0, out=f), q)
        chain_sum(f.mul_(x), N)
        torch.add(P, N, out=s)
        torch.gt(s, 0, out=g)
        torch.lt(s, 0, out=lt)
        self.sign_sum += float(g.sum()) - float(lt.sum())
        torch.add(p, q, out=T)
        # Ties (s = 0 with some entry nonzero): every term of Σ T·(g + l − 1) is ≤ 0 and it is < 0 exactly at a
        # tie, so the sum is < 0 iff the tile has one: two float passes and a dot instead of boolean counts.
        w = torch.add(g, lt, out=f[0]).sub_(1)
        n_tie = 0
        if float(torch.dot(T.reshape(-1), w.reshape(-1))) < 0:
            tie = (s == 0) & (T > 0)
            n_tie = int(tie.sum())
        if n_tie:
            where = tie.nonzero()
            pos = P[tie] / p[tie].clamp(min=1)
            neg = N[tie] / q[tie].clamp(min=1)
            self.ties.append((row0, where[:, 0], where[:, 1], neg, pos))
        num = torch.mul(P, g, out=P).add_(N.mul_(lt))
        den = torch.mul(p, g, out=p).add_(q.mul_(lt)).clamp_(min=1)
        merged = torch.div(num, den, out=out) if out is not None else num / den
        if n_tie:
            merged[where[:, 0], where[:, 1]] = pos.to(merged.dtype)
        return merged

    def native_tile(self, row0: int, x: torch.Tensor, out: torch.Tensor, **prune: object) -> None:
        """:meth:`tile` after the prune ``prune`` (see :func:`lorakit.ops._native.merge`), fused in one C loop
        over ``x`` (float32, CPU); ``x`` itself is left unpruned."""
        from lorakit.ops import _native

        sigma, idx, tie_p, tie_q = _native.merge(x, out, signed=True, **prune)  # type: ignore[arg-type]
        self.sign_sum += sigma
        if idx.numel():
            cols = x.shape[2]
            neg = -tie_p / tie_q.clamp(min=1)
            self.ties.append((row0, idx // cols, idx % cols, neg, out.reshape(-1)[idx].clone()))

    def finish(self, out: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Apply the majority rule to the tie entries of the assembled result ``out`` (in place).

        Returns the changes as ``(rows, cols, old, new)`` so a caller holding products or norms of ``out`` can
        update them."""
        changes = []
        if self.sign_sum < 0:
            for row0, r, c, neg, pos in self.ties:
                out[row0 + r, c] = neg.to(out.dtype)
                changes.append((row0 + r, c, pos.to(out.dtype), neg.to(out.dtype)))
        return changes
