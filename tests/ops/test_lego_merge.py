"""LoRA-LEGO: the invariants of algorithms.md §1.5 and §6 against float64 dense references, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.adapter import cat
from lorakit.errors import IncompatibleAdaptersError, OperatorParameterError, RankError, ShapeMismatchError
from lorakit.factors import LoraFactors
from lorakit.ops import registry
from lorakit.ops.lego import extract_units, lego_module
from lorakit.ops.rank_rules import rank_rule
from lorakit.testing import assert_adapters_close, random_adapter, random_factors
from lorakit.verbs.lego import lego_merge

SHAPES = {"q": (24, 16), "down": (12, 30)}
F64 = torch.float64


def adapters(n=3, rank=4, seed=0, shapes=SHAPES):
    ranks = [rank] * n if isinstance(rank, int) else rank
    return [random_adapter(shapes, r, scale=0.5 + i, seed=seed + i, dtype=F64) for i, r in enumerate(ranks)]


def dense_sum(ads, weights, name):
    return sum(w * a[name].delta(F64) for a, w in zip(ads, weights))


def permuted(f: LoraFactors, perm: torch.Tensor) -> LoraFactors:
    return f.with_(A=f.A[perm], B=f.B[:, perm])


@pytest.mark.parametrize("gauge", ["canonical", "raw"])
def test_k_equal_total_units_without_reweighting_is_exact_cat(gauge):
    ads = adapters(rank=[3, 5, 2])
    weights = [1.0, -0.7, 2.5]
    merged, asg = lego_merge(ads, weights, k=10, gauge=gauge, param_reweight=False, output_reweight=False)
    for n in SHAPES:
        torch.testing.assert_close(merged[n].delta(F64), dense_sum(ads, weights, n), rtol=1e-12, atol=1e-12)
        assert asg[n].error < 1e-12 and asg[n].best_error == 0.0
        assert sorted(asg[n].sizes.tolist()) == [1] * 10
    assert_adapters_close(merged, cat(ads, weights), rtol=1e-10, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(
    ranks=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    weights=st.lists(st.floats(-2, 2).filter(lambda w: abs(w) > 1e-3), min_size=3, max_size=3),
    seed=st.integers(0, 10_000),
)
def test_pool_of_units_sums_to_the_weighted_sum(ranks, weights, seed):
    """Concatenation–summation equivalence: the pooled units of all inputs form a LoRA whose ΔW is the sum."""
    g = torch.Generator().manual_seed(seed)
    fs = [random_factors(9, 7, r, scale=0.3 * (i + 1), generator=g, dtype=F64) for i, r in enumerate(ranks)]
    ws = weights[: len(fs)]
    for gauge in ("canonical", "raw"):
        u = extract_units(fs, ws, gauge=gauge)
        assert u.count == sum(ranks)
        ref = sum(w * f.delta(F64) for f, w in zip(fs, ws))
        torch.testing.assert_close(u.B @ u.A, ref, rtol=1e-10, atol=1e-12)


def test_inputs_merge_like_their_concatenation():
    """Units of several adapters clustered = the units of their concatenation clustered (equal scales)."""
    g = torch.Generator().manual_seed(7)
    a, b = (random_factors(20, 14, 4, scale=0.25, generator=g, dtype=F64) for _ in range(2))
    ab = LoraFactors(torch.cat([a.A, b.A]), torch.cat([a.B, b.B], 1), 0.25)
    opts = {"rank_rule": rank_rule(rank=3), "gauge": "raw", "output_reweight": False, "seed": 4}
    two, asg2 = lego_module([a, b], [1.0, 1.0], **opts)
    one, asg1 = lego_module([ab], [1.0], **opts)
    torch.testing.assert_close(two.delta(F64), one.delta(F64), rtol=1e-12, atol=1e-12)
    assert torch.equal(torch.cat(asg2.labels), asg1.labels[0])
    # canonical gauge = raw clustering of the canonical pool
    u = extract_units([a, b], [1.0, 1.0], gauge="canonical")
    canon, _ = lego_module([a, b], [1.0, 1.0], **{**opts, "gauge": "canonical"})
    pooled, _ = lego_module([LoraFactors(u.A, u.B, 1.0)], [1.0], **opts)
    torch.testing.assert_close(canon.delta(F64), pooled.delta(F64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gauge", ["canonical", "raw"])
def test_permuting_units_of_an_input_and_the_inputs_leaves_the_result(gauge):
    ads = adapters(rank=[4, 6, 3])
    base, asg = lego_merge(ads, [1.0, 0.5, 2.0], k=5, gauge=gauge, seed=3)
    g = torch.Generator().manual_seed(1)
    perms = [torch.randperm(a["q"].rank, generator=g) for a in ads]
    shuffled = [a.map(lambda _n, f, p=p: permuted(f, p)) for a, p in zip(ads, perms)]
    again, asg2 = lego_merge(shuffled, [1.0, 0.5, 2.0], k=5, gauge=gauge, seed=3)
    assert_adapters_close(base, again, rtol=1e-9, atol=1e-12)
    if gauge == "raw":  # raw units are the stored ranks: the labels follow the permutation
        for lab, lab2, p in zip(asg["q"].labels, asg2["q"].labels, perms):
            assert torch.equal(lab[p], lab2)
    reordered, _ = lego_merge(ads[::-1], [2.0, 0.5, 1.0], k=5, gauge=gauge, seed=3)
    assert_adapters_close(base, reordered, rtol=1e-9, atol=1e-12)


def test_canonical_gauge_ignores_the_training_basis_raw_does_not():
    ads = adapters(n=2, rank=4)
    g = torch.Generator().manual_seed(2)

    def regauge(f):
        G = torch.randn(f.rank, f.rank, generator=g, dtype=F64) + 3 * torch.eye(f.rank, dtype=F64)
        return f.with_(A=torch.linalg.solve(G, f.A), B=f.B @ G)

    moved = [a.map(lambda _n, f: regauge(f)) for a in ads]
    for n in SHAPES:  # same ΔW
        torch.testing.assert_close(moved[0][n].delta(F64), ads[0][n].delta(F64))
    c1, _ = lego_merge(ads, k=3, gauge="canonical")
    c2, _ = lego_merge(moved, k=3, gauge="canonical")
    assert_adapters_close(c1, c2, rtol=1e-8, atol=1e-12)
    r1, _ = lego_merge(ads, k=3, gauge="raw")
    r2, _ = lego_merge(moved, k=3, gauge="raw")
    assert not torch.allclose(r1["q"].delta(F64), r2["q"].delta(F64), rtol=1e-3)
    assert registry.resolve("lego").exact is False and registry.resolve("lego").space == "factors"


def test_seed_reproducible_bitwise():
    ads = adapters(rank=6)
    a, asg_a = lego_merge(ads, k=4, seed=9)
    b, asg_b = lego_merge(ads, k=4, seed=9)
    for n in SHAPES:
        assert torch.equal(a[n].A, b[n].A) and torch.equal(a[n].B, b[n].B)
        assert all(torch.equal(x, y) for x, y in zip(asg_a[n].labels, asg_b[n].labels))


def test_parameter_reweighting_sets_centroid_norm_to_mean_member_norm():
    ads = adapters(rank=5)
    merged, asg = lego_merge(ads, k=4, output_reweight=False)
    for n in SHAPES:
        u = extract_units([a[n] for a in ads], [1.0] * 3)
        norms = u.vectors().norm(dim=1)
        labels = torch.cat(asg[n].labels)  # extract_units order = input order, then unit order
        f = merged[n]
        for c in range(4):
            centroid = torch.cat([f.B[:, c], f.A[c]])
            assert float(centroid.norm()) == pytest.approx(float(norms[labels == c].mean()), rel=1e-6)
            assert int((labels == c).sum()) == int(asg[n].sizes[c])
        assert f.scale == 1.0


def test_centroids_are_member_means_without_reweighting_and_error_is_the_dense_one():
    ads = adapters(rank=5)
    merged, asg = lego_merge(ads, [1.0, 2.0, 0.5], k=6, param_reweight=False, output_reweight=False)
    for n in SHAPES:
        u = extract_units([a[n] for a in ads], [1.0, 2.0, 0.5])
        X, labels, f = u.vectors(), torch.cat(asg[n].labels), merged[n]
        for c in range(6):
            torch.testing.assert_close(torch.cat([f.B[:, c], f.A[c]]), X[labels == c].mean(0))
        ref = dense_sum(ads, [1.0, 2.0, 0.5], n)
        err = float((f.delta(F64) - ref).norm() / ref.norm())
        assert asg[n].error == pytest.approx(err, rel=1e-8)
        s = torch.linalg.svdvals(ref)
        assert asg[n].best_error == pytest.approx(float(s[6:].norm() / s.norm()), rel=1e-8)
        assert asg[n].best_error <= asg[n].error


def test_output_reweighting_is_sqrt_mean_rank_over_k():
    ads = adapters(rank=[4, 8])
    m, asg = lego_merge(ads, k=3, param_reweight=False)
    assert m["q"].scale == pytest.approx(math.sqrt(6 / 3)) and asg["q"].output_scale == m["q"].scale
    off, _ = lego_merge(ads, k=3, param_reweight=False, output_reweight=False)
    torch.testing.assert_close(m["q"].delta(F64), math.sqrt(2) * off["q"].delta(F64))
    fixed, _ = lego_merge(ads, k=3, output_scale=0.25)
    assert fixed["q"].scale == 0.25


@pytest.mark.parametrize("gauge", ["canonical", "raw"])
def test_copies_of_one_adapter_with_k_equal_rank_give_it_back(gauge):
    a = adapters(n=1, rank=5)[0]
    merged, asg = lego_merge([a, a, a], k=5, gauge=gauge)  # defaults: both reweightings on, γ = 1
    assert_adapters_close(merged, a, rtol=1e-10, atol=1e-12)
    assert sorted(asg["q"].sizes.tolist()) == [3] * 5
    assert merged["q"].shape == (24, 16) and merged["q"].rank == 5


def test_single_adapter_is_re_clustered_and_k_below_rank_reduces_rank():
    a = adapters(n=1, rank=6)[0]
    same, _ = lego_merge([a], k=6)
    assert_adapters_close(same, a, rtol=1e-10, atol=1e-12)
    small, asg = lego_merge([a], k=2, output_reweight=False)
    assert small["q"].rank == 2 and small["down"].A.shape == (2, 30) and small["down"].B.shape == (12, 2)
    assert 0 < asg["q"].best_error <= asg["q"].error < 1.5


def test_rank_rules_and_per_module_k():
    ads = adapters(rank=4)
    spec = registry.resolve("lego")
    params = spec.validate({"seed": "2", "restarts": "3", "param_reweight": False})
    assert params == {"seed": 2, "restarts": 3, "param_reweight": False}
    inputs = [a["q"] for a in ads]
    res = spec.fn(inputs, [1.0] * 3, rank_rule=rank_rule(rank=7), **params)
    assert res.factors.rank == 7 and res.info["k"] == 7 and len(res.info["assignment"].labels) == 3
    s = torch.linalg.svdvals(sum(f.delta(F64) for f in inputs))
    want = rank_rule(energy=0.8).select(s)
    assert spec.fn(inputs, [1.0] * 3, rank_rule=rank_rule(energy=0.8)).factors.rank == want
    assert spec.fn(inputs, [1.0] * 3).factors.rank == 4  # default κ: the largest input rank
    merged, _ = lego_merge(ads, k={"q": 2, "down": 9})
    assert merged["q"].rank == 2 and merged["down"].rank == 9


def test_dtype_kernel_and_kind_are_kept():
    g = torch.Generator().manual_seed(0)
    f = random_factors(6, 27, 3, generator=g).with_(kind="conv", kernel=(3, 3))
    h = random_factors(6, 27, 3, generator=g).with_(kind="conv", kernel=(3, 3))
    out, _ = lego_module([f, h], [1.0, 1.0], rank_rule=rank_rule(rank=2))
    assert out.kernel == (3, 3) and out.kind == "conv" and out.dtype == torch.float32


# ---- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, -3])
def test_k_below_one(k):
    with pytest.raises(RankError, match="positive integer"):
        lego_merge(adapters(), k=k)


def test_k_above_number_of_units():
    with pytest.raises(RankError, match="more than the 12 rank-1 units") as e:
        lego_merge(adapters(rank=4), k=13)
    assert "--rank 12" in (e.value.hint or "") and e.value.module == "q"


def test_different_module_sets():
    a = random_adapter(SHAPES, 4, seed=0)
    b = random_adapter({"q": (24, 16), "other": (12, 30)}, 4, seed=1)
    with pytest.raises(IncompatibleAdaptersError, match="module sets differ"):
        lego_merge([a, b], k=2)


def test_different_shapes():
    a = random_adapter(SHAPES, 4, seed=0)
    b = random_adapter({"q": (24, 16), "down": (12, 31)}, 4, seed=1)
    with pytest.raises(ShapeMismatchError, match="shapes differ") as e:
        lego_merge([a, b], k=2)
    assert e.value.module == "down"


def test_other_bad_parameters():
    ads = adapters()
    with pytest.raises(OperatorParameterError, match="gauge"):
        lego_merge(ads, k=2, gauge="spherical")  # type: ignore[arg-type]
    with pytest.raises(OperatorParameterError, match="not both"):
        lego_merge(ads, k=2, rank_rule=rank_rule(rank=2))
    with pytest.raises(OperatorParameterError, match="weights"):
        lego_merge(ads, [1.0], k=2)
    with pytest.raises(OperatorParameterError, match="at least one"):
        lego_merge([], k=2)
    with pytest.raises(OperatorParameterError, match="modules"):
        lego_merge(ads, k={"q": 2})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_path_matches_cpu():
    ads = adapters(rank=8, shapes={"q": (256, 128)})
    cpu, asg_c = lego_merge(ads, k=8, seed=1)
    gpu, asg_g = lego_merge(ads, k=8, seed=1, device="cuda")
    assert_adapters_close(cpu, gpu, rtol=1e-6, atol=1e-9)
    assert all(torch.equal(x, y) for x, y in zip(asg_c["q"].labels, asg_g["q"].labels))


def test_merged_adapter_saves_and_reloads_with_provenance(tmp_path):
    import lorakit
    from lorakit.provenance import read_provenance

    ads = [random_adapter(SHAPES, 4, scale=0.5, seed=i) for i in range(2)]
    merged, _ = lego_merge(ads, k=3, seed=1)
    path = lorakit.save(merged, tmp_path / "m.safetensors")
    back = lorakit.load(path)
    assert_adapters_close(back, merged, rtol=1e-5, atol=1e-7)
    prov = read_provenance(back.meta.metadata)
    assert prov is not None and prov["operation"] == "merge:lego" and prov["parameters"]["k"] == 3
