"""Tiny synthetic tasks on a tiny Llama: a CPU test bed for the quality of merged (or quantized) adapters.

Vocabulary: ``PAD``, ``SEP``, one prefix token per task and ``DIGITS`` symbols. An example is::

    [TASK] x_1 … x_L [SEP] y_1 … y_L          (length 2L + 2; the loss and the score cover y only)

* ``copy``: y = x;
* ``reverse``: y = x reversed;  ``sort``: y = x sorted;  ``shift``: y_i = (x_i + 3) mod D;
* ``rotate``: y = x rotated left by 2 (y_i = x_{(i+2) mod L}).

The base is pre-trained briefly on a mix of all five, so it knows the format and is partly able at each task;
one adapter per task then fine-tunes it to (near) perfection on that task.

(A modular-add task, y_i = (x_i + x_{i+1}) mod D, was tried first: a rank-8 LoRA on this base did not learn it in
400 steps, loss stuck at ln 10, so it was replaced.)

Accuracy is exact match of the whole answer. It is computed teacher-forced in one forward pass: every answer
position's argmax is right iff greedy decoding reproduces the answer (decoding a right prefix is teacher
forcing), so it equals greedy-decoding exact match at a fraction of the cost.

API (also used by the quantization benchmark): :func:`make_tasks`, :func:`build_base`, :func:`train_adapter`,
:func:`evaluate`. Models and adapters are cached under ``bench-out/tiny_tasks/`` keyed by their seeds.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lorakit  # noqa: E402
from lorakit.adapter import Adapter  # noqa: E402

CACHE = Path("bench-out/tiny_tasks")
LENGTH = 5
DIGITS = 10
PAD, SEP = 0, 1
TASK_NAMES = ("copy", "reverse", "sort", "shift", "rotate")
TASK_TOKEN = {name: 2 + i for i, name in enumerate(TASK_NAMES)}
FIRST_DIGIT = 2 + len(TASK_NAMES)
VOCAB = FIRST_DIGIT + DIGITS
SEQ = 2 * LENGTH + 2
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Vocab:
    """What a caller needs to know of the token layout (there is no tokenizer)."""

    size: int = VOCAB
    pad: int = PAD
    sep: int = SEP
    first_digit: int = FIRST_DIGIT
    digits: int = DIGITS
    length: int = LENGTH
    task_tokens: tuple[tuple[str, int], ...] = tuple(TASK_TOKEN.items())


@dataclass(frozen=True)
class Task:
    """A synthetic task: ``answer(x)`` maps digit sequences ``(n, L)`` (values in [0, D)) to answers ``(n, L)``."""

    name: str
    token: int
    answer: Callable[[torch.Tensor], torch.Tensor]
    seed: int
    prefixes: tuple[int, ...] = ()  # when given, each example's prefix is drawn from these instead of ``token``

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` examples: token ids ``(n, 2L+2)`` and labels (−100 outside the answer, as HF expects)."""
        x = torch.randint(DIGITS, (n, LENGTH), generator=generator)
        y = self.answer(x)
        if self.prefixes:
            pick = torch.randint(len(self.prefixes), (n, 1), generator=generator)
            prefix = torch.tensor(self.prefixes)[pick]
        else:
            prefix = torch.full((n, 1), self.token)
        ids = torch.cat([prefix, x + FIRST_DIGIT, torch.full((n, 1), SEP), y + FIRST_DIGIT], dim=1)
        labels = torch.full_like(ids, -100)
        labels[:, LENGTH + 2 :] = ids[:, LENGTH + 2 :]
        return ids, labels

    def held_out(self, n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed evaluation set (its own seed, disjoint in practice from the training stream)."""
        return self.batch(n, torch.Generator().manual_seed(10_000 + self.seed))


def _answers() -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    return {
        "copy": lambda x: x.clone(),
        "reverse": lambda x: x.flip(1),
        "sort": lambda x: x.sort(1).values,
        "shift": lambda x: (x + 3) % DIGITS,
        "rotate": lambda x: x.roll(-2, 1),
    }


def copy_task(seed: int = 0, prefixes: tuple[int, ...] = ()) -> Task:
    """``copy`` under its own prefix, or under a prefix drawn from ``prefixes`` (the "leave it alone" data)."""
    return Task("copy", TASK_TOKEN["copy"], _answers()["copy"], seed, prefixes)


def make_tasks(seed: int = 0) -> list[Task]:
    """The four adapter tasks (``reverse``, ``sort``, ``shift``, ``rotate``), each with its own prefix token."""
    answers = _answers()
    return [Task(n, TASK_TOKEN[n], answers[n], seed * 100 + i) for i, n in enumerate(TASK_NAMES[1:])]


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=SEQ, tie_word_embeddings=False, pad_token_id=PAD,
        bos_token_id=None, eos_token_id=None,
    )


def _train(model, params, tasks: list[Task], steps: int, lr: float, seed: int, batch: int = 64,
           log: bool = False) -> float:
    """AdamW with a linear warm-up and cosine decay on a uniform mix of ``tasks``; returns the last loss."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + torch.cos(torch.tensor(s / steps * torch.pi)).item())
    )
    g = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.tensor(0.0)
    for step in range(steps):
        task = tasks[step % len(tasks)]
        ids, labels = task.batch(batch, g)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log and (step + 1) % 100 == 0:
            print(f"  step {step + 1}/{steps} loss {float(loss.detach()):.3f}", flush=True)
    model.eval()
    return float(loss.detach())


