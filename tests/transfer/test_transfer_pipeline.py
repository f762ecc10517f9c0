"""Trans-LoRA pipeline on micro models: the accept rule, the stop at exactly N, determinism, the discriminator's
isolation from target data, resume after interruption."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lorakit
from lorakit.errors import IncompatibleAdaptersError, LorakitError
from lorakit.run import RunOptions
from lorakit.transfer import discriminator, generator, pipeline, train
from lorakit.transfer.discriminator import accept
from lorakit.transfer.models import fingerprint, load_causal_lm
from lorakit.transfer.train import TrainConfig

STUDENT = TrainConfig(epochs=2, rank=2, batch_size=8, seed=0)


def run(kit, micro, out, **kw):
    kw.setdefault("samples", 10)
    kw.setdefault("generation_round", 8)
    kw.setdefault("max_new_tokens", 12)
    kw.setdefault("max_rounds", 20)
    return pipeline.run(kit, micro["source"], micro["target"], out, student_config=STUDENT, run=RunOptions.resolve("cpu"), **kw)


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_accept_rule_is_strict():
    yes = torch.tensor([-1.0, -2.0, -3.0, -0.5], dtype=torch.float64)
    no = torch.tensor([-2.0, -2.0, -1.0, -0.5 - 1e-12], dtype=torch.float64)
    assert accept(yes, no).tolist() == [True, False, False, True]


@pytest.fixture
def every_other(monkeypatch):
    """The micro discriminator, trained for one epoch, rejects nearly everything: the pipeline-mechanics tests
    see it accept every other input instead (and record the models it ran on). Its real scoring is tested in
    test_discriminator_scores_follow_the_accept_rule."""
    seen: list[str] = []
    seen_models: list[str] = []

    def keep(self, inputs):
        seen_models.append(fingerprint(self.model))
        out = [hashlib.sha256(x.encode()).digest()[0] % 2 == 0 for x in inputs]  # a pure function of x
        seen.extend(inputs)
        return out

    monkeypatch.setattr(discriminator.Discriminator, "keep", keep)
    keep.models = seen_models  # type: ignore[attr-defined]
    return seen


@pytest.mark.parametrize("n", [1, 7, 10])
def test_stops_at_exactly_n_in_generation_order(kit, micro, tmp_path, every_other, n):
    rep = run(kit, micro, tmp_path / "out", samples=n)
    rows = [json.loads(line) for line in (tmp_path / "out" / "synthetic.jsonl").read_text().splitlines()]
    accepted = [x for r in rows for x, a in zip(r["inputs"], r["accepted"]) if a]
    assert len(accepted) >= n and sum(len(r["inputs"]) for r in rows) == len(every_other)
    # the last round was needed: without it fewer than n were accepted
    assert len(accepted) - sum(rows[-1]["accepted"]) < n
    teacher = [json.loads(line)["input"] for line in (tmp_path / "out" / "teacher.jsonl").read_text().splitlines()]
    assert teacher == accepted[:n]
    assert rep.summary["accepted"] == n


def test_deterministic_under_a_seed(kit, micro, tmp_path, every_other):
    a = run(kit, micro, tmp_path / "a", seed=3)
    b = run(kit, micro, tmp_path / "b", seed=3)
    assert (tmp_path / "a" / "synthetic.jsonl").read_text() == (tmp_path / "b" / "synthetic.jsonl").read_text()
    ad, bd = lorakit.load(tmp_path / "a" / "adapter"), lorakit.load(tmp_path / "b" / "adapter")
    for name in ad:
        assert torch.equal(ad[name].A, bd[name].A) and torch.equal(ad[name].B, bd[name].B)
    c = run(kit, micro, tmp_path / "c", seed=4)
    assert (tmp_path / "c" / "synthetic.jsonl").read_text() != (tmp_path / "a" / "synthetic.jsonl").read_text()
    assert a.summary["accepted"] == b.summary["accepted"] == c.summary["accepted"]


def test_discriminator_scores_follow_the_accept_rule(kit, micro):
    model, tok = load_causal_lm(micro["source"])
    from lorakit.transfer.models import apply_adapter

    apply_adapter(model, lorakit.load(Path(kit) / "discriminator"))
    d = discriminator.Discriminator(model, tok, "revupper")
    xs = ["abc", "qwerty", "12+7", "zz"]
    yes, no = d.scores(xs)
    yes2, no2 = d.scores(xs)
    assert torch.equal(yes, yes2) and torch.equal(no, no2)
    assert torch.isfinite(yes).all() and (yes < 0).all() and (no < 0).all()
    assert d.keep(xs) == (yes > no).tolist()


def test_discriminator_never_sees_target_generated_data(kit, micro, tmp_path, monkeypatch, every_other):
    """prepare generates negatives with the source only; run trains nothing but the student, on the target,
    and leaves the kit (discriminator included) byte-identical."""
    source_fp = fingerprint(load_causal_lm(micro["source"])[0])
    target_fp = fingerprint(load_causal_lm(micro["target"])[0])
    generated_by, trained_on = [], []
    real_generate, real_train = generator.Generator.generate, train.train_lora

    def spy_generate(self, *a, **k):
        generated_by.append(fingerprint(self.model))
        return real_generate(self, *a, **k)

    def spy_train(model, *a, **k):
        trained_on.append(fingerprint(model))
        return real_train(model, *a, **k)

    monkeypatch.setattr(generator.Generator, "generate", spy_generate)
    monkeypatch.setattr(discriminator, "train_lora", spy_train)
    monkeypatch.setattr("lorakit.transfer.student.train_lora", spy_train)
    pipeline.prepare(micro["lora"], micro["source"], micro["data"], tmp_path / "kit", negatives=8,
                     generation_round=8, disc_config=TrainConfig(epochs=1, rank=2), run=RunOptions.resolve("cpu"))
    assert generated_by and set(generated_by) == {source_fp}
    assert trained_on == [source_fp]
    assert json.loads((tmp_path / "kit" / "kit.json").read_text())["discriminator"]["negatives_from"] == "source"

    generated_by.clear()
    trained_on.clear()
    before = tree_digest(Path(kit))
    run(kit, micro, tmp_path / "out")
    # the default generators take turns: the target, then the clean source (not the one with the discriminator)
    rows = [json.loads(line) for line in (tmp_path / "out" / "synthetic.jsonl").read_text().splitlines()]
    assert len(rows) >= 2 and generated_by[:2] == [target_fp, source_fp] and set(generated_by) == {target_fp,
                                                                                                   source_fp}
    assert [r["generator"] for r in rows] == [("target", "source")[k % 2] for k in range(len(rows))]
    disc_models = set(discriminator.Discriminator.keep.models)
    assert disc_models and target_fp not in disc_models and source_fp not in disc_models  # source + disc LoRA
    assert trained_on == [target_fp]  # only the student trains, on the target
    assert tree_digest(Path(kit)) == before


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("stage,at", [("generate", 1), ("student", 3)])
def test_resume_after_interruption_gives_the_same_adapter(kit, micro, tmp_path, every_other, stage, at):
    ref = tmp_path / "ref"
    run(kit, micro, ref, seed=1)
    calls = {"n": 0}

    def progress(s, done, total):
        if s == stage:
            calls["n"] += 1
            if calls["n"] == at:
                raise Interrupt

    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        run(kit, micro, out, seed=1, progress=progress)
    assert not (out / "adapter").exists()
    rep = run(kit, micro, out, seed=1)
    assert (out / "synthetic.jsonl").read_text() == (ref / "synthetic.jsonl").read_text()
    assert (out / "teacher.jsonl").read_text() == (ref / "teacher.jsonl").read_text()
    a, b = lorakit.load(ref / "adapter"), lorakit.load(out / "adapter")
    for name in a:
        torch.testing.assert_close(a[name].delta(), b[name].delta(), rtol=0, atol=0)
    assert rep.summary["accepted"] == 10


def test_resume_with_other_parameters_is_refused(kit, micro, tmp_path, every_other):
    run(kit, micro, tmp_path / "out", samples=4)
    with pytest.raises(LorakitError, match="other parameters"):
        run(kit, micro, tmp_path / "out", samples=5)


def test_kit_from_another_source_model_is_refused(kit, micro, tmp_path):
    with pytest.raises(IncompatibleAdaptersError, match="another source model"):
        pipeline.run(kit, micro["other"], micro["target"], tmp_path / "out", samples=2, run=RunOptions.resolve("cpu"))
    assert not (tmp_path / "out").exists()


def test_transferred_adapter_targets_the_target_model(kit, micro, tmp_path, every_other):
    run(kit, micro, tmp_path / "out", samples=4)
    out = lorakit.load(tmp_path / "out" / "adapter")
    tgt = load_causal_lm(micro["target"])[0]
    names = {n for n, _ in tgt.named_modules()}
    assert set(out) <= names and all(".self_attn." in n or ".mlp." in n for n in out)
    assert out.meta.base_model == micro["target"]


def test_token_level_kl_distillation_runs_and_differs_from_sequence_level(kit, micro, tmp_path, every_other):
    run(kit, micro, tmp_path / "seq", samples=4)
    rep = run(kit, micro, tmp_path / "kl", samples=4, token_kl=True)
    assert rep.summary["distillation"] == "token-kl"
    a, b = lorakit.load(tmp_path / "seq" / "adapter"), lorakit.load(tmp_path / "kl" / "adapter")
    assert set(a) == set(b)
    assert any(not torch.equal(a[n].B, b[n].B) for n in a)


def test_token_level_kl_needs_a_shared_tokenizer(micro):
    from lorakit.transfer.student import train_student

    model, tok = load_causal_lm(micro["target"])

    class OtherTok:
        def get_vocab(self):
            return {"a": 0}

    with pytest.raises(LorakitError, match="share a tokenizer"):
        train_student(model, tok, ["ab"], ["a"], STUDENT, teacher_model=model, teacher_tok=OtherTok())


@given(st.lists(st.floats(-50, 50, allow_nan=False), min_size=1, max_size=40), st.floats(0, 1))
@settings(max_examples=200, deadline=None)
def test_calibrated_threshold_keeps_the_asked_share_of_real_inputs(odds, recall):
    x = torch.tensor(odds, dtype=torch.float64)
    tau = discriminator.calibrate_threshold(x, recall)
    need = math.ceil(recall * len(odds) - 1e-9)  # recall·n up to rounding (0.9·10 is 9.000000000000002)
    kept = accept(x, torch.zeros_like(x), tau)
    assert tau <= 0
    assert int(kept.sum()) >= need
    if int((x > 0).sum()) >= need:  # the paper's rule already keeps enough: it is left as it is
        assert tau == 0
    else:  # the largest such threshold: raising it to the next float loses a real input it needs
        nxt = math.nextafter(tau, math.inf)
        assert int(accept(x, torch.zeros_like(x), nxt).sum()) < need


def test_threshold_zero_is_the_papers_rule_and_a_negative_one_relaxes_it():
    yes = torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64)
    no = torch.tensor([-2.0, -2.0, -1.0], dtype=torch.float64)
    assert accept(yes, no, 0.0).tolist() == (yes > no).tolist()
    assert accept(yes, no, -2.0).tolist() == [True, True, False]  # log-odds 1, 0, -2: -2 > -2 is false
    with pytest.raises(LorakitError):
        discriminator.calibrate_threshold(yes, 1.5)


def test_prepare_calibrates_on_held_out_inputs_and_run_uses_the_kits_threshold(kit, micro, tmp_path, monkeypatch):
    info = json.loads((Path(kit) / "kit.json").read_text())["discriminator"]
    assert info["held_out"]["real"] == 48 // 4 and info["real"] == 48 - 12
    assert info["threshold"] <= 0 and info["accepts_real"] >= 0.9
    assert (info["threshold"] == 0) == (info["accepts_real_at_zero"] >= 0.9)
    seen = []
    real_keep = discriminator.Discriminator.keep

    def spy(self, inputs):
        seen.append(self.threshold)
        return real_keep(self, inputs)

    monkeypatch.setattr(discriminator.Discriminator, "keep", spy)
    run(kit, micro, tmp_path / "out", samples=2)
    assert seen and set(seen) == {info["threshold"]}


def test_target_alone_as_generator_is_trans_loras_setting(kit, micro, tmp_path, monkeypatch, every_other):
    target_fp = fingerprint(load_causal_lm(micro["target"])[0])
    generated_by = []
    real_generate = generator.Generator.generate

    def spy_generate(self, *a, **k):
        generated_by.append(fingerprint(self.model))
        return real_generate(self, *a, **k)

    monkeypatch.setattr(generator.Generator, "generate", spy_generate)
    run(kit, micro, tmp_path / "out", generator="target")
    rows = [json.loads(line) for line in (tmp_path / "out" / "synthetic.jsonl").read_text().splitlines()]
    assert len(rows) >= 2 and {r["generator"] for r in rows} == {"target"} and set(generated_by) == {target_fp}
    with pytest.raises(LorakitError, match="other parameters"):  # the generators are part of the run's identity
        run(kit, micro, tmp_path / "out")
    with pytest.raises(LorakitError, match="no generator"):
        run(kit, micro, tmp_path / "none", generator=[])
