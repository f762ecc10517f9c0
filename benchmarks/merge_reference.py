"""Float64 dense references of lorakit's merge methods, written straight from the papers' formulas.

Each function takes the dense weighted task vectors ``τ_i = w_i·ΔW_i`` (float64, ``(out, in)``) and returns the
dense merged ``ΔW`` (before any truncation, unless the method itself truncates). No lorakit kernels, no factored
tricks: full-size SVDs and sorts. Used by the tests (``tests/merge``) and by ``benchmarks.merge_quality``, which
evaluates each reference beside lorakit's result.
"""

from __future__ import annotations

import math

import torch


def top_k_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k largest |x| (ties at the threshold kept), by a full sort."""
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    t = torch.sort(x.abs().reshape(-1), descending=True).values[min(k, x.numel()) - 1]
    return x.abs() >= t


def _disjoint(stack: torch.Tensor) -> torch.Tensor:
    """TIES's election (sign of the sum, zeros take the overall majority) and disjoint mean."""
    gamma = torch.sign(stack.sum(0))
    majority = 1.0 if float(gamma.sum()) >= 0 else -1.0
    gamma = torch.where(gamma == 0, torch.full_like(gamma, majority), gamma)
    agree = (torch.sign(stack) == gamma) & (stack != 0)
    return torch.where(agree, stack, 0.0).sum(0) / agree.sum(0).clamp_min(1)


def ties(taus: list[torch.Tensor], density: float) -> torch.Tensor:
    k = max(1, math.floor(density * taus[0].numel()))
    return _disjoint(torch.stack([t * top_k_mask(t, k) for t in taus]))


def magnitude_prune(taus: list[torch.Tensor], density: float) -> torch.Tensor:
    k = max(1, math.floor(density * taus[0].numel()))
    return sum(t * top_k_mask(t, k) for t in taus)


def breadcrumbs(taus: list[torch.Tensor], density: float, gamma: float) -> torch.Tensor:
    n = taus[0].numel()
    top = math.floor(gamma * n)
    keep = max(1, math.floor(density * n))
    return sum(t * (top_k_mask(t, top + keep) & ~top_k_mask(t, top)) for t in taus)


def task_arithmetic(taus: list[torch.Tensor]) -> torch.Tensor:
    return sum(taus)


def svd_truncate(M: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def _svd(M: torch.Tensor, tol: float = 1e-10):
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    keep = int((S > S[0] * tol).sum()) if float(S[0]) > 0 else 0
    return U[:, :keep], S[:keep], Vh[:keep]


def _polar(X: torch.Tensor) -> torch.Tensor:
    P, _, Qh = torch.linalg.svd(X, full_matrices=False)
    return P @ Qh


def tsv(taus: list[torch.Tensor], ks: list[int]) -> torch.Tensor:
    """TSV-M: task i keeps its top ``ks[i]`` triplets; U and V concatenated and replaced by their polar factors."""
    parts = [torch.linalg.svd(t, full_matrices=False) for t in taus]
    U = torch.cat([u[:, :k] for (u, _, _), k in zip(parts, ks)], dim=1)
    S = torch.cat([s[:k] for (_, s, _), k in zip(parts, ks)])
    V = torch.cat([vh[:k].T for (_, _, vh), k in zip(parts, ks)], dim=1)
    return _polar(U) @ torch.diag(S) @ _polar(V).T


def iso_c(taus: list[torch.Tensor], k: int | None = None) -> torch.Tensor:
    """Iso-C on the sum's nonzero spectrum (its top ``k`` when given): ``mean(σ)·U Vᵀ``."""
    U, S, Vh = _svd(sum(taus))
    k = S.numel() if k is None else min(k, S.numel())
    return S[:k].mean() * (U[:, :k] @ Vh[:k])


def iso_cts(taus: list[torch.Tensor], K: int, k_common: int, per_task: int) -> torch.Tensor:
    """Iso-CTS with the common subspace of size ``k_common`` and ``per_task`` directions per task."""
    U, S, Vh = torch.linalg.svd(sum(taus), full_matrices=False)
    Uc, Sc, Vc = U[:, :k_common], S[:k_common], Vh[:k_common].T
    Us, Ss, Vs = [Uc], [Sc], [Vc]
    for t in taus:
        u, s, vh = torch.linalg.svd(t - Uc @ (Uc.T @ t), full_matrices=False)
        Us.append(u[:, :per_task])
        Ss.append(s[:per_task])
        Vs.append(vh[:per_task].T)
    S_all = torch.cat(Ss)
    return S_all.mean() * (_polar(torch.cat(Us, 1)) @ _polar(torch.cat(Vs, 1)).T)


def knots(taus: list[torch.Tensor], inner) -> torch.Tensor:
    """KnOTS: SVD of ``[τ_1 … τ_n]`` (out × n·in), ``τ̃_i = Σ V_iᵀ``, merged by ``inner`` (a list of ``(ρ, in)``
    → ``(ρ, in)``), ``ΔW = U τ̃_m``."""
    n_in = taus[0].shape[1]
    U, S, Vh = _svd(torch.cat(taus, dim=1))
    aligned = [S.unsqueeze(1) * Vh[:, i * n_in:(i + 1) * n_in] for i in range(len(taus))]
    return U @ inner(aligned)


def core_space(Bs: list[torch.Tensor], As: list[torch.Tensor], inner) -> torch.Tensor:
    """Core Space: ``U_B`` of ``[B_1 … B_n]`` (weighted, scaled), ``V_A`` of ``[A_1; …]``; cores
    ``U_Bᵀ B_i A_i V_A`` merged by ``inner``; ``ΔW = U_B M V_Aᵀ``."""
    Ub, _, _ = torch.linalg.svd(torch.cat(Bs, 1).double(), full_matrices=False)
    _, _, VhA = torch.linalg.svd(torch.cat(As, 0).double(), full_matrices=False)
    cores = [Ub.T @ B.double() @ A.double() @ VhA.T for B, A in zip(Bs, As)]
    return Ub @ inner(cores) @ VhA
