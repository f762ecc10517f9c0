"""Contract tests generated from the operator registry: every registered merge operator gets them, so a new
registration is tested by what it declares (``OperatorSpec``: output rank rule, linear, homogeneous, ranges,
factored, lossless settings) without editing this file.

- one adapter at weight 1 comes back (at the declared lossless parameters, to the declared tolerance); an
  operator with no lossless setting reports the error it makes (measured against the exact ΔW);
- a weight of 0.5 halves ΔW (and 2, 3 scale it) where the operator is declared homogeneous;
- the effective linear weights are λ·w_i where it is declared linear (bias and whole tensors use them);
- parameters outside their declared ranges are refused with one line, at planning;
- the rank it declares is the rank written to the file, for every rank rule it accepts;
- a factored operator forms no out×in tensor (a dispatch spy sees every tensor produced); a delta one does;
- the float64 dense reference of ``benchmarks.merge_reference`` agrees, where one exists.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lorakit
from lorakit.errors import OperatorParameterError, RankError
from lorakit.factors import LoraFactors
from lorakit.ops.rank_rules import rank_rule
from lorakit.ops.registry import ENGINE_KEYWORDS, OperatorSpec, available
from lorakit.pipeline import merge, plan_merge
from lorakit.testing import random_adapter, random_factors

from . import _ref

F64 = torch.float64
SPECS = available("merge")
IDS = [s.name for s in SPECS]


def make(out=24, inn=18, ranks=(3, 5), scales=(0.5, 2.0), seed=0, decay=0.8, dtype=F64) -> list[LoraFactors]:
    g = torch.Generator().manual_seed(seed)
    return [random_factors(out, inn, r, scale=s, generator=g, dtype=dtype, decay=decay)
            for r, s in zip(ranks, scales)]


def call(spec: OperatorSpec, inputs, weights, rule=None, **params):
    kwargs = {**params}
    if spec.takes("rank_rule"):
        kwargs["rank_rule"] = rule
    if spec.takes("module"):
        kwargs["module"] = "m"
    return spec.fn(inputs, weights, **kwargs)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_the_registry_lists_every_builtin_with_a_contract():
    names = set(IDS)
    assert {"cat", "svd", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "della",
            "breadcrumbs", "knots", "core_space", "tsv", "iso_c", "iso_cts", "lego"} <= names
    for s in SPECS:
        assert s.description and s.rank in ("sum", "max_input", "data") and s.rank_cap in ("sum", "shape")
        assert not (s.linear and not s.factored)  # a linear target never needs the dense ΔW


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_one_adapter_at_weight_one(spec):
    """At its lossless parameters one adapter at weight 1 is returned (ΔW to the declared tolerance, error ≈ 0);
    an operator without one (Iso-C flattens the spectrum) reports the error it actually makes."""
    (f,) = make(ranks=(4,), scales=(0.75,), decay=None)
    res = call(spec, [f], [1.0], **(spec.lossless or {}))
    measured = rel(res.factors.delta(F64), f.delta(F64))
    if spec.lossless is not None:
        torch.testing.assert_close(res.factors.delta(F64), f.delta(F64), rtol=spec.tolerance,
                                   atol=spec.tolerance / 10)
        assert res.error < 1e-7
    else:
        assert measured > spec.tolerance  # declared lossy: it does change one adapter
        assert res.error == pytest.approx(measured, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.homogeneous], ids=[s.name for s in SPECS if s.homogeneous])
def test_weights_scale_the_result(spec):
    """Homogeneous operators: weight 0.5 halves ΔW; every weight times w scales ΔW by w (defaults parameters)."""
    fs = make(ranks=(3, 4), scales=(1.0, 0.5))
    (f,) = fs[:1]
    torch.testing.assert_close(call(spec, [f], [0.5]).factors.delta(F64), 0.5 * call(spec, [f], [1.0]).factors.delta(F64),
                               rtol=1e-8, atol=1e-9)
    base = call(spec, fs, [1.0, 0.5]).factors.delta(F64)
    for w in (0.5, 2.0, 3.0):
        got = call(spec, fs, [w, 0.5 * w]).factors.delta(F64)
        torch.testing.assert_close(got, w * base, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_linear_operators_give_their_exact_target(spec):
    """Declared linear: the result is λ·Σ w_i·ΔW_i at a rank that keeps it (bias updates and whole module tensors
    merge with the same weights); otherwise the engine gets no linear weights and refuses bias updates."""
    fs, ws = make(), [0.7, -0.4]
    weights = spec.linear_weights(ws, {})
    if not spec.linear:
        assert weights is None
        return
    assert weights == ws
    if spec.takes("lam"):
        assert spec.linear_weights(ws, {"lam": 0.5}) == [0.35, -0.2]
    rule = rank_rule(rank=sum(f.rank for f in fs)) if spec.takes("rank_rule") else None
    got = call(spec, fs, ws, rule).factors.delta(F64)
    want = sum(w * f.delta(F64) for f, w in zip(fs, ws))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def _outside(spec: OperatorSpec):
    for key, iv in spec.ranges.items():
        for v in (iv.low - 1, iv.high + 1, *([] if iv.low_closed else [iv.low]), *([] if iv.high_closed else [iv.high])):
            if math.isfinite(v):
                yield pytest.param(spec, key, v, id=f"{spec.name}-{key}={v}")


@pytest.mark.parametrize("spec, key, value", [p for s in SPECS for p in _outside(s)])
def test_parameters_out_of_range_are_refused_with_one_line(spec, key, value):
    adapter = random_adapter({"q": (12, 10)}, 2, seed=1)
    with pytest.raises(OperatorParameterError) as e:
        plan_merge([adapter], method=spec.name, params={key: str(value)})
    assert key in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_in_range_parameters_pass_and_rank_rules_follow_the_signature(spec):
    adapter = random_adapter({"q": (12, 10)}, 2, seed=1)
    for key, iv in spec.ranges.items():  # the closed ends are accepted
        for v in [x for x, closed in ((iv.low, iv.low_closed), (iv.high, iv.high_closed)) if closed]:
            if spec.check is None:
                spec.validate({key: v})
    spec.validate(dict(spec.lossless or {}))
    if spec.takes("rank_rule"):
        with pytest.raises(OperatorParameterError) as e:
            plan_merge([adapter], method=spec.name, rank=0)
    else:
        with pytest.raises(OperatorParameterError) as e:
            plan_merge([adapter], method=spec.name, rank=4)
    assert "\n" not in str(e.value)
    assert not set(ENGINE_KEYWORDS) & set(spec.ranges)


SHAPES = {"wide": (24, 18), "narrow": (6, 30)}  # the narrow module caps ranks by its shape (6 < Σr = 8)
# rank 7 meets the narrow module's shape cap, rank 12 the Σr_i cap of factor space
RULES = {"none": {}, "rank2": {"rank": 2}, "rank7": {"rank": 7}, "rank12": {"rank": 12}, "energy": {"energy": 0.9}}


@pytest.mark.parametrize("rule", list(RULES), ids=list(RULES))
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_declared_rank_is_the_written_rank(spec, rule, tmp_path):
    """The rank the spec declares (``output_rank``, from the headers) is the rank in the written file; where the
    data decides, the written rank is within the declared cap (Σr_i in factor space, min(out, in) in delta)."""
    if RULES[rule] and not spec.takes("rank_rule"):
        pytest.skip(f"{spec.name} takes no rank rule (refused; see the test above)")
    paths = []
    for i, r in enumerate((3, 5)):
        paths.append(str(lorakit.save(random_adapter(SHAPES, r, seed=i, decay=0.7), tmp_path / f"a{i}.safetensors")))
    out = tmp_path / "m.safetensors"
    declared = {m: spec.output_rank(rank_rule(**RULES[rule]), [3, 5], shape) for m, shape in SHAPES.items()}
    try:
        merge(paths, out, method=spec.name, **RULES[rule])
    except RankError as e:  # where the data decides, an operator may refuse a rank it cannot give (LEGO: κ > units)
        assert None in declared.values() and "\n" not in str(e)
        return
    written = lorakit.load(out)
    for m, (o, i) in SHAPES.items():
        got = written.info(m).rank
        if declared[m] is not None:
            assert got == declared[m], (m, got, declared[m])
        else:
            assert 1 <= got <= (8 if spec.rank_cap == "sum" else min(o, i))


class _Sizes(TorchDispatchMode):
    """Records the shape of every tensor an aten op produces."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_factored_flag_holds(spec):
    """Factored operators form no tensor with both an out and an in dimension (primes no factor-space shape meets);
    delta-space ones form the dense merged module."""
    out, inn = 67, 53
    fs = make(out, inn, ranks=(3, 4), scales=(1.0, 0.5))
    with _Sizes() as spy:
        call(spec, fs, [1.0, 0.5])
    dense = [s for s in spy.shapes if out in s and inn in s]
    if spec.factored:
        assert not dense, dense[:3]
    else:
        assert dense


