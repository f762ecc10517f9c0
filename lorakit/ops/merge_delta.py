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
from collections.abc import Callable, Sequence

import torch

from lorakit.errors import OperatorParameterError
from lorakit.factors import LoraFactors
from lorakit.linalg import SVD, compute_dtype, randomized_svd
from lorakit.ops import _kernels as K
from lorakit.ops.merge_exact import check_same_shape, default_rank
from lorakit.ops.rank_rules import RankRule
from lorakit.ops.registry import MergeResult, register

Prune = Callable[[int, torch.Tensor], torch.Tensor]


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


class TaskTiles:
    """Row tiles of the weighted task vectors ``w_i·s_i·B_i[rows]@A_i``, stacked ``(n, rows, in)``."""

    def __init__(self, inputs: Sequence[LoraFactors], weights: Sequence[float]) -> None:
        check_same_shape(inputs)
        self.dtype = compute_dtype(*[f.A for f in inputs])
        self.Bs = [f.B.to(self.dtype) * (w * f.scale) for f, w in zip(inputs, weights)]
        self.As = [f.A.to(self.dtype) for f in inputs]
        self.shape = inputs[0].shape
        self.rows = K.tile_rows(*self.shape)

    def __call__(self):
        out = self.shape[0]
        for r0 in range(0, out, self.rows):
            yield r0, torch.stack([B[r0:r0 + self.rows] @ A for B, A in zip(self.Bs, self.As)])

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def bounds(self) -> torch.Tensor:
        """``|τ_jk| ≤ ‖B_j,:‖·‖A_:,k‖`` (Cauchy–Schwarz), the histogram range of :func:`kth_largest_abs`."""
        return torch.tensor([float(B.norm(dim=1).max() * A.norm(dim=0).max()) * (1 + 1e-6) + 1e-30
                             for B, A in zip(self.Bs, self.As)], dtype=torch.float64)

    def thresholds(self, counts: Sequence[int]) -> torch.Tensor:
        """``(n, len(counts))`` thresholds: the ``c``-th largest ``|τ_i|`` for each count ``c``."""
        ks = torch.tensor([list(counts)] * len(self.Bs), dtype=torch.int64)
        return K.kth_largest_abs(self, ks, self.bounds())


def keep_count(density: float, numel: int) -> int:
    return max(1, math.floor(density * numel))


def merge_dense(tiles: TaskTiles, prune: Prune, *, signed: bool, lam: float) -> torch.Tensor:
    """Assemble ``M = λ·merge(prune(τ))`` tile by tile into one ``(out, in)`` matrix."""
    M = torch.empty(tiles.shape, dtype=tiles.dtype)
    signer = K.SignedMerge() if signed else None
    for r0, x in tiles():
        x = prune(r0, x)
        M[r0:r0 + x.shape[1]] = signer.tile(r0, x) if signer else x.sum(0)
    if signer:
        signer.finish(M)
    return M.mul_(lam)


def refactor(
    M: torch.Tensor, rule: RankRule, *, seed: int, sketch: int, kernel=None, kind="linear"
) -> MergeResult:
    """Low-rank factors of ``M`` by the randomized SVD, with the exact relative error of the result."""
    # ‖M‖² by row blocks: a float64 copy of a 14336×4096 M would double the peak memory
    norm2 = sum(float((blk.double() ** 2).sum()) for blk in M.split(K.tile_rows(*M.shape)))
    full = min(M.shape)
    if rule.kind == "rank":
        rs = randomized_svd(M, min(int(rule.value), full), seed=seed, dtype=M.dtype)
    else:
        # Select from the sketched spectrum; the residual energy joins as one last value, so that energy/error
        # rules see the true total ‖M‖².
        rs = randomized_svd(M, min(sketch, full), seed=seed, dtype=M.dtype)
        rest = max(norm2 - float((rs.S.double() ** 2).sum()), 0.0)
        spectrum = torch.cat([rs.S.double(), torch.tensor([math.sqrt(rest)], dtype=torch.float64)])
        rs = rs.truncate(max(1, min(rule.select(spectrum), rs.rank)))
    kept = float((rs.S.double() ** 2).sum())
    err = math.sqrt(max(norm2 - kept, 0.0) / norm2) if norm2 > 0 else 0.0
    out = SVD(rs.U, rs.S, rs.Vh).to_factors(kernel=kernel, kind=kind)
    return MergeResult(out, error=err, best_error=None, info={"rank": rs.rank})


def _finish(inputs: Sequence[LoraFactors], M: torch.Tensor, rule: RankRule | None, seed: int,
            info: dict) -> MergeResult:
    first = inputs[0]
    res = refactor(M, rule or default_rank(inputs), seed=seed, sketch=max(64, 4 * sum(f.rank for f in inputs)),
                   kernel=first.kernel, kind=first.kind)
    return MergeResult(res.factors, res.error, res.best_error, {**res.info, **info})


def _gens(seed: int, n: int, module: str, row0: int) -> list[torch.Generator]:
    return [K.tile_generator(seed, i, module, row0) for i in range(n)]


