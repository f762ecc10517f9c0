"""Resize: optimal truncation against float64 dense references, rank rules, budget, expansion, formats, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lorakit
from lorakit.errors import OperatorParameterError, RankError
from lorakit.ops.rank_rules import RankRule, rank_rule
from lorakit.ops.resize import allocate_budget
from lorakit.testing import assert_adapters_close, random_adapter
from lorakit.verbs.resize import resize

SHAPES = {"m.q": (48, 32), "m.k": (16, 32), "m.v": (16, 32), "m.up": (64, 32)}


def _adapter(**kw):
    return random_adapter(SHAPES, rank=8, scale=0.5, decay=0.75, seed=3, **kw)


def _dense_truncation(delta: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def test_resize_rank_is_the_dense_truncation():
    a = _adapter(dtype=torch.float64)
    out, rows = resize(a, rank_rule(rank=3))
    for n in a:
        d = a[n].delta(torch.float64)
        ref = _dense_truncation(d, 3)
        assert out[n].rank == 3 and out[n].scale == 1.0
        torch.testing.assert_close(out[n].delta(torch.float64), ref, atol=1e-10, rtol=0)
        row = next(r for r in rows if r.name == n)
        assert row.rel_error == pytest.approx(float(torch.linalg.norm(d - ref) / torch.linalg.norm(d)), rel=1e-9)
        assert row.energy_kept == pytest.approx(1 - row.rel_error**2, rel=1e-9)


@pytest.mark.parametrize("kind,value", [("energy", 0.9), ("error", 0.2), ("sv_ratio", 4.0), ("sv_cumulative", 0.8)])
def test_rules_pick_the_rank_the_dense_spectrum_implies(kind, value):
    a = random_adapter(SHAPES, rank={"m.q": 8, "m.k": 4, "m.v": 6, "m.up": 8}, decay=0.6, seed=4)
    out, _rows = resize(a, rank_rule(**{kind: value}))
    for n in a:
        d = a[n].delta(torch.float64)
        s = torch.linalg.svdvals(d)[: a[n].rank]
        k = out[n].rank
        s2 = s.square()
        if kind == "energy":
            assert s2[:k].sum() >= value * s2.sum() * (1 - 1e-6) and (k == 1 or s2[: k - 1].sum() < value * s2.sum())
        elif kind == "error":
            assert (s2[k:].sum() / s2.sum()).sqrt() <= value + 1e-6
            assert k == 1 or (s2[k - 1:].sum() / s2.sum()).sqrt() > value
        elif kind == "sv_ratio":
            assert k == int((s >= s[0] / value - 1e-6).sum())
        else:
            assert s[:k].sum() >= value * s.sum() * (1 - 1e-6)
        torch.testing.assert_close(out[n].delta(torch.float64), _dense_truncation(d, k), atol=1e-5, rtol=0)


def test_full_rank_resize_is_lossless_and_idempotent():
    a = _adapter(dtype=torch.float64)
    once, rows = resize(a, rank_rule(energy=1.0))
    assert all(r.rank_out == 8 and r.rel_error < 1e-7 for r in rows)
    assert_adapters_close(once, a, rtol=0, atol=1e-12)
    twice, _ = resize(once, rank_rule(energy=1.0))
    for n in a:
        torch.testing.assert_close(twice[n].A, once[n].A, atol=1e-10, rtol=0)
        torch.testing.assert_close(twice[n].B, once[n].B, atol=1e-10, rtol=0)


def test_budget_allocation_is_greedy_on_energy_per_parameter():
    spectra = {"a": torch.tensor([4.0, 2.0, 1.0]), "b": torch.tensor([3.0, 2.9, 0.1])}
    costs = {"a": 10, "b": 30}
    # rank 1 each = 40; then candidates a2 (4/10), b2 (8.41/30 = .28), a3 (1/10), b3: order a2, b2, a3
    assert allocate_budget(spectra, costs, 40) == {"a": 1, "b": 1}
    assert allocate_budget(spectra, costs, 50) == {"a": 2, "b": 1}
    assert allocate_budget(spectra, costs, 79) == {"a": 3, "b": 1}  # b2 does not fit; a3 (cheaper) still does
    assert allocate_budget(spectra, costs, 80) == {"a": 2, "b": 2}
    assert allocate_budget(spectra, costs, 1000) == {"a": 3, "b": 3}


def test_budget_resize_respects_the_budget_and_beats_uniform():
    a = random_adapter(SHAPES, rank=8, decay=0.7, seed=5)
    uniform, urows = resize(a, rank_rule(rank=3))
    budget = uniform.num_params
    out, rows = resize(a, budget=budget)
    assert out.num_params <= budget and all(r.rank_out >= 1 for r in rows)
    lost = sum((r.rel_error * r.norm) ** 2 for r in rows)
    lost_uniform = sum((r.rel_error * r.norm) ** 2 for r in urows)
    assert lost <= lost_uniform * (1 + 1e-9)
    with pytest.raises(OperatorParameterError, match="too small"):
        resize(a, budget=sum(o + i for o, i in SHAPES.values()) - 1)


def test_expand_zero_pads_and_keeps_delta():
    a = random_adapter(SHAPES, rank=4, seed=6, dtype=torch.float64)
    out, rows = resize(a, rank_rule(rank=12), expand=True)
    assert all(out[n].rank == 12 for n in out)
    assert_adapters_close(out, a, rtol=0, atol=1e-12)
    assert all(r.rel_error < 1e-7 for r in rows)
    not_expanded, _ = resize(a, rank_rule(rank=12))
    assert all(not_expanded[n].rank == 4 for n in a)
    with pytest.raises(OperatorParameterError):
        resize(a, rank_rule(energy=0.9), expand=True)


def test_rank_larger_than_layer_is_refused():
    with pytest.raises(RankError, match="outside"):
        resize(_adapter(), rank_rule(rank=17))  # m.k is 16x32


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_heterogeneous_ranks_roundtrip_through_formats(tmp_path, fmt, cli):
    a = random_adapter(SHAPES, rank=8, scale=0.5, decay=0.6, seed=7)
    lorakit.save(a, tmp_path / "in.safetensors", format=fmt)
    out = tmp_path / "out.safetensors"
    code, stdout, err = cli("resize", tmp_path / "in.safetensors", "--error", "0.1", "-o", out, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    back = lorakit.load(out)
    ranks = {n: back.info(n).rank for n in back}
    assert ranks == {m["module"]: m["rank out"] for m in report["modules"]}
    ref, _ = resize(a, RankRule("error", 0.1))
    assert_adapters_close(back, ref, rtol=1e-5, atol=1e-6)
    assert report["parameters_after"] == back.num_params
    if fmt == "peft":
        config = json.loads(back.meta.metadata["lorakit.peft_config"])
        assert set(config["rank_pattern"]) | {n for n in ranks if ranks[n] == config["r"]} == set(ranks)


@pytest.mark.parametrize("args,message", [
    (["--rank", "17"], "rank 17 is outside"),
    (["--energy", "1.5"], "--energy must be in (0, 1]"),
    (["--energy", "0"], "--energy must be in (0, 1]"),
    (["--budget", "100"], "too small"),
    (["--rank", "4", "--energy", "0.9"], "give one rank rule"),
    ([], "give exactly one"),
])
def test_bad_input_clear_error_nothing_written(tmp_path, cli, args, message):
    a = _adapter()
    src = tmp_path / "in.safetensors"
    lorakit.save(a, src, format="peft")
    before = src.read_bytes()
    out = tmp_path / "out.safetensors"
    code, _stdout, err = cli("resize", src, *args, "-o", out)
    assert code == 1
    assert message in err and "Traceback" not in err
    assert not out.exists() and src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_dry_run_writes_nothing(tmp_path, cli):
    src = tmp_path / "in.safetensors"
    lorakit.save(_adapter(), src, format="peft")
    code, stdout, _ = cli("resize", src, "--rank", "2", "-o", tmp_path / "o.safetensors", "--dry-run")
    assert code == 0 and "plan" in stdout and not (tmp_path / "o.safetensors").exists()


def test_inspect_spectrum_matches_dense(tmp_path, cli):
    a = _adapter()
    src = tmp_path / "in.safetensors"
    lorakit.save(a, src, format="kohya")
    code, stdout, err = cli("inspect", src, "--spectrum", "--json")
    assert code == 0, err
    rows = {m["module"]: m for m in json.loads(stdout)["modules"]}
    for n in a:
        ref = torch.linalg.svdvals(a[n].delta(torch.float64))[:8]
        got = torch.tensor(rows[n]["singular_values"], dtype=torch.float64)
        torch.testing.assert_close(got, ref, atol=1e-6 * float(ref[0]), rtol=0)
        p = ref / ref.sum()
        assert rows[n]["eff. rank"] == pytest.approx(math.exp(float(-(p * p.log()).sum())), abs=1e-3)


def test_peft_loads_resized_adapter_and_logits_match_dense_reference(tmp_path, cli, tiny_llama_2l):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = tiny_llama_2l
    config = base.config
    shapes = {}
    for i in range(2):
        for proj, shp in {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
                          "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
                          "mlp.down_proj": (64, 128)}.items():
            shapes[f"model.layers.{i}.{proj}"] = shp
    a = random_adapter(shapes, rank={n: 16 if "mlp" in n else 6 for n in shapes}, scale=2.0, decay=0.8, seed=11)
    src = tmp_path / "lora"
    lorakit.save(a, src, format="peft")
    out = tmp_path / "small"
    code, _, err = cli("resize", src, "--energy", "0.95", "-o", out)
    assert code == 0, err
    resized = lorakit.load(out)
    assert len({resized.info(n).rank for n in resized}) >= 2  # heterogeneous: rank_pattern / alpha_pattern
    host = transformers.LlamaForCausalLM(config).eval()
    host.load_state_dict(base.state_dict())
    model = peft.PeftModel.from_pretrained(host, str(out)).eval()
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.load_state_dict(base.state_dict())
    with torch.no_grad():
        params = dict(reference.named_parameters())
        for n in a:
            k = resized.info(n).rank
            params[f"{n}.weight"].add_(_dense_truncation(a[n].delta(torch.float64), k).float())
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(input_ids=ids).logits
        ref = reference(input_ids=ids).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(base(input_ids=ids).logits, ref, atol=1e-3)  # the adapter matters


@settings(max_examples=15, deadline=None)
@given(c=st.floats(0.01, 100), energy=st.floats(0.3, 1.0), seed=st.integers(0, 1000))
def test_resize_commutes_with_scaling(c, energy, seed):
    a = random_adapter({"x": (20, 12), "y": (9, 12)}, rank=5, decay=0.7, seed=seed, dtype=torch.float64)
    r1, rows1 = resize(c * a, rank_rule(energy=energy))
    r2, rows2 = resize(a, rank_rule(energy=energy))
    assert [r.rank_out for r in rows1] == [r.rank_out for r in rows2]
    for n in a:
        torch.testing.assert_close(r1[n].delta(torch.float64), c * r2[n].delta(torch.float64), rtol=1e-8,
                                   atol=1e-10 * c)


def test_conv_and_embedding_modules_keep_their_kind(tmp_path, cli):
    from lorakit.adapter import Adapter
    from lorakit.factors import LoraFactors

    g = torch.Generator().manual_seed(12)
    a = Adapter({
        "unet.conv": LoraFactors(torch.randn(6, 4 * 9, generator=g), torch.randn(8, 6, generator=g), 0.5,
                                 kernel=(3, 3), kind="conv"),
        "model.embed_tokens": LoraFactors(torch.randn(6, 30, generator=g), torch.randn(16, 6, generator=g), 0.5,
                                          kind="embedding"),
    })
    src = tmp_path / "in.safetensors"
    lorakit.save(a, src, format="peft")
    code, _, err = cli("resize", src, "--rank", "3", "-o", tmp_path / "out.safetensors")
    assert code == 0, err
    back = lorakit.load(tmp_path / "out.safetensors")
    assert back.info("unet.conv").kernel == (3, 3) and back.info("model.embed_tokens").kind == "embedding"
    for n in a:
        ref = _dense_truncation(a[n].delta(torch.float64), 3)
        torch.testing.assert_close(back[n].delta(torch.float64), ref, atol=1e-5, rtol=0)


def test_rank_error_names_the_file_and_the_module(tmp_path, cli):
    src = tmp_path / "in.safetensors"
    lorakit.save(_adapter(), src, format="peft")
    code, _, err = cli("resize", src, "--rank", "17", "-o", tmp_path / "out.safetensors")
    first = err.splitlines()[0]
    assert code == 1 and first.startswith(f"error: {src}: module ") and "rank 17 is outside" in first


@pytest.mark.parametrize("how", [{"rule": rank_rule(rank=3)}, {"rule": rank_rule(energy=0.9)},
                                 {"rule": rank_rule(rank=12), "expand": True}, {"budget": 2000}])
def test_stream_announces_the_ranks_it_writes_and_reads_each_module_once_for_rank(how):
    from lorakit.adapter import Adapter
    from lorakit.verbs.resize import resize_stream

    a = _adapter(dtype=torch.float64)
    reads: list[str] = []
    lazy_in = Adapter({n: (lambda n=n: reads.append(n) or a[n]) for n in a}, a.meta, a.infos())
    lazy, rows = resize_stream(lazy_in, how.get("rule"), budget=how.get("budget"), expand=how.get("expand", False))
    assert rows == {}  # nothing computed before the writer asks
    eager, eager_rows = resize(a, how.get("rule"), budget=how.get("budget"), expand=how.get("expand", False))
    for n in a:
        f = lazy[n]
        assert lazy.info(n).rank == f.rank == eager[n].rank  # the header written first is the truth
        torch.testing.assert_close(f.delta(torch.float64), eager[n].delta(torch.float64), atol=1e-12, rtol=0)
    assert [rows[n] for n in a] == eager_rows
    if how.get("budget") is None and how["rule"].kind == "rank":
        assert sorted(reads) == sorted(a)  # ranks from the headers: one read per module


def test_planning_reads_the_spectra_through_the_stream_and_only_when_the_rule_needs_them():
    from lorakit.ops.resize import needs_spectra, planned_ranks
    from lorakit.verbs.resize import resize_stream

    from ._spy import spied

    assert not needs_spectra(rank_rule(rank=2)) and needs_spectra(rank_rule(energy=0.9)) and needs_spectra(None)
    a = _adapter(dtype=torch.float64)
    reads: list[tuple[str, str]] = []
    resize_stream(spied(a, reads), rank_rule(rank=2))
    assert reads == []  # --rank K: the headers plan it
    rule = rank_rule(energy=0.9)
    resize_stream(spied(a, reads), rule)
    assert sorted(n for n, _ in reads) == sorted(a)  # the planning pass, read ahead in the background
    assert all(t.startswith("lorakit-read") for _, t in reads)
    dense = {n: torch.linalg.svdvals(a[n].delta(torch.float64))[:8] for n in a}
    assert planned_ranks(a.infos(), rule, None, dense) == {n: rule.select(dense[n]) for n in a}
    with pytest.raises(ValueError, match="needs the modules' spectra"):
        planned_ranks(a.infos(), rule, None)
