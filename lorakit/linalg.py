"""The numerical core: exact SVD of low-rank sums without dense matrices, and the randomized SVD.

Everything here is device-agnostic (CPU or CUDA, same code), computes in float32 or wider whatever the stored
dtype, and accepts leading batch dimensions (modules of equal shape stacked) wherever torch.linalg does.

Factored SVD (QR-core). For ΔW = Σ_i s_i·B_i @ A_i with total rank R = Σ r_i::

    B_cat = [s_1·B_1, …, s_n·B_n]   (out, R)        A_cat = [A_1; …; A_n]   (R, in)
    B_cat = Q_B R_B,  A_catᵀ = Q_A R_A                 (reduced QR)
    R_B R_Aᵀ = U_c Σ V_cᵀ                              (small core: ≤ R×R)
    ΔW = (Q_B U_c) Σ (Q_A V_c)ᵀ                        (exact thin SVD)

Cost O((out + in)·R² + R³) instead of O(out·in·min(out, in)) for a dense SVD; memory O((out + in)·R).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lorakit.device import HostMemoryTrimmer, to_device
from lorakit.errors import NumericalError, RankError
from lorakit.factors import LoraFactors

if TYPE_CHECKING:
    from lorakit.adapter import Adapter, ModuleInfo


def compute_dtype(*tensors: torch.Tensor, at_least: torch.dtype = torch.float32) -> torch.dtype:
    """float32, or float64 if any input is float64 (fp16/bf16 SVDs fail or lose accuracy)."""
    dt = at_least
    for t in tensors:
        if t.dtype == torch.float64:
            dt = torch.float64
    return dt


def widest_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The floating dtype with the most bits among ``dtypes``."""
    return max(dtypes, key=lambda d: torch.finfo(d).bits)


@dataclass(frozen=True)
class SVD:
    """A thin SVD ``M = U @ diag(S) @ Vh``; ``U (…, out, k)``, ``S (…, k)`` descending, ``Vh (…, k, in)``."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.S.shape[-1])

    def truncate(self, k: int) -> SVD:
        """The best rank-``k`` approximation (Eckart–Young); ``k`` ≥ rank returns ``self``."""
        if k >= self.rank:
            return self
        return SVD(self.U[..., :k], self.S[..., :k], self.Vh[..., :k, :])

    def energy(self) -> torch.Tensor:
        """Σσ², i.e. ‖M‖_F²."""
        return (self.S.double() ** 2).sum(-1)

    def tail_error(self, k: int) -> float:
        """Relative Frobenius error of the rank-``k`` truncation: sqrt(Σ_{i>k} σ_i² / Σ σ_i²)."""
        return tail_error(self.S, k)

    def to_factors(self, dtype: torch.dtype | None = None, **extras: object) -> LoraFactors:
        """LoRA factors with singular values folded evenly: ``B = U·√S``, ``A = √S·Vh``, scale 1."""
        root = self.S.clamp_min(0).sqrt()
        B = self.U * root.unsqueeze(-2)
        A = root.unsqueeze(-1) * self.Vh
        if dtype is not None:
            A, B = A.to(dtype), B.to(dtype)
        return LoraFactors(A, B, 1.0, **extras)  # type: ignore[arg-type]

    def dense(self) -> torch.Tensor:
        return (self.U * self.S.unsqueeze(-2)) @ self.Vh


def tail_error(S: torch.Tensor, k: int) -> float:
    """sqrt(Σ_{i>k} σ_i² / Σ σ_i²) for one descending spectrum ``S``: the relative error of keeping ``k``."""
    s2 = S.double() ** 2
    total = float(s2.sum())
    return math.sqrt(float(s2[k:].sum()) / total) if total > 0 else 0.0


def fix_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair ``(u_j, v_j)`` so that the largest-magnitude entry of ``u_j`` is positive.

    Singular vectors are defined up to a joint sign; fixing it makes the canonical form reproducible
    (resizing a canonical adapter returns the same factors, not sign-flipped ones). Batched; O(out·k).
    """
    if U.shape[-1] == 0:
        return U, Vh
    idx = U.abs().argmax(dim=-2, keepdim=True)  # (…, 1, k)
    sign = torch.gather(U, -2, idx).sign()
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return U * sign, Vh * sign.transpose(-1, -2)


