"""The merge-quality test bed: task data layout, and ΔW application agreeing with PEFT's own forward pass."""

from __future__ import annotations

import copy

import pytest
import torch

from benchmarks import tiny_tasks as tt


def test_tasks_are_distinct_and_batches_are_laid_out():
    tasks = tt.make_tasks(0)
    assert len({t.token for t in tasks}) == len(tasks) == 4
    x = torch.tensor([[3, 1, 4, 1, 5]])
    answers = {t.name: t.answer(x)[0].tolist() for t in tasks}
    assert answers == {"reverse": [5, 1, 4, 1, 3], "sort": [1, 1, 3, 4, 5], "shift": [6, 4, 7, 4, 8],
                       "rotate": [4, 1, 5, 3, 1]}
    ids, labels = tasks[1].batch(4, torch.Generator().manual_seed(0))
    assert ids.shape == (4, tt.SEQ) and bool((ids[:, 0] == tasks[1].token).all()) and bool((ids[:, 6] == tt.SEP).all())
    digits = ids[:, 1:6] - tt.FIRST_DIGIT
    assert torch.equal(ids[:, 7:] - tt.FIRST_DIGIT, digits.sort(1).values)
    assert bool((labels[:, :7] == -100).all()) and torch.equal(labels[:, 7:], ids[:, 7:])
    assert torch.equal(tasks[0].held_out(8)[0], tasks[0].held_out(8)[0])


def test_applied_delta_matches_peft_forward(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    import lorakit

    torch.manual_seed(0)
    base = LlamaForCausalLM(tt._config()).eval()
    cfg = LoraConfig(r=4, lora_alpha=12, target_modules=tt.TARGET_MODULES, init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(base), cfg).eval()
    peft_model.save_pretrained(tmp_path / "a")
    adapter = lorakit.load(tmp_path / "a")
    ids, _ = tt.make_tasks(0)[0].held_out(16)
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = tt.apply(base, adapter)(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, want, atol=1e-3)


def test_latent_task_mix_answers_the_task_for_its_share_and_copies_otherwise():
    task = tt.Task("reverse", tt.TASK_TOKEN["reverse"], lambda x: x.flip(1), seed=0, mix=0.3)
    ids, _ = task.batch(4000, torch.Generator().manual_seed(1))
    x, y = ids[:, 1:6], ids[:, 7:]
    is_task, is_copy = (y == x.flip(1)).all(1), (y == x).all(1)
    assert bool((is_task | is_copy).all())
    share = float((is_task & ~is_copy).float().mean() / (~(x == x.flip(1)).all(1)).float().mean())
    assert abs(share - 0.3) < 0.03


def test_kl_rehearsal_targets_are_the_base_distribution_and_its_loss_vanishes_on_the_base():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(tt._config()).eval()
    other = LlamaForCausalLM(tt._config()).eval()
    data = tt.BaseDistribution(base, (tt.TASK_TOKEN["sort"],), seed=0, pool=64)
    ids, targets = data.batch(32, torch.Generator().manual_seed(0))
    assert targets.shape == (32, tt.LENGTH, tt.VOCAB) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.logsumexp(-1), torch.zeros(32, tt.LENGTH), atol=1e-5, rtol=0)
    answers = ids[:, tt.ANSWER:]
    assert bool(((answers >= tt.FIRST_DIGIT) & (answers < tt.FIRST_DIGIT + tt.DIGITS)).all())
    with torch.no_grad():
        assert float(tt._loss(base, ids, targets)) < 1e-6
        assert float(tt._loss(other, ids, targets)) > 1e-3
    labels = torch.full_like(ids, -100)
    labels[:, tt.ANSWER:] = answers  # integer labels still take the cross-entropy path
    with torch.no_grad():
        torch.testing.assert_close(tt._loss(base, ids, labels), base(input_ids=ids, labels=labels).loss)


def test_shared_start_continues_each_adapter_from_s_and_rehearses_base_plus_s(tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(tt._config()).eval()
    monkeypatch.setattr(tt, "CACHE", tmp_path)
    monkeypatch.setattr(tt, "SHARED_STEPS", 3)
    task = tt.make_tasks(0)[1]
    seen: dict[str, object] = {}
    fit, rehearsal = tt._fit, tt.rehearsal

    def spy_fit(model, data, steps, seed, path, what, verbose):  # the PEFT model as training starts
        if what.startswith("adapter"):
            seen["start"] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        fit(model, data, steps, seed, path, what, verbose)

    def spy_rehearsal(start, t, seed=0):
        seen["targets_from"] = start
        return rehearsal(start, t, seed)

    monkeypatch.setattr(tt, "_fit", spy_fit)
    monkeypatch.setattr(tt, "rehearsal", spy_rehearsal)
    adapter = tt.train_adapter(base, task, rank=2, steps=2, verbose=False)
    shared = tt.train_shared(base, rank=2, verbose=False)
    names = sorted(p.name for p in (tmp_path / "adapters").iterdir())
    assert names == ["base-shared-r2-s0-reh3-lr0.005-wd0-Lall-qkv",
                     "base-sort-r2-s0-reh2-lr0.005-wd0-Lall-qkv-kl-from-sh3"]
    # the task adapter started at S's weights exactly, and trained away from them
    start = seen["start"]
    assert isinstance(start, dict)
    for m in shared:
        prefix = f"base_model.model.{m}."
        assert torch.equal(start[prefix + "lora_A.default.weight"], shared[m].A)
        assert torch.equal(start[prefix + "lora_B.default.weight"], shared[m].B)
    assert any(not torch.allclose(adapter[m].delta(), shared[m].delta()) for m in shared)
    assert bool(shared[next(iter(shared))].B.abs().sum() > 0)  # S trained (PEFT initialises B = 0)
    # the KL rehearsal's targets are base + S, not the base
    start_model = seen["targets_from"]
    m = next(iter(shared))
    want = base.get_submodule(m).weight + shared[m].delta()
    torch.testing.assert_close(start_model.get_submodule(m).weight, want)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="steps must be > 0"):
        tt.train_shared(base, rank=2, steps=0)
