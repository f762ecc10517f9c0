"""LoRA-LEGO against the independent float64 loop reference (benchmarks/lego_reference.py), the batched merge
against the per-module operator, the requested device, and typed parameters."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lorakit.ops.lego as lego_ops
from benchmarks.lego_reference import reference_lego
from lorakit.ops import registry
from lorakit.ops.kmeans import kmeans_gram
from lorakit.ops.lego import lego_module
from lorakit.ops.rank_rules import rank_rule
from lorakit.testing import random_adapter, random_factors
from lorakit.verbs.lego import lego_merge

F64 = torch.float64


def same_partition(a: list[int], b: list[int]) -> bool:
    return all((a[i] == a[j]) == (b[i] == b[j]) for i in range(len(a)) for j in range(len(a)))


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


def inputs(dtype, ranks=(4, 4, 4), shape=(24, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [random_factors(*shape, r, scale=0.5 + 0.25 * i, decay=0.8, generator=g, dtype=dtype)
            for i, r in enumerate(ranks)]


@pytest.mark.parametrize("param_reweight,output_reweight", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (0.5, -1.0, 2.0)])
def test_lego_equals_the_float64_reference(param_reweight, output_reweight, weights):
    fs = inputs(F64, ranks=(4, 6, 3))
    for k in (2, 5, 13):
        got, asg = lego_module(fs, list(weights), rank_rule=rank_rule(rank=k), seed=3, restarts=3,
                               param_reweight=param_reweight, output_reweight=output_reweight)
        ref = reference_lego([(f.B, f.A, f.scale) for f in fs], weights, k, seed=3, restarts=3,
                             param_reweight=param_reweight, output_reweight=output_reweight)
        assert rel(got.delta(F64), ref.delta) < 1e-10
        assert same_partition(torch.cat(asg.labels).tolist(), ref.labels)
        assert asg.inertia == pytest.approx(ref.inertia, rel=1e-9, abs=1e-12)
        assert got.scale == pytest.approx(ref.gamma)


def test_float32_inputs_match_the_reference_to_float32_precision():
    fs = inputs(torch.float32, ranks=(8, 8, 8, 8), shape=(96, 80), seed=5)
    got, asg = lego_module(fs, [1.0] * 4, rank_rule=rank_rule(rank=8), seed=0)
    ref = reference_lego([(f.B, f.A, f.scale) for f in fs], [1.0] * 4, 8, seed=0)
    assert got.dtype == torch.float32
    assert rel(got.delta(F64), ref.delta) < 1e-5
    assert asg.inertia == pytest.approx(ref.inertia, rel=1e-5)


def test_batched_merge_equals_the_per_module_operator():
    """lego_merge clusters the modules of a window in one batched k-means; each equals the registry operator."""
    shapes = {"q": (24, 16), "k": (24, 16), "down": (12, 30), "up": (30, 12)}
    ads = [random_adapter(shapes, 4, scale=0.5 + i, seed=10 + i, dtype=F64) for i in range(3)]
    merged, asg = lego_merge(ads, k=5, seed=2)
    spec = registry.resolve("lego")
    for n in shapes:
        res = spec.fn([a[n] for a in ads], [1.0] * 3, rank_rule=rank_rule(rank=5), seed=2)
        torch.testing.assert_close(merged[n].delta(F64), res.factors.delta(F64), rtol=1e-12, atol=1e-14)
        assert all(torch.equal(x, y) for x, y in zip(asg[n].labels, res.info["assignment"].labels))
    tiny, _ = lego_merge(ads, k=5, seed=2, window_bytes=1)  # one module per window: same numbers
    for n in shapes:
        torch.testing.assert_close(tiny[n].delta(F64), merged[n].delta(F64), rtol=1e-12, atol=1e-14)


def test_batched_kmeans_equals_each_problem_alone():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(5, 20, 9, generator=g, dtype=F64)
    G = X @ X.transpose(1, 2)
    batch = kmeans_gram(G, 4, seed=7, restarts=3)
    for i in range(5):
        one = kmeans_gram(G[i], 4, seed=7, restarts=3)
        assert torch.equal(batch.labels[i], one.labels[0]) and float(batch.inertia[i]) == pytest.approx(
            float(one.inertia[0]), rel=1e-12)


class _Reached(Exception):
    pass


@pytest.mark.parametrize("route", ["operator", "pipeline"])
def test_clustering_runs_on_the_requested_device(monkeypatch, route):
    """The inputs are not moved back to the CPU: on "meta" tensors (no data, any device would do) every step up
    to the clustering runs on the device and k-means receives the device's Gram matrices."""
    seen = []

    def spy(G, k, **kw):
        seen.append(G.device.type)
        raise _Reached

    monkeypatch.setattr(lego_ops, "kmeans_gram", spy)
    monkeypatch.setattr(lego_ops, "_canonical_order", lambda units, norms: torch.arange(units.count))
    monkeypatch.setattr(lego_ops, "_spectrum", lambda Gb, Ga: torch.ones(Gb.shape[0], dtype=F64))
    if route == "operator":
        fs = [f.to("meta") for f in inputs(torch.float32)]
        with pytest.raises(_Reached):
            registry.resolve("lego").fn(fs, [1.0] * 3, rank_rule=rank_rule(rank=2))
    else:
        from lorakit.pipeline import merge_adapters

        ads = [random_adapter({"q": (24, 16)}, 4, seed=i) for i in range(2)]
        with pytest.raises(_Reached):
            merge_adapters(ads, [1.0, 1.0], "lego", rank=2, device="meta")
    assert seen == ["meta"]