@contextmanager
def lapack_one_thread(x: torch.Tensor) -> Iterator[None]:
    """Run the enclosed LAPACK call (thin QR, small SVD) in one CPU thread.

    A Householder QR of a tall-skinny ``(14336, 32)`` matrix synchronises its threads once per column panel;
    with two threads it measured 7-35× slower than with one on a 2-core machine (330 ms against 9.5 ms when the
    cores were busy), and never faster. Toggling the pool size costs under a microsecond. CUDA tensors are left
    alone.
    """
    n = torch.get_num_threads()
    if n == 1 or x.device.type != "cpu":
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _qr(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with lapack_one_thread(x):
        return torch.linalg.qr(x, mode="reduced")


def _svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with lapack_one_thread(x):
        return torch.linalg.svd(x, full_matrices=False)


def core_svd(
    Bs: Sequence[torch.Tensor] | torch.Tensor,
    As: Sequence[torch.Tensor] | torch.Tensor,
    scales: Sequence[float] | None = None,
    *,
    dtype: torch.dtype | None = None,
    storage_dtype: torch.dtype | None = None,
) -> CoreSVD:
    """The exact SVD of ``Σ_i scales[i]·Bs[i] @ As[i]`` up to its rotations (see the module docstring).

    Does the two QRs and the small core SVD: O((out + in)·R² + R³). The singular values are then exact
    and complete; :meth:`CoreSVD.leading` forms the singular vectors of as many leading triplets as the caller
    keeps.

    Args:
        Bs: up factors ``(…, out, r_i)`` (or one tensor).
        As: down factors ``(…, r_i, in)`` (or one tensor).
        scales: one scale per term (default 1).
        dtype: compute dtype (default float32, float64 if an input is float64).
        storage_dtype: the dtype the result will be stored in (default: the widest input's). For 16-bit
            storage, the core SVD and the rotations run in the compute dtype instead of float64, because
            float32's ~1e-6 relative error is 4000× below bf16's rounding, and float64 rotations cost twice the
            QRs on CPU.
    """
    if isinstance(Bs, torch.Tensor):
        Bs, As = [Bs], [As]  # type: ignore[list-item]
    scales = list(scales) if scales is not None else [1.0] * len(Bs)
    dt = dtype or compute_dtype(*Bs, *As)  # type: ignore[arg-type]
    storage_dtype = storage_dtype or widest_dtype(t.dtype for t in (*Bs, *As))  # type: ignore[union-attr]
    B = _concat([b.to(dt) if s == 1.0 else b.to(dt) * s for b, s in zip(Bs, scales)], dim=-1)
    A = _concat([a.to(dt) for a in As], dim=-2)
    wide = dt if torch.finfo(storage_dtype).bits <= 16 else torch.float64
    if B.shape[-1] == 0:  # an empty module: an empty spectrum, no triplets
        square = B.new_zeros((*B.shape[:-2], 0, 0), dtype=wide)
        S = B.new_zeros((*B.shape[:-2], 0), dtype=wide)
        return CoreSVD(B, square, S, square, A.transpose(-1, -2), dt, wide)
    Qb, Rb = _qr(B)
    Qa, Ra = _qr(A.transpose(-1, -2))
    # The core (≤ R×R) is decomposed in float64 (the compute dtype for 16-bit storage, as the rotations):
    # negligible cost next to the QRs while R is small, 15% of a merge of 8 rank-64 adapters (R = 512).
    core = Rb.to(wide) @ Ra.to(wide).transpose(-1, -2)
    try:
        Uc, S, Vhc = _svd(core)
    except torch.linalg.LinAlgError as e:  # raised for NaN/Inf on some backends
        raise NumericalError("non-finite values in the factors") from e
    if not bool(torch.isfinite(S).all()):  # NaN/Inf anywhere in the factors reaches the core's spectrum
        raise NumericalError("non-finite values in the factors")
    return CoreSVD(Qb, Uc, S, Vhc, Qa, dt, wide)


def _concat(ts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim=dim)


@dataclass(frozen=True)
class CoreSVD:
    """An exact thin SVD held before its rotations: ``M = (Q_B U_c) diag(S) (V_cᵀ Q_Aᵀ)``.

    ``S`` (descending) is complete. The rotations ``Q_B U_c`` and ``V_cᵀ Q_Aᵀ``, O((out + in)·R·k),
    are the largest cost of the factored SVD (float64 on CPU, twice the QRs), so :meth:`leading` forms them for
    the ``k`` leading triplets a caller keeps: merging 8 rank-16 adapters to rank 16 rotates 16 columns, not 128.
    """

    Qb: torch.Tensor  # (…, out, R)
    Uc: torch.Tensor  # (…, R, R) in core_dtype
    S: torch.Tensor  # (…, R) in core_dtype
    Vhc: torch.Tensor  # (…, R, R) in core_dtype
    Qa: torch.Tensor  # (…, in, R)
    dtype: torch.dtype  # the result's dtype (the compute dtype)
    core_dtype: torch.dtype  # of the core SVD and the rotations: float64, or the compute dtype for 16-bit results

    @property
    def rank(self) -> int:
        return int(self.S.shape[-1])

    def tail_error(self, k: int) -> float:
        """Relative Frobenius error of the rank-``k`` truncation (see :meth:`SVD.tail_error`)."""
        return tail_error(self.S, k)

    def __getitem__(self, i: int) -> CoreSVD:
        """The ``i``-th module of a batched core (views)."""
        return CoreSVD(self.Qb[i], self.Uc[i], self.S[i], self.Vhc[i], self.Qa[i], self.dtype, self.core_dtype)

    def leading(self, k: int | None = None) -> SVD:
        """The thin SVD restricted to the leading ``k`` triplets (all of them by default), signs fixed."""
        k = self.rank if k is None else min(k, self.rank)
        wide = self.core_dtype
        U = (self.Qb.to(wide) @ self.Uc[..., :k].to(wide)).to(self.dtype)
        Vh = (self.Vhc[..., :k, :].to(wide) @ self.Qa.to(wide).transpose(-1, -2)).to(self.dtype)
        U, Vh = fix_signs(U, Vh)
        return SVD(U, self.S[..., :k].to(self.dtype), Vh)


def factored_svd(
    Bs: Sequence[torch.Tensor] | torch.Tensor,
    As: Sequence[torch.Tensor] | torch.Tensor,
    scales: Sequence[float] | None = None,
    *,
    dtype: torch.dtype | None = None,
    storage_dtype: torch.dtype | None = None,
) -> SVD:
    """Exact thin SVD of ``Σ_i scales[i]·Bs[i] @ As[i]`` by the QR-core construction (see module docstring).

    ``core_svd(…).leading()``: every triplet, of rank ``min(out, in, R)``; zero singular values are kept
    (truncate to drop them). Arguments as for :func:`core_svd`.
    """
    return core_svd(Bs, As, scales, dtype=dtype, storage_dtype=storage_dtype).leading()


def svd_of(f: LoraFactors, *, dtype: torch.dtype | None = None) -> SVD:
    """Exact thin SVD of one module's ``scale·B @ A`` (flattened)."""
    return factored_svd([f.B], [f.A], [f.scale], dtype=dtype)


def canonical(f: LoraFactors, *, dtype: torch.dtype | None = None, drop_zeros: bool = False) -> LoraFactors:
    """The canonical SVD form of a module: orthogonal columns of B and rows of A, ``B = U√S``, ``A = √S Vᵀ``,
    scale 1, same ΔW. With ``drop_zeros``, directions with σ ≤ eps·σ_max are removed (exact up to rounding).

    Units (rank-1 pairs) of this form do not depend on the arbitrary basis of the training run.
    """
    svd = svd_of(f, dtype=dtype)
    if drop_zeros and svd.rank:
        tol = float(svd.S[0]) * torch.finfo(svd.S.dtype).eps * max(f.shape)
        svd = svd.truncate(max(1, int((svd.S > tol).sum())))
    out = svd.to_factors(dtype=f.dtype if dtype is None else dtype)
    return out.with_(kernel=f.kernel, kind=f.kind, magnitude=f.magnitude, extras=f.extras)


def check_rank(rank: int, shape: tuple[int, int], *, module: str | None = None) -> None:
    """Raise :class:`RankError` unless ``1 ≤ rank ≤ min(out, in)``."""
    if rank < 1 or rank > min(shape):
        raise RankError(f"rank {rank} is outside [1, {min(shape)}] for a {shape[0]}x{shape[1]} layer", module=module)


# ---- randomized SVD ---------------------------------------------------------------------------------------
MatMul = Callable[[torch.Tensor], torch.Tensor]


def randomized_svd(
    M: torch.Tensor | None = None,
    rank: int = 16,
    *,
    matmul: MatMul | None = None,
    rmatmul: MatMul | None = None,
    shape: tuple[int, int] | None = None,
    oversample: int = 10,
    n_iter: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> SVD:
    """Randomized SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1) of a dense ``M`` or an implicit operator.

    Range finder on ``rank + oversample`` Gaussian probes with ``n_iter`` power iterations (re-orthonormalised
    each step), then an exact SVD of the small projection.

    Args:
        M: the dense matrix ``(out, in)``; or give ``matmul(X) = M @ X``, ``rmatmul(Y) = Mᵀ @ Y`` and ``shape``.
        rank: number of singular triplets returned.
        seed: the Gaussian probes' seed (results are reproducible).

    Cost: O(out·in·(rank + oversample)·(2·n_iter + 2)) for dense ``M``; memory O((out + in)·(rank + p)).
    """
    if M is not None:
        M = M.to(dtype)
        shape = (M.shape[0], M.shape[1])
        matmul = M.__matmul__
        rmatmul = lambda Y: M.T @ Y
        device = M.device
    assert matmul is not None and rmatmul is not None and shape is not None
    out, inn = shape
    k = min(rank + oversample, out, inn)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(inn, k, generator=gen, dtype=dtype).to(device)
    Q, _ = _qr(matmul(omega))
    for _ in range(n_iter):
        Z, _ = _qr(rmatmul(Q))
        Q, _ = _qr(matmul(Z))
    Bt = rmatmul(Q)  # (in, k) = (Qᵀ M)ᵀ
    Ub, S, Vh = _svd(Bt.T)
    r = min(rank, S.shape[-1])
    U, Vh = fix_signs((Q @ Ub)[:, :r], Vh[:r])
    return SVD(U, S[:r], Vh)


# ---- batched factored SVD over an adapter's modules -------------------------------------------------------
ShapeKey = tuple[int, int, int]  # (out, in, rank) of the flattened ΔW


def group_by_shape(infos: Mapping[str, ModuleInfo | Sequence[ModuleInfo]]) -> dict[ShapeKey, list[str]]:
    """Module names grouped by ``(out, in, rank)``, in first-seen order: the groups :func:`adapter_svds` batches.

    A value may also be a sequence of infos (one module across several adapters, as a merge sees it): the key is
    then the tuple of every input's ``(out, in, rank)``, so a group stacks into one tensor per input.
    """
    groups: dict = {}
    for name, info in infos.items():
        key = (tuple((i.out_features, i.in_features, i.rank) for i in info) if isinstance(info, Sequence)
               else (info.out_features, info.in_features, info.rank))
        groups.setdefault(key, []).append(name)
    return groups


def default_window_bytes(device: torch.device | str) -> int:
    """Float32 bytes of factors a streaming loop batches by default: 512 MiB on CUDA, where one batched QR/SVD
    launch replaces hundreds of small ones; 1 (one module at a time) on CPU, where batching measured no gain and
    memory stays at one module's working set."""
    return (512 << 20) if torch.device(device).type == "cuda" else 1


def next_window(order: Sequence[str], start: int, nbytes: Callable[[str], int], limit: int,
                done: Container[str], max_names: int = 0) -> list[str]:
    """``order[start]``, then the names after it that are not ``done``, until ``limit`` bytes are taken, or, with
    ``max_names``, until that many names are (``limit`` then unused).

    The window a streaming loop computes when a writer asks for ``order[start]``; always that name first, so a
    module asked for twice is computed again rather than lost.
    """
    names, size = [order[start]], nbytes(order[start])
    for n in order[start + 1:]:
        if (len(names) >= max_names) if max_names else (size >= limit):
            break
        if n not in done:
            names.append(n)
            size += nbytes(n)
    return names


def _stacked_batches(
    adapter: Adapter, names: Sequence[str] | None, device: torch.device | str | None, dtype: torch.dtype | None,
    max_batch_bytes: int,
) -> Iterator[tuple[list[str], list[LoraFactors], torch.Tensor, torch.Tensor, tuple[int, int]]]:
    """Same-shaped modules stacked: ``(names, factors, B (n, out, r) scale folded in, A (n, r, in), (out, in))``."""
    infos = adapter.infos()
    wanted = list(adapter) if names is None else list(names)
    dev = torch.device("cpu") if device is None else torch.device(device)
    trimmer = HostMemoryTrimmer()
    for (out, inn, r), group in group_by_shape({n: infos[n] for n in wanted}).items():
        dt = dtype or (torch.float64 if any(infos[n].dtype == torch.float64 for n in group) else torch.float32)
        # the QRs and the rotations hold a few copies of the stacked factors
        per_module = max(1, 4 * (out + inn) * max(r, 1) * torch.finfo(dt).bits // 8)
        step = max(1, max_batch_bytes // per_module)
        for start in range(0, len(group), step):
            chunk = group[start:start + step]
            fs = [adapter[n] for n in chunk]
            B = to_device(torch.stack([f.B.to(dt) * f.scale for f in fs]), dev)
            A = to_device(torch.stack([f.A.to(dt) for f in fs]), dev)
            yield chunk, fs, B, A, (out, inn)
            trimmer.processed(per_module * len(chunk))


def adapter_cores(
    adapter: Adapter,
    names: Sequence[str] | None = None,
    *,
    device: torch.device | str | None = "cpu",
    dtype: torch.dtype | None = None,
    max_batch_bytes: int = 64 << 20,
) -> Iterator[tuple[str, CoreSVD, LoraFactors]]:
    """Every module's :class:`CoreSVD` of ``scale·B @ A`` and its factors as read, batched over modules of the
    same shape.

    Modules with equal ``(out, in, rank)`` are stacked (``B (n, out, r)``, ``A (n, r, in)``, scale folded into B)
    and go through one batched :func:`core_svd` on ``device``; batches are cut so that the work stays under
    about ``max_batch_bytes``. Results are yielded grouped by shape (groups in first-seen order, ``names``
    order within a group), one module at a time, so memory stays at one batch; each core stays on ``device``
    and its :meth:`~CoreSVD.leading` triplets are formed only for what the caller keeps.

    Cost: O((out + in)·r² + r³) per module, no dense ΔW.
    """
    for chunk, fs, B, A, (out, inn) in _stacked_batches(adapter, names, device, dtype, max_batch_bytes):
        core = core_svd(B, A, dtype=B.dtype, storage_dtype=widest_dtype(f.dtype for f in fs))
        del B, A
        for i, (n, f) in enumerate(zip(chunk, fs)):
            yield n, core[i], f


def adapter_svds(
    adapter: Adapter,
    names: Sequence[str] | None = None,
    *,
    device: torch.device | str | None = "cpu",
    dtype: torch.dtype | None = None,
    max_batch_bytes: int = 64 << 20,
) -> Iterator[tuple[str, SVD]]:
    """Exact thin SVDs (every triplet, on CPU) of every module's ``scale·B @ A``: :func:`adapter_cores`, rotated."""
    for name, core, _ in adapter_cores(adapter, names, device=device, dtype=dtype, max_batch_bytes=max_batch_bytes):
        svd = core.leading()
        yield name, SVD(svd.U.cpu(), svd.S.cpu(), svd.Vh.cpu())


def adapter_spectra(
    adapter: Adapter,
    names: Sequence[str] | None = None,
    *,
    device: torch.device | str | None = "cpu",
    max_batch_bytes: int = 64 << 20,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Singular values only (float64, descending) of every module's ``scale·B @ A``, batched like
    :func:`adapter_svds` but without forming the singular vectors: σ(ΔW) = σ(R_B R_Aᵀ)."""
    for chunk, _, B, A, _ in _stacked_batches(adapter, names, device, None, max_batch_bytes):
        if B.shape[-1] == 0:
            for n in chunk:
                yield n, torch.zeros(0, dtype=torch.float64)
            continue
        Rb = torch.linalg.qr(B, mode="r")[1]
        Ra = torch.linalg.qr(A.transpose(-1, -2), mode="r")[1]
        S = torch.linalg.svdvals(Rb.double() @ Ra.double().transpose(-1, -2)).cpu()
        for i, n in enumerate(chunk):
            yield n, S[i]


def effective_rank(S: torch.Tensor) -> float:
    """Roy–Vetterli effective rank ``exp(H(p))`` with ``p_j = σ_j / Σσ`` (1 for a rank-1 spectrum, 0 if empty)."""
    s = S.double().clamp_min(0)
    total = float(s.sum())
    if total == 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))
