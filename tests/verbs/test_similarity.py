"""The similarity verb: factored Grams streamed through the engine, against dense inner products; planning
refuses a shape mismatch before reading; the report."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.errors import IncompatibleAdaptersError
from lorakit.ops.similarity import inner, module_gram
from lorakit.run import RunOptions
from lorakit.testing import random_adapter
from lorakit.verbs.similarity import cosine, similarity, similarity_report

from ._spy import spied

F64 = torch.float64
CPU = RunOptions.resolve("cpu")
SHAPES = {"q": (16, 12), "v": (8, 12), "o": (12, 16)}


def _adapters():
    return [random_adapter(SHAPES, r, scale=s, seed=i, dtype=F64)
            for i, (r, s) in enumerate([(3, 0.5), (5, 2.0), (2, 1.0)])]


def test_similarity_matches_dense_inner_products():
    ads = _adapters()
    sim = similarity(ads)
    dense = [torch.cat([a[n].delta(F64).flatten() for n in SHAPES]) for a in ads]
    for i in range(3):
        for j in range(3):
            want = float(dense[i] @ dense[j] / (dense[i].norm() * dense[j].norm()))
            assert float(sim.cosine()[i, j]) == pytest.approx(want, rel=1e-10, abs=1e-12)
        assert float(sim.norms()[i]) == pytest.approx(float(dense[i].norm()), rel=1e-12)
    f, g = ads[0]["q"], ads[1]["q"]
    assert inner(f, g) == pytest.approx(float((f.delta(F64) * g.delta(F64)).sum()), rel=1e-10)
    assert cosine(ads[0], 2.0 * ads[0]) == pytest.approx(1.0)
    assert cosine(ads[0], -ads[0]) == pytest.approx(-1.0)
    assert float(sim.norm_ratio()[1, 0]) == pytest.approx(float(dense[1].norm() / dense[0].norm()), rel=1e-10)


def test_module_gram_is_the_dense_gram_of_one_module():
    fs = [a["v"] for a in _adapters()]
    flat = torch.stack([f.delta(F64).flatten() for f in fs])
    torch.testing.assert_close(module_gram(fs), flat @ flat.T, rtol=1e-10, atol=1e-12)


def test_per_module_grams_sum_to_the_overall_gram_over_the_common_modules_in_order():
    ads = _adapters()
    ads[1] = ads[1].select(["v", "q"])  # "o" not common; the order is the first adapter's
    sim = similarity(ads, ["a", "b", "c"])
    assert sim.modules == ["q", "v"] and sim.names == ["a", "b", "c"]
    torch.testing.assert_close(sim.gram, sim.per_module["q"] + sim.per_module["v"], rtol=0, atol=0)
    torch.testing.assert_close(sim.per_module["q"], module_gram([a["q"] for a in ads]), rtol=0, atol=0)


def test_each_modules_factors_are_read_once_ahead_in_the_background():
    reads: list[tuple[str, str]] = []
    ads = [spied(a, reads) for a in _adapters()]
    similarity(ads)
    assert sorted(n for n, _ in reads) == sorted(list(SHAPES) * 3)
    assert all(t.startswith("lorakit-read") for _, t in reads)


def test_a_shape_mismatch_is_refused_by_module_before_anything_is_read():
    reads: list[tuple[str, str]] = []
    a = random_adapter(SHAPES, 2, seed=0)
    b = random_adapter({**SHAPES, "v": (8, 10)}, 2, seed=1)
    with pytest.raises(IncompatibleAdaptersError, match="shapes differ") as e:
        similarity([spied(a, reads), spied(b, reads)])
    assert e.value.module == "v" and reads == []
    with pytest.raises(IncompatibleAdaptersError, match="no module in common"):
        similarity([a, random_adapter({"k": (4, 4)}, 1)])


def test_report_overall_and_per_module(tmp_path):
    ads = _adapters()
    paths = []
    for i, a in enumerate(ads[:2]):
        paths.append(str(tmp_path / f"{i}.safetensors"))
        lorakit.save(a, paths[-1], format="peft")
    sim = similarity(ads[:2])
    rep = similarity_report(paths, run=CPU)
    assert rep.title == "cosine similarity over 3 common modules"
    assert rep.rows[1][0] == f"#1 {paths[1]}"
    assert rep.rows[0][3] == round(float(sim.cosine()[0, 1]), 6)
    per = similarity_report(paths, per_module=True, run=CPU)
    assert [r[0] for r in per.rows] == list(lorakit.load(paths[0]))  # the first input's order
    for m, cos, *norms in per.rows:
        assert cos == pytest.approx(float(sim.cosine(m)[0, 1]), rel=1e-6)
        assert norms == pytest.approx([float(x) for x in sim.norms(m)], rel=1e-6)
    assert per.summary["overall_cosine"] == [[r[0], *r[2:]] for r in rep.rows]
    with pytest.raises(IncompatibleAdaptersError, match="at least two"):
        similarity_report(paths[:1])