@pytest.mark.parametrize("text,want", [("false", False), ("0", False), ("off", False), ("True", True), ("1", True)])
def test_bool_parameters_from_text_are_parsed(text, want):
    """``--param output_reweight=false`` and ``=0`` turn it off (bool("false") would be True)."""
    spec = registry.resolve("lego")
    assert spec.validate({"output_reweight": text}) == {"output_reweight": want}
    ads = [random_adapter({"q": (24, 16)}, 4, seed=i) for i in range(2)]
    from lorakit.pipeline import merge_adapters

    merged, _ = merge_adapters(ads, [1.0, 1.0], "lego", rank=2, output_reweight=text, param_reweight="no")
    gamma = (4 / 2) ** 0.5
    assert merged["q"].scale == pytest.approx(gamma if want else 1.0)


def test_typed_parameter_errors():
    spec = registry.resolve("lego")
    assert spec.validate({"seed": "3", "output_scale": "0.5", "restarts": 2.0}) == {
        "seed": 3, "output_scale": 0.5, "restarts": 2}
    for bad in ({"output_reweight": "maybe"}, {"seed": "1.5"}, {"restarts": 2.5}, {"param_reweight": 2}):
        with pytest.raises(registry.OperatorParameterError, match="must be"):
            spec.validate(bad)


@pytest.mark.parametrize("off", ["false", "0"])
def test_cli_param_output_reweight_false_turns_it_off(tmp_path, off):
    from click.testing import CliRunner
    from lorakit.cli.main import cli

    import lorakit

    paths = []
    for i in range(2):
        paths.append(str(lorakit.save(random_adapter({"q": (24, 16)}, 4, seed=i), tmp_path / f"a{i}.safetensors")))
    outs = {}
    for value in ("true", off):
        out = tmp_path / f"m-{value}.safetensors"
        res = CliRunner().invoke(cli, ["merge", *paths, "--method", "lego", "--rank", "2", "--param",
                                       f"output_reweight={value}", "-o", str(out)])
        assert res.exit_code == 0, res.output
        outs[value] = lorakit.load(out)["q"].delta(F64)
    torch.testing.assert_close(outs["true"], (4 / 2) ** 0.5 * outs[off], rtol=1e-5, atol=1e-7)
    res = CliRunner().invoke(cli, ["merge", *paths, "--method", "lego", "--param", "output_reweight=maybe", "-o",
                                   str(tmp_path / "bad.safetensors")])
    assert res.exit_code == 1 and "output_reweight must be true or false" in res.output
    assert not (tmp_path / "bad.safetensors").exists()


@settings(max_examples=10, deadline=None)
@given(c=st.floats(0.05, 20.0), seed=st.integers(0, 1000), k=st.integers(1, 9))
def test_a_common_weight_scales_the_merge(c, seed, k):
    """Raw units scale by √c on both sides under a common weight c > 0: same partition, ΔW times c."""
    fs = inputs(F64, ranks=(3, 3, 3), seed=seed)
    one, asg1 = lego_module(fs, [1.0] * 3, rank_rule=rank_rule(rank=k), seed=seed)
    scaled, asg_c = lego_module(fs, [c] * 3, rank_rule=rank_rule(rank=k), seed=seed)
    assert all(torch.equal(x, y) for x, y in zip(asg1.labels, asg_c.labels))
    torch.testing.assert_close(scaled.delta(F64), c * one.delta(F64), rtol=1e-9, atol=1e-12)
