"""Delta-space merges (TIES, DARE, magnitude prune, DELLA, breadcrumbs), one module at a time.

These methods are element-wise on the dense task vectors ``τ_i = w_i·s_i·B_i@A_i`` (weights applied first,
as mergekit does), so they cannot stay in factor space. The dense work is bounded: task tiles of a few rows
are formed from the factors, pruned and merged into one ``(out, in)`` result (never n dense copies); the whole
module statistics (magnitude thresholds, the majority sign) come from extra passes over the tiles
(:mod:`lorakit.ops._kernels`). The merged ``M`` is multiplied by ``λ`` and returned to low rank by the
randomized SVD (oversampled, 2 power iterations, explicit seed).

Reported per module: ``error = ‖M − M_K‖/‖M‖`` exactly (the randomized SVD's result is an orthogonal
projection of ``M``, so ``‖M − M_K‖² = ‖M‖² − Σ_{i≤K} σ̂_i²``); the best possible error at rank K is not
known without a full dense SVD and is left empty.

Formulas (per entry, per module; ``N`` entries, density ``d``):

- ``magnitude_prune``: keep the ``⌊dN⌋`` largest ``|τ_i|``, then ``λ·Σ_i τ̂_i``;
- ``ties``: trim as above, ``γ = sign(Σ_i τ̂_i)`` (ties: the module's majority sign), ``M = λ·mean`` of the
  ``τ̂_i`` that are nonzero and agree with ``γ`` (Yadav et al. 2023);
- ``dare_linear`` / ``dare_ties``: ``τ̃_i = m ⊙ τ_i / d``, ``m ~ Bernoulli(d)``, then sum / TIES election and
  disjoint mean (Yu et al. 2024);
- ``della``: per row, keep probability ``d − ε + 2ε·rank/(cols−1)``, kept entries divided by it, then TIES
  election and disjoint mean (Deep et al. 2024);
- ``breadcrumbs``: drop the ``⌊γN⌋`` largest and keep the next ``⌊dN⌋``, then ``λ·Σ_i`` (Davari & Belilovsky).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch

from lorakit.errors import OperatorParameterError
from lorakit.factors import LoraFactors
from lorakit.linalg import SVD, _qr, _svd, compute_dtype, fix_signs
from lorakit.ops import _kernels as K
from lorakit.ops import _native
from lorakit.ops.merge_exact import check_same_shape, default_rank
from lorakit.ops.rank_rules import RankRule
from lorakit.ops.registry import MergeResult, register
from lorakit.ops.scratch import Scratch, dense


def check_params(
    *, density: float | None = None, epsilon: float | None = None, gamma: float | None = None, **_: object
) -> None:
    """Range checks shared by the delta-space methods (and run by the pipeline before any work)."""
    if density is not None and not (0.0 < density <= 1.0):
        raise OperatorParameterError(f"--density must be in (0, 1], got {density}", parameter="density")
    if epsilon is not None and density is not None and not (0.0 <= epsilon and density - epsilon >= 0.0
                                                            and density + epsilon <= 1.0):
        raise OperatorParameterError(f"epsilon {epsilon} must keep density ± epsilon inside [0, 1]",
                                     parameter="epsilon")
    if gamma is not None and (not (0.0 <= gamma < 1.0) or (density is not None and density + gamma > 1.0)):
        raise OperatorParameterError(f"gamma {gamma} must be in [0, 1) with density + gamma ≤ 1",
                                     parameter="gamma")


def products(M: torch.Tensor, Z: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``M @ Z`` for a skinny ``Z`` (a tile's factor ``A``, the range finder's test matrices), written into
    ``out`` when given: the AVX-512 kernel where it applies (:func:`lorakit.ops._native.mm`, 2.5× MKL's
    1.5 ns an entry of ``M`` for 26 columns), else torch. ``Z`` may carry zero columns past ``out``'s width
    (:func:`operand`)."""
    if _native.products_usable(M):
        return _native.mm(M, Z, out=out)
    k = Z.shape[1] if out is None else out.shape[1]
    return M @ Z[:, :k] if out is None else torch.mm(M, Z[:, :k], out=out)