@register("ties", description="TIES: trim to density, elect sign by mass, disjoint mean; then rank K",
          exact=False, space="delta", paper="https://arxiv.org/abs/2306.01708")
def ties(
    inputs: Sequence[LoraFactors], weights: Sequence[float], *, density: float = 0.2, lam: float = 1.0,
    rank_rule: RankRule | None = None, seed: int = 0,
) -> MergeResult:
    return _trimmed(inputs, weights, density, lam, rank_rule, seed, signed=True)


@register("magnitude_prune", description="keep the top-density fraction of |τ_i| per module, weighted sum",
          exact=False, space="delta")
def magnitude_prune(
    inputs: Sequence[LoraFactors], weights: Sequence[float], *, density: float = 0.2, lam: float = 1.0,
    rank_rule: RankRule | None = None, seed: int = 0,
) -> MergeResult:
    return _trimmed(inputs, weights, density, lam, rank_rule, seed, signed=False)


def _trimmed(
    inputs: Sequence[LoraFactors], weights: Sequence[float], density: float, lam: float,
    rank_rule: RankRule | None, seed: int, *, signed: bool,
) -> MergeResult:
    """Trim every input to its top-``density`` magnitudes, then a plain sum (``signed=False``) or TIES's
    sign election and disjoint mean."""
    check_params(density=density)
    tiles = TaskTiles(inputs, weights)
    t = tiles.thresholds([keep_count(density, tiles.numel)])[:, 0]
    M = merge_dense(tiles, lambda _r0, x: K.trim(x, t), signed=signed, lam=lam)
    return _finish(inputs, M, rule=rank_rule, seed=seed, info={"density": density})


@register("dare_linear", description="DARE: random drop (keep density), rescale by 1/density, weighted sum",
          exact=False, space="delta", paper="https://arxiv.org/abs/2311.03099")
def dare_linear(
    inputs: Sequence[LoraFactors], weights: Sequence[float], *, density: float = 0.5, lam: float = 1.0,
    rank_rule: RankRule | None = None, seed: int = 0, module: str = "",
) -> MergeResult:
    return _dare(inputs, weights, density, lam, rank_rule, seed, module, signed=False)


@register("dare_ties", description="DARE drop and rescale, then TIES sign election and disjoint mean",
          exact=False, space="delta", paper="https://arxiv.org/abs/2311.03099")
def dare_ties(
    inputs: Sequence[LoraFactors], weights: Sequence[float], *, density: float = 0.5, lam: float = 1.0,
    rank_rule: RankRule | None = None, seed: int = 0, module: str = "",
) -> MergeResult:
    return _dare(inputs, weights, density, lam, rank_rule, seed, module, signed=True)


def _dare(
    inputs: Sequence[LoraFactors], weights: Sequence[float], density: float, lam: float,
    rank_rule: RankRule | None, seed: int, module: str, *, signed: bool,
) -> MergeResult:
    """DARE's drop-and-rescale on every input, then a plain sum (``signed=False``) or TIES's election."""
    check_params(density=density)
    tiles = TaskTiles(inputs, weights)
    n = len(inputs)
    M = merge_dense(tiles, lambda r0, x: K.dare(x, density, _gens(seed, n, module, r0)), signed=signed, lam=lam)
    return _finish(inputs, M, rule=rank_rule, seed=seed, info={"density": density})


@register("della", description="DELLA: magnitude-ranked random drop (MAGPRUNE, 1/p rescale), TIES election",
          exact=False, space="delta", paper="https://arxiv.org/abs/2406.11617")
def della(
    inputs: Sequence[LoraFactors], weights: Sequence[float], *, density: float = 0.5, epsilon: float = 0.15,
    lam: float = 1.0, rank_rule: RankRule | None = None, seed: int = 0, module: str = "",
) -> MergeResult:
    check_params(density=density, epsilon=epsilon)
    tiles = TaskTiles(inputs, weights)
    n = len(inputs)
    M = merge_dense(tiles, lambda r0, x: K.della(x, density, epsilon, _gens(seed, n, module, r0)),
                    signed=True, lam=lam)
    return _finish(inputs, M, rule=rank_rule, seed=seed, info={"density": density})


@register("breadcrumbs", description="drop the top-gamma outliers and the small tail, keep density; sum",
          exact=False, space="delta", paper="https://arxiv.org/abs/2312.06795")
def breadcrumbs(
    inputs: Sequence[LoraFactors], weights: Sequence[float], *, density: float = 0.9, gamma: float = 0.01,
    lam: float = 1.0, rank_rule: RankRule | None = None, seed: int = 0,
) -> MergeResult:
    check_params(density=density, gamma=gamma)
    tiles = TaskTiles(inputs, weights)
    n_out = math.floor(gamma * tiles.numel)
    t = tiles.thresholds([n_out, n_out + keep_count(density, tiles.numel)])
    M = merge_dense(tiles, lambda _r0, x: K.band(x, t[:, 1], t[:, 0]), signed=False, lam=lam)
    return _finish(inputs, M, rule=rank_rule, seed=seed, info={"density": density, "gamma": gamma})