def _weighted(fs, ws):
    return [w * f.delta(F64) for f, w in zip(fs, ws)], [f.B * (w * f.scale) for f, w in zip(fs, ws)], [f.A for f in fs]


def _trunc(M, rule):
    return _ref.svd_truncate(M, int(rule.value)) if rule is not None else M


# name → the float64 dense reference, fn(taus, Bs, As, params, info, rule) → ΔW
REFERENCES = {
    "cat": lambda t, B, A, p, info, rule: _ref.task_arithmetic(t),
    "task_arithmetic": lambda t, B, A, p, info, rule: p["lam"] * _trunc(_ref.task_arithmetic(t), rule),
    "svd": lambda t, B, A, p, info, rule: _trunc(_ref.task_arithmetic(t), rule),
    "ties": lambda t, B, A, p, info, rule: p["lam"] * _trunc(_ref.ties(t, p["density"]), rule),
    "magnitude_prune": lambda t, B, A, p, info, rule: p["lam"] * _trunc(_ref.magnitude_prune(t, p["density"]), rule),
    "breadcrumbs": lambda t, B, A, p, info, rule: p["lam"] * _trunc(_ref.breadcrumbs(t, p["density"], p["gamma"]),
                                                                    rule),
    "knots": lambda t, B, A, p, info, rule: p["lam"] * _trunc(_ref.knots(t, lambda x: _ref.ties(x, p["density"])),
                                                              rule),
    "core_space": lambda t, B, A, p, info, rule: p["lam"] * _trunc(
        _ref.core_space(B, A, lambda x: _ref.ties(x, p["density"])), rule),
    "tsv": lambda t, B, A, p, info, rule: p["lam"] * _ref.tsv(t, list(info["per_task"])),
    "iso_c": lambda t, B, A, p, info, rule: p["lam"] * _ref.iso_c(t, int(info["rank"])),
    "iso_cts": lambda t, B, A, p, info, rule: p["lam"] * _ref.iso_cts(t, 0, info["common"], info["per_task"]),
}
# random masks (dare_*, della: tests/merge/test_delta.py checks them against the drawn masks) and LEGO (its own
# float64 reference, tests/lego/test_lego_reference.py) have no deterministic dense reference here


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_float64_dense_reference_agrees(spec):
    ref = REFERENCES.get(spec.name)
    if ref is None:
        pytest.skip(f"no deterministic dense reference for {spec.name} here")
    if spec.takes("inner"):
        assert spec.defaults()["inner"] == "ties"  # the reference merges with TIES, the default inner method
    fs, ws = make(ranks=(3, 4), scales=(0.5, 2.0)), [0.7, -0.4]
    # at a requested rank of min(out, in) the randomized SVD of the delta methods reproduces the dense result
    # (and the factored ones keep everything)
    rule = rank_rule(rank=min(fs[0].shape)) if spec.rank_requested else None
    params = spec.defaults()
    res = call(spec, fs, ws, rule)
    t, B, A = _weighted(fs, ws)
    want = ref(t, B, A, params, res.info, rule)
    torch.testing.assert_close(res.factors.delta(F64), want, rtol=1e-8, atol=1e-9 * float(want.abs().max()))


