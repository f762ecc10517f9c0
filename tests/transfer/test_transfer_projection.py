"""Factored subspace projection: invariants against float64 dense references."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.adapter import Adapter, ModuleInfo
from lorakit.errors import ShapeMismatchError
from lorakit.linalg import svd_of
from lorakit.testing import random_factors
from lorakit.transfer.pipeline import project_adapter
from lorakit.transfer.projection import (
    principal_subspace,
    project_factors,
    project_module,
    subspace_similarity,
)

OUT, IN, R = 24, 20, 3


def weight(seed: int, out: int = OUT, inn: int = IN) -> torch.Tensor:
    return torch.randn(out, inn, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def factors(seed: int = 0):
    return random_factors(OUT, IN, R, scale=0.7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def dense_reference(f, Ws, Wt, q, null_space):
    """The module doc's formulas with dense projectors (float64, full SVDs)."""
    Us, _, Vsh = torch.linalg.svd(Ws)
    Ut, _, Vth = torch.linalg.svd(Wt)
    Ps, Pt = Us[:, :q] @ Us[:, :q].T, Ut[:, :q] @ Ut[:, :q].T
    Qs, Qt = Vsh[:q].T @ Vsh[:q], Vth[:q].T @ Vth[:q]
    I_out, I_in = torch.eye(OUT, dtype=torch.float64), torch.eye(IN, dtype=torch.float64)
    B, A = f.B, f.A
    Bt, At = Pt @ Ps @ B, A @ Qs @ Qt
    if null_space:
        Bt = Bt + (I_out - Pt) @ (I_out - Ps) @ B
        At = At + A @ (I_in - Qs) @ (I_in - Qt)
    return f.scale * Bt @ At


@settings(max_examples=20, deadline=None)
@given(q=st.integers(1, min(OUT, IN)), seed=st.integers(0, 10_000))
def test_identical_bases_reproduce_delta_for_any_q_with_null_space(q, seed):
    f, W = factors(seed), weight(seed + 1)
    s = principal_subspace(W, q)
    g = project_factors(f, s, s, null_space=True)
    torch.testing.assert_close(g.delta(torch.float64), f.delta(torch.float64), rtol=1e-10, atol=1e-10)


def test_without_null_space_exact_only_at_full_q():
    # A square base has full-rank subspaces at q = n; a rectangular one's U cannot span all of ΔW's columns.
    f = random_factors(IN, IN, R, scale=0.7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    W = weight(1, IN, IN)
    full = principal_subspace(W, IN)
    g = project_factors(f, full, full, null_space=False)
    torch.testing.assert_close(g.delta(torch.float64), f.delta(torch.float64), rtol=1e-10, atol=1e-10)
    half = principal_subspace(W, 5)
    h = project_factors(f, half, half, null_space=False)
    assert (h.delta(torch.float64) - f.delta(torch.float64)).norm() > 1e-3 * f.norm()


@pytest.mark.parametrize("null_space", [True, False])
@pytest.mark.parametrize("q", [2, 7, 20])
def test_matches_dense_reference(q, null_space):
    f, Ws, Wt = factors(3), weight(4), weight(5)
    ss, st_ = principal_subspace(Ws, q, exact_below=0.0), principal_subspace(Wt, q, exact_below=0.0)
    g = project_factors(f, ss, st_, null_space=null_space)
    torch.testing.assert_close(g.delta(torch.float64), dense_reference(f, Ws, Wt, q, null_space),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("null_space", [True, False])
def test_idempotent_and_rank_bounded(null_space):
    f, Ws, Wt = factors(6), weight(7), weight(8)
    ss, st_ = principal_subspace(Ws, 6), principal_subspace(Wt, 6)
    once = project_factors(f, ss, st_, null_space=null_space)
    twice = project_factors(once, st_, st_, null_space=null_space)
    torch.testing.assert_close(twice.delta(torch.float64), once.delta(torch.float64), rtol=1e-10, atol=1e-10)
    assert once.rank <= f.rank
    assert int((svd_of(once).S > 1e-10 * svd_of(once).S[0]).sum()) <= f.rank


def test_similarity_one_for_identical_and_about_q_over_m_for_random():
    W = weight(9, 200, 200)
    s = principal_subspace(W, 20)
    assert subspace_similarity(s, s) == pytest.approx(1.0, abs=1e-12)
    sims = [subspace_similarity(s, principal_subspace(weight(100 + i, 200, 200), 20)) for i in range(4)]
    assert sum(sims) / len(sims) == pytest.approx(20 / 200, rel=0.3)


def test_randomized_subspace_matches_exact_on_a_gapped_spectrum():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    S = torch.cat([torch.linspace(10, 5, 8), torch.full((192,), 0.01)]).double()
    W = U[:, :200] * S @ V.T
    s = principal_subspace(W, 8)  # 8 < 0.25·200: randomized path
    assert subspace_similarity(s, principal_subspace(W, 8, exact_below=0.0)) == pytest.approx(1.0, abs=1e-6)


def test_adapter_gating_and_report():
    a = Adapter({"m0": factors(1), "m1": factors(2)})
    Ws = {"m0": weight(10), "m1": weight(11)}
    Wt = {"m0": weight(10), "m1": weight(12)}  # m0 identical, m1 unrelated
    out, rep = project_adapter(a, Ws.__getitem__, Wt.__getitem__, q=5, min_similarity=0.9)
    assert list(out) == ["m0"]
    rows = {r[0]: r for r in rep.rows}
    assert rows["m0"][4] == pytest.approx(1.0) and rows["m0"][-1] == "projected"
    assert rows["m1"][-1].startswith("skipped") and rows["m1"][4] < 0.9
    torch.testing.assert_close(out["m0"].delta(torch.float64), a["m0"].delta(torch.float64))


def test_each_module_is_read_ahead_in_the_background_and_projected_alone():
    import threading

    reads: list[str] = []

    def read(n: str):
        reads.append(threading.current_thread().name)
        return factors(int(n[1:]) + 1)

    infos = {n: ModuleInfo.of(n, factors(1)) for n in ("m0", "m1")}
    a = Adapter({n: partial(read, n) for n in infos}, infos=infos)
    Ws = {"m0": weight(10), "m1": weight(11)}
    out, rep = project_adapter(a, Ws.__getitem__, Ws.__getitem__, q=5)
    assert len(reads) == 2 and all(t.startswith("lorakit-read") for t in reads)
    for n in infos:
        g, row = project_module(n, a[n], Ws.__getitem__, Ws.__getitem__, q=5)
        assert g is not None and row in rep.rows
        torch.testing.assert_close(out[n].delta(torch.float64), g.delta(torch.float64), rtol=0, atol=0)


def test_shape_mismatch_is_refused():
    a = Adapter({"m0": factors(1)})
    with pytest.raises(ShapeMismatchError, match="same-shape bases"):
        project_adapter(a, {"m0": weight(1)}.__getitem__, {"m0": weight(2, OUT, IN + 4)}.__getitem__)
