"""Float64 dense references written straight from the papers' formulas (no lorakit kernels)."""

from __future__ import annotations

import math

import torch


def top_k_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k largest |x| (ties at the threshold kept), by a full sort."""
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    t = torch.sort(x.abs().reshape(-1), descending=True).values[min(k, x.numel()) - 1]
    return x.abs() >= t


def ties(taus: list[torch.Tensor], density: float) -> torch.Tensor:
    k = max(1, math.floor(density * taus[0].numel()))
    trimmed = torch.stack([t * top_k_mask(t, k) for t in taus])
    gamma = torch.sign(trimmed.sum(0))
    majority = 1.0 if float(gamma.sum()) >= 0 else -1.0
    gamma = torch.where(gamma == 0, torch.full_like(gamma, majority), gamma)
    out = torch.zeros_like(taus[0])
    count = torch.zeros_like(taus[0])
    for t in trimmed:
        agree = (torch.sign(t) == gamma) & (t != 0)
        out += torch.where(agree, t, 0.0)
        count += agree.double()
    return out / count.clamp_min(1)


def _disjoint(stack: torch.Tensor) -> torch.Tensor:
    gamma = torch.sign(stack.sum(0))
    majority = 1.0 if float(gamma.sum()) >= 0 else -1.0
    gamma = torch.where(gamma == 0, torch.full_like(gamma, majority), gamma)
    agree = (torch.sign(stack) == gamma) & (stack != 0)
    return torch.where(agree, stack, 0.0).sum(0) / agree.sum(0).clamp_min(1)


def magnitude_prune(taus: list[torch.Tensor], density: float) -> torch.Tensor:
    k = max(1, math.floor(density * taus[0].numel()))
    return sum(t * top_k_mask(t, k) for t in taus)


def breadcrumbs(taus: list[torch.Tensor], density: float, gamma: float) -> torch.Tensor:
    n = taus[0].numel()
    top = math.floor(gamma * n)
    keep = max(1, math.floor(density * n))
    return sum(t * (top_k_mask(t, top + keep) & ~top_k_mask(t, top)) for t in taus)


def svd_truncate(M: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]