PLUGIN = '''
"""A toy operator: the exact weighted sum with the inputs' order reversed (same ΔW as cat)."""
from lorakit.algebra import cat_factors
from lorakit.ops.registry import MergeResult, register


@register("reversed_cat", description="cat with the inputs reversed", exact=True, space="factors", rank="sum",
          linear=True, homogeneous=True, lossless={})
def reversed_cat(inputs, weights, *, gain: float = 1.0):
    return MergeResult(cat_factors(inputs[::-1], [gain * w for w in weights[::-1]]))
'''


def test_adding_an_operator_is_one_file_and_its_registration(tmp_path, monkeypatch):
    """A new module listed in BUILTIN_MODULES is found, planned (declared rank before any data) and run by the
    engine with no other change; the contract tests above parametrize over it like any built-in."""
    from lorakit.ops import registry

    (tmp_path / "lorakit_toy_op.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "BUILTIN_MODULES", [*registry.BUILTIN_MODULES, "lorakit_toy_op"])
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # the registration is undone after
    spec = registry.resolve("reversed_cat")
    assert spec.factored and spec.linear and spec.params.keys() == {"gain"}
    a, b = random_adapter(SHAPES, 3, seed=1, dtype=F64), random_adapter(SHAPES, 5, seed=2, dtype=F64)
    plan = plan_merge([a, b], [0.5, 2.0], "reversed_cat", params={"gain": "2"})
    assert plan.infos is not None and plan.infos["narrow"].rank == 8
    from lorakit.pipeline import run_merge

    merged = run_merge(plan).adapter.materialize()
    for m in SHAPES:
        torch.testing.assert_close(merged[m].delta(F64), a[m].delta(F64) + 4 * b[m].delta(F64), rtol=1e-12, atol=1e-12)
    with pytest.raises(OperatorParameterError):
        plan_merge([a, b], method="reversed_cat", params={"gain": "x"})