def operand(Z: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``Z`` as :func:`products` with ``M`` (or row blocks of it) takes it fastest, for a ``Z`` used many times:
    padded once to whole vectors for the C kernel (:func:`lorakit.ops._native.padded`), else as it is."""
    return _native.padded(Z) if _native.products_usable(M) else Z


class TaskTiles:
    """Row tiles of the weighted task vectors ``w_i·s_i·B_i[rows]@A_i``, stacked ``(n, rows, in)``.

    The tiles are formed into one reused buffer (no allocation, so no page faults, per tile); a consumer may
    modify a tile in place but must not keep it past the next one. Every pass forms a row's values with the
    same GEMM shapes, so they are bit for bit the same in every pass (thresholds counted in one pass hold in
    the next).

    ``cached=True`` takes the smaller CPU tiles of :func:`lorakit.ops._kernels.tile_rows` when the factors are
    on the CPU (the random streams stay per standard tile: :class:`lorakit.ops._kernels.StreamDraws`).
    """

    def __init__(self, inputs: Sequence[LoraFactors], weights: Sequence[float], *, cached: bool = False) -> None:
        check_same_shape(inputs)
        self.dtype = compute_dtype(*[f.A for f in inputs])
        self.Bs = [f.B.to(self.dtype) * (w * f.scale) for f, w in zip(inputs, weights)]
        self.As = [f.A.to(self.dtype) for f in inputs]
        self.shape = inputs[0].shape
        # the tiles' GEMMs by the C kernel where it applies: 85 against MKL's 58 GFLOP/s
        self._operands = [operand(A, self.Bs[0]) for A in self.As]
        self.rows = K.tile_rows(*self.shape, cached=cached and self.As[0].device.type == "cpu")
        self.stream_rows = K.tile_rows(*self.shape)  # tiles never straddle these (the random-stream tiles)
        self._buf: torch.Tensor | None = None
        rows = min(self.rows, self.shape[0])
        self.workspace = K.Workspace(len(self.Bs), rows, self.shape[1], self.dtype, self.As[0].device)

    def __call__(self) -> Iterator[tuple[int, torch.Tensor]]:
        out, inn = self.shape
        if self._buf is None:
            self._buf = torch.empty(len(self.Bs), min(self.rows, out), inn, dtype=self.dtype,
                                    device=self.As[0].device)
        for s0 in range(0, out, self.stream_rows):
            s1 = min(s0 + self.stream_rows, out)
            for r0 in range(s0, s1, self.rows):
                x = self._buf[:, : min(self.rows, s1 - r0)]
                for i, (B, A) in enumerate(zip(self.Bs, self._operands)):
                    products(B[r0:r0 + x.shape[1]], A, out=x[i])
                yield r0, x

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def bounds(self) -> torch.Tensor:
        """``|τ_jk| ≤ ‖B_j,:‖·‖A_:,k‖`` (Cauchy–Schwarz), the histogram range of :func:`kth_largest_abs`."""
        return torch.tensor([float(B.norm(dim=1).max() * A.norm(dim=0).max()) * (1 + 1e-6) + 1e-30
                             for B, A in zip(self.Bs, self.As)], dtype=torch.float64)

    def thresholds(self, counts: Sequence[int], seed: int = 0) -> torch.Tensor:
        """``(n, len(counts))`` thresholds: the ``c``-th largest ``|τ_i|`` for each count ``c``, exactly.

        A sample of ``K.SAMPLE`` entries computed from the factors brackets each threshold; one counting pass
        over the tiles then selects it exactly (:func:`lorakit.ops._kernels.kth_largest_abs_bracketed`)."""
        ks = torch.tensor([list(counts)] * len(self.Bs), dtype=torch.int64)
        sample = K.sample_abs(self.Bs, self.As, min(K.SAMPLE, 4 * self.numel), seed=seed)
        return K.kth_largest_abs_bracketed(self, ks, sample, self.numel)


def keep_count(density: float, numel: int) -> int:
    return max(1, math.floor(density * numel))


MergeTile = Callable[[int, torch.Tensor, torch.Tensor], object]  # (row0, tile stack, out rows) -> anything


class Prune:
    """What a delta method keeps of each task tile, written once for both paths: the torch kernels
    (:meth:`apply_`, in place) and the fused C loop (:meth:`native`, the arguments of
    :func:`lorakit.ops._native.merge`).

    Nothing given keeps all; ``lo`` keeps ``|x_i| ≥ lo_i`` (trim); ``lo`` and ``hi`` keep ``lo_i ≤ |x_i| < hi_i``
    (band); ``masks`` multiplies by DARE's stream masks; ``custom(row0, x)`` prunes in place (DELLA, whose
    kernel has its own C loop), before the fused merge of the kept values."""

    def __init__(self, *, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None,
                 masks: K.StreamDraws | None = None,
                 custom: Callable[[int, torch.Tensor], None] | None = None) -> None:
        self.lo, self.hi, self.masks, self.custom = lo, hi, masks, custom

    @property
    def mode(self) -> str:
        if self.masks is not None:
            return "mask"
        if self.lo is not None:
            return "trim" if self.hi is None else "band"
        return "none"

    def apply_(self, r0: int, x: torch.Tensor, ws: K.Workspace) -> None:
        if self.custom is not None:
            self.custom(r0, x)
        elif self.masks is not None:
            K.dare_masked_(x, self.masks, r0)
        elif self.lo is not None and self.hi is not None:
            K.band(x, self.lo, self.hi, ws)
        elif self.lo is not None:
            K.trim_(x, self.lo, ws)

    def native(self, r0: int, x: torch.Tensor) -> dict[str, object]:
        if self.custom is not None:
            self.custom(r0, x)
            return {"mode": "none", "lo": None, "hi": None, "mask": None}
        mask = None if self.masks is None else self.masks(r0, x.shape[1])
        return {"mode": self.mode, "lo": self.lo, "hi": self.hi, "mask": mask}


class Merged:
    """The merged module ``M`` (``(out, in)``, before ``λ``), its probe product ``Y = M @ Ω`` and ``‖M‖²``."""

    def __init__(self, M: torch.Tensor, Y: torch.Tensor, omega: torch.Tensor, norm2: float) -> None:
        self.M, self.Y, self.omega, self.norm2 = M, Y, omega, norm2


def merge_dense(tiles: TaskTiles, merge_tile: MergeTile, omega: torch.Tensor,
                signer: K.SignedMerge | None = None, *, out: torch.Tensor | None = None) -> Merged:
    """Assemble ``M = merge(prune(τ))`` tile by tile, with ``Y = M @ Ω`` and ``‖M‖²`` taken from each tile
    while it is still in cache (the randomized SVD's first product and norm cost no extra pass over ``M``).

    ``merge_tile(row0, x, out)`` writes the merged rows of one tile stack into ``out``. With a ``signer`` (TIES
    election), its tie fix-ups are applied after the last tile, to ``M``, ``Y`` and the norm alike. ``out``: the
    buffer ``M`` is written into (its contents are overwritten), else a fresh one.
    """
    M = torch.empty(tiles.shape, dtype=tiles.dtype, device=omega.device) if out is None else out
    assert M.shape == tiles.shape and M.dtype == tiles.dtype and M.is_contiguous()
    Y = torch.empty(tiles.shape[0], omega.shape[1], dtype=tiles.dtype, device=omega.device)
    norm2 = 0.0
    omega_op = operand(omega, M)
    for r0, x in tiles():
        rows = M[r0:r0 + x.shape[1]]
        merge_tile(r0, x, rows)
        products(rows, omega_op, out=Y[r0:r0 + x.shape[1]])
        flat = rows.reshape(-1)
        norm2 += float(torch.dot(flat, flat))
    if signer is not None:
        norm2 += _apply(Y, omega, signer.finish(M))
    return Merged(M, Y, omega, max(norm2, 0.0))


Changes = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]  # (rows, cols, old, new)


def _apply(Y: torch.Tensor, omega: torch.Tensor, changes: Changes) -> float:
    """``Y += ΔM Ω`` for entry changes already written to ``M``; returns ``Δ‖M‖²`` (in float64).

    ``ΔM`` is multiplied as a CSR matrix: ~5 ns a change with ``Ω``'s 26 columns, against ~150 for an
    ``index_add_`` of the ``(len, k)`` rows ``Δ·Ω[c]`` (which are then never formed)."""
    changes = [ch for ch in changes if ch[0].numel()]
    if not changes:
        return 0.0
    r, c, old, new = (torch.cat(t) for t in zip(*changes))
    d2 = float((new.double() ** 2 - old.double() ** 2).sum())
    order = torch.argsort(r, stable=True)  # CSR wants its entries by row (tile order already gives that)
    r, c, delta = r[order], c[order], (new - old)[order].to(Y.dtype)
    crow = torch.zeros(Y.shape[0] + 1, dtype=torch.int64, device=Y.device)
    torch.cumsum(torch.bincount(r, minlength=Y.shape[0]), 0, out=crow[1:])
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is long stable
        warnings.simplefilter("ignore", UserWarning)
        dM = torch.sparse_csr_tensor(crow, c, delta, (Y.shape[0], omega.shape[0]))
        Y += dM @ omega
    return d2


def probe(tiles: TaskTiles, k: int, seed: int) -> torch.Tensor:
    """The range finder's ``(in, k)`` test matrix: an orthonormal basis of the inputs' row spaces
    ``span(A_1ᵀ … A_nᵀ)``, where nearly all of a merged task vector's energy lies, completed by Gaussian
    columns (or, when the row spaces have more than ``k`` dimensions, ``k`` Gaussian mixtures of them).

    A Gaussian test matrix needs power iterations to find that subspace; this one starts in it, so a single
    iteration (:data:`POWER_ITERATIONS`) reaches the accuracy two gave from a Gaussian start (measured in
    docs/performance.md), and every iteration saved is two products with the dense ``M``.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    A = torch.cat(tiles.As).T  # (in, Σr)
    Qa, _ = _qr(A)
    inn, R = Qa.shape
    if R >= k:
        G = torch.randn(R, k, generator=gen, dtype=Qa.dtype).to(Qa.device)
        return Qa @ G
    G = torch.randn(inn, k - R, generator=gen, dtype=Qa.dtype).to(Qa.device)
    return torch.cat([Qa, G], dim=1)


def products_t(M: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``Mᵀ @ Q`` as :func:`products` (:func:`lorakit.ops._native.mtm`); torch's fallback takes ``(Qᵀ M)ᵀ``,
    the orientation MKL runs fastest (1.0-1.3 against 1.6-1.8 ns an entry)."""
    return _native.mtm(M, Q) if _native.products_usable(M) else (Q.T @ M).T


POWER_ITERATIONS = 1
OVERSAMPLE = 10


def refactor(merged: Merged, rule: RankRule, *, lam: float, n_iter: int = POWER_ITERATIONS, kernel=None,
             kind="linear") -> MergeResult:
    """Low-rank factors of ``λ·M`` by the randomized SVD from the probe product ``Y = M @ Ω`` already taken,
    with the exact relative error of the result.

    Halko–Martinsson–Tropp: ``Q = orth(Y)``, ``n_iter`` power iterations ``Q ← orth(M·orth(Mᵀ Q))``, then the
    exact SVD of ``Qᵀ M``. The result is the orthogonal projection ``Q Qᵀ M`` truncated, so
    ``‖M − M_K‖² = ‖M‖² − Σ_{i≤K} σ̂_i²``. ``λ`` scales the singular values (its sign goes into ``U``), so
    ``M`` itself is never rescaled. Cost: ``2·n_iter + 1`` products of ``M`` with ``k`` columns.
    """
    M, norm2 = merged.M, merged.norm2
    Q, _ = _qr(merged.Y)  # thin QRs and the small SVD in one thread (lorakit.linalg.lapack_one_thread)
    for _ in range(n_iter):
        Z, _ = _qr(products_t(M, Q))
        Q, _ = _qr(products(M, Z))
    Bt = products_t(M, Q)  # (in, k) = (Qᵀ M)ᵀ
    Ub, S, Vh = _svd(Bt.T)
    U, Vh = fix_signs(Q @ Ub, Vh)
    if rule.kind == "rank":
        keep = min(int(rule.value), S.shape[0])
    else:
        # Select from the sketched spectrum; the residual energy joins as one last value, so that energy/error
        # rules see the true total ‖M‖².
        rest = max(norm2 - float((S.double() ** 2).sum()), 0.0)
        spectrum = torch.cat([S.double(), torch.tensor([math.sqrt(rest)], dtype=torch.float64)])
        keep = max(1, min(rule.select(spectrum), S.shape[0]))
    U, S, Vh = U[:, :keep], S[:keep], Vh[:keep]
    kept = float((S.double() ** 2).sum())
    err = math.sqrt(max(norm2 - kept, 0.0) / norm2) if norm2 > 0 else 0.0
    if lam < 0:
        U = -U
    out = SVD(U, S * abs(lam), Vh).to_factors(kernel=kernel, kind=kind)
    return MergeResult(out, error=err, best_error=None, info={"rank": keep})


def _run(inputs: Sequence[LoraFactors], tiles: TaskTiles, prune: Prune, rule: RankRule | None,
         seed: int, lam: float, info: dict, signed: bool, scratch: Scratch | None) -> MergeResult:
    """Probe, merge (fused with the first product), refactor: the shared body of every delta method.

    The prune and merge of a tile run in one C loop for float32 CPU tiles (:mod:`lorakit.ops._native`, the
    same operations), else as torch kernels. The dense ``M`` is lent by ``scratch`` (the engine's buffers of
    the run, :mod:`lorakit.ops.scratch`) when given."""
    first = inputs[0]
    rule = rule or default_rank(inputs)
    full = min(tiles.shape)
    if rule.kind == "rank":
        k = min(int(rule.value) + OVERSAMPLE, full)
    else:
        k = min(max(64, 4 * sum(f.rank for f in inputs)), full)
    omega = probe(tiles, k, seed)
    signer = K.SignedMerge() if signed else None
    if _native.usable(tiles.As[0]):
        def body(r0: int, x: torch.Tensor, out: torch.Tensor) -> None:
            if signer is not None:
                signer.native_tile(r0, x, out, **prune.native(r0, x))
            else:
                _native.merge(x, out, signed=False, **prune.native(r0, x))  # type: ignore[arg-type]
    else:
        def body(r0: int, x: torch.Tensor, out: torch.Tensor) -> None:
            prune.apply_(r0, x, tiles.workspace)
            if signer is not None:
                signer.tile(r0, x, out=out, ws=tiles.workspace)
            else:
                K.chain_sum(x, out)
    with dense(scratch, tiles.shape, tiles.dtype, omega.device) as M:
        merged = merge_dense(tiles, body, omega, signer, out=M)
        res = refactor(merged, rule, lam=lam, kernel=first.kernel, kind=first.kind)
    return MergeResult(res.factors, res.error, res.best_error, {**res.info, **info})


@register("ties", description="TIES: trim to density, elect sign by mass, disjoint mean; then rank K",
          exact=False, space="delta", paper="https://arxiv.org/abs/2306.01708", rank="max_input", rank_requested=True, rank_cap="shape",
          homogeneous=True, ranges={"density": "(0, 1]"}, lossless={"density": 1.0})
def ties(
    inputs: Sequence[LoraFactors], weights: Sequence[float], *, density: float = 0.2, lam: float = 1.0,
    rank_rule: RankRule | None = None, seed: int = 0, scratch: Scratch | None = None,
) -> MergeResult:
    return _trimmed(inputs, weights, density, lam, rank_rule, seed, scratch, signed=True)


@register("magnitude_prune", description="keep the top-density fraction of |τ_i| per module, weighted sum",
          exact=False, space="delta", rank="max_input", rank_requested=True, rank_cap="shape", homogeneous=True,
          ranges={"density": "(0, 1]"}, lossless={"density": 1.0})
def magnitude_prune(
    inputs: Sequence[LoraFactors], weights: Sequence[float], *, density: float = 0.2, lam: float = 1.0,
    rank_rule: RankRule | None = None, seed: int = 0, scratch: Scratch | None = None,
) -> MergeResult:
    return _trimmed(inputs, weights, density, lam, rank_rule, seed, scratch, signed=False)


def _trimmed(
    inputs: Sequence[LoraFactors], weights: Sequence[float], density: float, lam: float,
    rank_rule: RankRule | None, seed: int, scratch: Scratch | None, *, signed: bool,
) -> MergeResult:
    """Trim every input to its top-``density`` magnitudes, then a plain sum (``signed=False``) or TIES's
    sign election and disjoint mean."""
    check_params(density=density)
    tiles = TaskTiles(inputs, weights, cached=True)
    t = tiles.thresholds([keep_count(density, tiles.numel)], seed=seed)[:, 0]
    return _run(inputs, tiles, Prune(lo=t), rank_rule, seed, lam, {"density": density}, signed, scratch)


@register("dare_linear", description="DARE: random drop (keep density), rescale by 1/density, weighted sum",
          exact=False, space="delta", paper="https://arxiv.org/abs/2311.03099", rank="max_input", rank_requested=True, rank_cap="shape",
          homogeneous=True, ranges={"density": "(0, 1]"}, lossless={"density": 1.0})
def dare_linear(
    inputs: Sequence[LoraFactors], weights: Sequence[float], *, density: float = 0.5, lam: float = 1.0,
    rank_rule: RankRule | None = None, seed: int = 0, module: str = "", scratch: Scratch | None = None,
) -> MergeResult:
    return _dare(inputs, weights, density, lam, rank_rule, seed, module, scratch, signed=False)


@register("dare_ties", description="DARE drop and rescale, then TIES sign election and disjoint mean",
          exact=False, space="delta", paper="https://arxiv.org/abs/2311.03099", rank="max_input", rank_requested=True, rank_cap="shape",
          homogeneous=True, ranges={"density": "(0, 1]"}, lossless={"density": 1.0})
def dare_ties(
    inputs: Sequence[LoraFactors], weights: Sequence[float], *, density: float = 0.5, lam: float = 1.0,
    rank_rule: RankRule | None = None, seed: int = 0, module: str = "", scratch: Scratch | None = None,
) -> MergeResult:
    return _dare(inputs, weights, density, lam, rank_rule, seed, module, scratch, signed=True)


def _dare(
    inputs: Sequence[LoraFactors], weights: Sequence[float], density: float, lam: float,
    rank_rule: RankRule | None, seed: int, module: str, scratch: Scratch | None, *, signed: bool,
) -> MergeResult:
    """DARE's drop-and-rescale on every input, then a plain sum (``signed=False``) or TIES's election."""
    check_params(density=density)
    # cache-sized tiles; the masks are drawn per standard tile all the same (K.StreamDraws), so the stream holds
    tiles = TaskTiles(inputs, weights, cached=True)
    prune = Prune() if density >= 1.0 else Prune(masks=K.StreamDraws(density, seed, module, len(inputs), tiles.shape))
    # 1/density is folded into λ: the TIES election is invariant to a positive scale and the means are linear
    return _run(inputs, tiles, prune, rank_rule, seed, lam / density, {"density": density}, signed, scratch)


@register("della", description="DELLA: magnitude-ranked random drop (MAGPRUNE, 1/p rescale), TIES election",
          exact=False, space="delta", paper="https://arxiv.org/abs/2406.11617", rank="max_input", rank_requested=True, rank_cap="shape",
          homogeneous=True, ranges={"density": "(0, 1]", "epsilon": "[0, 0.5]"}, check=check_params,
          lossless={"density": 1.0, "epsilon": 0.0})
def della(
    inputs: Sequence[LoraFactors], weights: Sequence[float], *, density: float = 0.5, epsilon: float = 0.15,
    lam: float = 1.0, rank_rule: RankRule | None = None, seed: int = 0, module: str = "",
    scratch: Scratch | None = None,
) -> MergeResult:
    check_params(density=density, epsilon=epsilon)
    # cache-sized tiles; the uniforms are drawn per standard tile all the same (K.StreamDraws)
    tiles = TaskTiles(inputs, weights, cached=True)
    draws = K.StreamDraws(None, seed, module, len(inputs), tiles.shape, tiles.dtype)

    def prune(r0: int, x: torch.Tensor) -> None:
        K.della_(x, density, epsilon, draws(r0, x.shape[1]))

    return _run(inputs, tiles, Prune(custom=prune), rank_rule, seed, lam, {"density": density}, True, scratch)


@register("breadcrumbs", description="drop the top-gamma outliers and the small tail, keep density; sum",
          exact=False, space="delta", paper="https://arxiv.org/abs/2312.06795", rank="max_input", rank_requested=True, rank_cap="shape",
          homogeneous=True, ranges={"density": "(0, 1]", "gamma": "[0, 1)"}, check=check_params,
          lossless={"density": 1.0, "gamma": 0.0})
def breadcrumbs(
    inputs: Sequence[LoraFactors], weights: Sequence[float], *, density: float = 0.9, gamma: float = 0.01,
    lam: float = 1.0, rank_rule: RankRule | None = None, seed: int = 0, scratch: Scratch | None = None,
) -> MergeResult:
    check_params(density=density, gamma=gamma)
    tiles = TaskTiles(inputs, weights, cached=True)
    n_out = math.floor(gamma * tiles.numel)
    t = tiles.thresholds([n_out, n_out + keep_count(density, tiles.numel)], seed=seed)
    return _run(inputs, tiles, Prune(lo=t[:, 1], hi=t[:, 0]), rank_rule, seed, lam,
                {"density": density, "gamma": gamma}, False, scratch)
