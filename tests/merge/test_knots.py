"""KnOTS and Core Space against dense float64 routes."""

from __future__ import annotations

import pytest
import torch

from lorakit.ops.knots import core_space, knots, merge_stack
from lorakit.testing import random_factors

from . import _ref

F64 = torch.float64


def make(out=20, inn=14, ranks=(3, 4, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [random_factors(out, inn, r, scale=s, generator=g, dtype=F64) for r, s in zip(ranks, (0.5, 2.0, 1.0))]


def dense_knots(fs, ws, density):
    """The KnOTS paper route: SVD of [ΔW_1 … ΔW_n] in float64, τ̃_i = Σ V_iᵀ, TIES there, ΔW = U τ̃_m."""
    deltas = [w * f.delta(F64) for f, w in zip(fs, ws)]
    U, S, Vh = torch.linalg.svd(torch.cat(deltas, dim=1), full_matrices=False)
    keep = int((S > 1e-10 * S[0]).sum())
    U, S, Vh = U[:, :keep], S[:keep], Vh[:keep]
    inn = fs[0].in_features
    aligned = [S.unsqueeze(1) * Vh[:, i * inn:(i + 1) * inn] for i in range(len(fs))]
    return U @ _ref.ties(aligned, density)


@pytest.mark.parametrize("density", [1.0, 0.5, 0.2])
def test_knots_factored_equals_the_dense_route(density):
    fs, ws = make(), [1.0, 0.6, -0.8]
    got = knots(fs, ws, inner="ties", density=density).factors.delta(F64)
    torch.testing.assert_close(got, dense_knots(fs, ws, density), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("fn", [knots, core_space])
def test_linear_inner_merge_is_the_exact_weighted_sum(fn):
    fs, ws = make(), [1.0, 0.6, -0.8]
    got = fn(fs, ws, inner="linear").factors.delta(F64)
    torch.testing.assert_close(got, sum(w * f.delta(F64) for f, w in zip(fs, ws)), rtol=1e-9, atol=1e-11)


def test_core_space_cores_reconstruct_each_input():
    fs = make()
    for i, f in enumerate(fs):  # only input i weighted: the identity merge reconstructs ΔW_i
        ws = [1.0 if j == i else 0.0 for j in range(len(fs))]
        got = core_space(fs, ws, inner="ties", density=1.0).factors.delta(F64)
        torch.testing.assert_close(got, f.delta(F64), rtol=1e-9, atol=1e-11)


def test_core_space_ties_matches_ties_of_the_dense_cores():
    fs, ws = make(), [1.0, 0.6, -0.8]
    Bs = [f.B * (w * f.scale) for f, w in zip(fs, ws)]
    Ub = torch.linalg.svd(torch.cat(Bs, 1), full_matrices=False).U
    VhA = torch.linalg.svd(torch.cat([f.A for f in fs], 0), full_matrices=False).Vh
    cores = [Ub.T @ B @ f.A @ VhA.T for B, f in zip(Bs, fs)]
    want = Ub @ _ref.ties(cores, 0.4) @ VhA
    torch.testing.assert_close(core_space(fs, ws, density=0.4).factors.delta(F64), want, rtol=1e-9, atol=1e-11)


def test_unknown_inner_method_is_refused():
    from lorakit.errors import OperatorParameterError

    with pytest.raises(OperatorParameterError, match="inner"):
        merge_stack(torch.zeros(2, 3, 3), "median", density=1.0, seed=0, module="")