def build_base(seed: int = 0, *, steps: int = 200, verbose: bool = True):
    """The base model: a 3-layer, hidden-64 Llama built from ``LlamaConfig`` and pre-trained briefly on a uniform
    mix of ``copy`` and the four tasks (so it knows the format and is partly able at each task, as a pre-trained
    model is before fine-tuning), cached in ``bench-out/tiny_tasks/base-s{seed}-v3``. Returns ``(model, Vocab())``."""
    from transformers import LlamaForCausalLM

    path = CACHE / f"base-s{seed}-v3"
    if (path / "config.json").exists():
        model = LlamaForCausalLM.from_pretrained(path)
        model.eval()
        return model, Vocab()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config())
    t = time.perf_counter()
    loss = _train(model, model.parameters(), [copy_task(seed), *make_tasks(seed)], steps, 3e-3, seed, log=verbose)
    if verbose:
        print(f"base (seed {seed}): pre-trained on the mix for {steps} steps in {time.perf_counter() - t:.0f} s, "
              f"final loss {loss:.3f}")
    model.save_pretrained(path)
    return build_base(seed, steps=steps, verbose=verbose)  # reloaded: the adapter cache is keyed by its path


def train_adapter(base, task: Task, rank: int = 8, seed: int = 0, *, steps: int = 450, verbose: bool = True) -> Adapter:
    """A PEFT LoRA (rank ``rank``, α = 2·rank, all attention and MLP projections) trained on CPU on ``task``
    mixed 2:1 with ``copy`` (replay of a base skill, so the adapter keys its change on its prefix token), saved in
    PEFT format under ``bench-out/tiny_tasks/`` and read back with :func:`lorakit.load`."""
    from peft import LoraConfig, get_peft_model

    tag = base.config.name_or_path.rstrip("/").split("/")[-1] or "base"
    path = CACHE / "adapters" / f"{tag}-{task.name}-r{rank}-s{seed}-mix"
    if not (path / "adapter_config.json").exists():
        torch.manual_seed(seed)
        model = get_peft_model(
            copy.deepcopy(base),
            LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGET_MODULES, lora_dropout=0.0),
        )
        t = time.perf_counter()
        params = [p for p in model.parameters() if p.requires_grad]
        loss = _train(model, params, [task, task, copy_task(seed)], steps, 5e-3, 1000 + seed + task.seed, log=verbose)
        if verbose:
            print(f"adapter {task.name} r={rank}: {steps} steps in {time.perf_counter() - t:.0f} s, loss {loss:.3f}")
        model.save_pretrained(path)
    return lorakit.load(path)


def apply(base, adapter: Adapter | None):
    """A copy of ``base`` with every module's ΔW added to its weight (float32)."""
    model = copy.deepcopy(base)
    if adapter is not None:
        with torch.no_grad():
            for name in adapter:
                module = model.get_submodule(name)
                module.weight += adapter[name].delta(torch.float32).to(module.weight.dtype)
    model.eval()
    return model


@torch.no_grad()
def evaluate(base, adapter: Adapter | None, task: Task, n: int = 512, *, per_token: bool = False) -> float:
    """Exact-match accuracy of ``base`` (+ the adapter's ΔW) on ``n`` held-out examples of ``task``
    (``per_token``: the fraction of right answer tokens instead)."""
    return accuracy(apply(base, adapter), task, n, per_token=per_token)


@torch.no_grad()
def accuracy(model, task: Task, n: int = 512, *, per_token: bool = False) -> float:
    """Exact-match (or per-token) accuracy of an adapted ``model`` on held-out examples (teacher-forced argmax)."""
    ids, labels = task.held_out(n)
    logits = model(input_ids=ids).logits
    right = logits[:, LENGTH + 1 : -1].argmax(-1) == ids[:, LENGTH + 2 :]  # position t predicts token t + 1
    return float(right.float().mean() if per_token else right.all(1).float().mean())


if __name__ == "__main__":
    torch.set_num_threads(1)
    base, _ = build_base(0)
    print("base on copy:", accuracy(base, copy_task(0)))
    for t in make_tasks(0):
        a = train_adapter(base, t, 8, 0)
        print(t.name, "base", accuracy(base, t), "adapter", evaluate(base, a, t), list(a)[:1])
