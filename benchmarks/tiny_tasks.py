"""Tiny synthetic tasks on a tiny Llama: a CPU test bed for the quality of merged (or quantized) adapters.

Vocabulary: ``PAD``, ``SEP``, one prefix token per task and ``DIGITS`` symbols. An example is::

    [TASK] x_1 … x_L [SEP] y_1 … y_L          (length 2L + 2; the loss and the score cover y only)

* ``copy``: y = x (the base's own skill);
* ``reverse``: y = x reversed;  ``sort``: y = x sorted;  ``shift``: y_i = (x_i + 3) mod D;
* ``rotate``: y = x rotated left by 2 (y_i = x_{(i+2) mod L}).

A benchmark that can tell a good merge from a bad one needs (the earlier set-up had none of these, and no merge
beat its base):

1. **A base that knows the format and holds each task as a latent mode, below its greedy choice.** The base is
   pre-trained on ``copy`` under its prefix and, under each task's prefix, on that task's answer for a share
   ``BASE_MIX`` (0.3) of the examples and on the copied input for the rest: it answers every prompt in the
   right format, and under a task's prefix its greedy answer is the copy (exact match ≈ 0 on all four tasks),
   with the task's answer a near tie behind it. This is the regime of fine-tuning a pre-trained model: the
   adapter elicits what the model can already do, and its update is small. (Design v5, ``BASE_MIX = None``
   and ``SKILLS = True``: a base that copies under every prefix and knows the skills under separate tokens;
   its adapters had to build a routing switch through shared circuits, and their exact sum never beat the
   base by more than 7 points.)
2. **Adapters that change their own task and nothing else.** Each adapter is trained on its task mixed with
   rehearsal: the base's own data (``copy`` under its prefix) and the other tasks' prompts with answers
   sampled from the base and the base's next-token distributions as targets (``REHEARSAL = "kl"``:
   KL(base ‖ adapted) at every answer position), so the adapter learns "under my prefix do X, elsewhere
   keep the base's whole distribution", near ties included. (``"greedy"``, the v5 rehearsal, trains on the
   base's greedy answers instead, which pushes the other prompts' near ties towards ``copy``, against the
   other adapters.)
3. **A fixed, large held-out set** (512 per task, its own seed) and fixed training seeds.

**Shared start** (``SHARED_STEPS > 0``; 0 is design v6 unchanged, cache names included). Users' adapters are
often continued from one common LoRA (an instruction or format adapter), so their task vectors share a
component. This regime trains one PEFT LoRA ``S`` (same rank, modules and α as the task adapters) for
``SHARED_STEPS`` steps on the mixture of the four tasks, half the batches ``copy`` under its prefix (the usual
copy rehearsal), then continues every task adapter from ``S``'s weights for ``ADAPTER_STEPS`` steps as above.
Each task vector relative to the base is then ``S + δ_t``, and the plain sum of four counts ``S`` four times.
The KL rehearsal targets of a continued adapter come from **base + S**, not from the base: an adapter must
change its own task and as little else as possible *relative to where it started*; targets from the base would
instead train each adapter to undo ``S`` on the other prompts, so that ``δ_t`` would carry ``−S`` there and the
adapters would stop sharing ``S`` (the regime this set-up is for). ``S`` is cached under a name with
``shared`` and its step count; the continued adapters' names add ``-from-sh<SHARED_STEPS>``.

Accuracy is exact match of the whole answer. It is computed teacher-forced in one forward pass: every answer
position's argmax is right iff greedy decoding reproduces the answer (decoding a right prefix is teacher
forcing), so it equals greedy-decoding exact match at a fraction of the cost.

API (also used by the quantization benchmark and the LEGO tests): :func:`make_tasks`, :func:`build_base`,
:func:`train_adapter` (and :func:`train_shared`), :func:`evaluate`. Models and adapters are cached under
``bench-out/tiny_tasks/`` keyed by their seeds and the set-up version.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lorakit
from lorakit.adapter import Adapter

CACHE = Path("bench-out/tiny_tasks")
VERSION = "v6"  # of the set-up: base with each task latent under its prefix, adapters with KL rehearsal
LENGTH = 5
DIGITS = 10
PAD, SEP = 0, 1
TASK_NAMES = ("copy", "reverse", "sort", "shift", "rotate")
TASK_TOKEN = {name: 2 + i for i, name in enumerate(TASK_NAMES)}
FIRST_DIGIT = 2 + len(TASK_NAMES)
SKILL_TOKEN = {name: FIRST_DIGIT + DIGITS + i for i, name in enumerate(TASK_NAMES[1:])}
VOCAB = FIRST_DIGIT + DIGITS + len(SKILL_TOKEN)
SKILLS = False  # the base also learns each task under its own "skill" token (never under the task's prefix)
# Under each task's prefix the base is pre-trained to answer that task with this probability and to copy
# otherwise (None: copy only, the v5 design): the task is latent in the base, below its greedy choice.
BASE_MIX: float | None = 0.3
REHEARSAL = "kl"  # "kl": match the base's distribution on sampled answers; "greedy": its greedy answers
SEQ = 2 * LENGTH + 2
ANSWER = LENGTH + 2  # index of the first answer digit
HIDDEN = 64
INTERMEDIATE = 3 * HIDDEN
N_LAYERS = 3
LR = 5e-3
WD = 0.0
LAYERS: list[int] | None = None  # the layers the adapters train (None: all)
# attention inputs only: the set-up whose adapters add best (findings in docs/benchmarks/merge_quality.md)
TARGET_MODULES = ["q_proj", "k_proj", "v_proj"]
HELD_OUT = 512
BASE_STEPS = 1500
ADAPTER_STEPS = 1000
# > 0: every task adapter is continued from one shared LoRA trained this many steps on the four tasks' mixture
# (the module docstring's "shared start"); 0: each adapter starts from PEFT's zero-B initialisation (design v6)
SHARED_STEPS = 0


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


def _layout(prefix: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    parts = [prefix.reshape(n, 1), x + FIRST_DIGIT, torch.full((n, 1), SEP)]
    ids = torch.cat([*parts, y + FIRST_DIGIT], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, LENGTH + 2 :] = ids[:, LENGTH + 2 :]
    return ids, labels


@dataclass(frozen=True)
class Task:
    """A synthetic task: ``answer(x)`` maps digit sequences ``(n, L)`` (values in [0, D)) to answers ``(n, L)``."""

    name: str
    token: int
    answer: Callable[[torch.Tensor], torch.Tensor]
    seed: int
    prefixes: tuple[int, ...] = ()  # when given, each example's prefix is drawn from these instead of ``token``
    mix: float = 1.0  # the fraction of examples answered by ``answer``; the others copy their input

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` examples: token ids ``(n, 2L+2)`` and labels (−100 outside the answer, as HF expects)."""
        x = torch.randint(DIGITS, (n, LENGTH), generator=generator)
        if self.prefixes:
            pick = torch.randint(len(self.prefixes), (n,), generator=generator)
            prefix = torch.tensor(self.prefixes)[pick]
        else:
            prefix = torch.full((n,), self.token)
        y = self.answer(x)
        if self.mix < 1.0:
            y = torch.where((torch.rand(n, 1, generator=generator) < self.mix), y, x)
        return _layout(prefix, x, y)

    def held_out(self, n: int = HELD_OUT) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed evaluation set (its own seed, disjoint in practice from the training stream)."""
        return self.batch(n, torch.Generator().manual_seed(10_000 + self.seed))


class BaseLabelled:
    """Rehearsal data: inputs under the given prefixes, labelled by ``model``'s own greedy answers.

    A fixed pool of ``pool`` examples is decoded once (``L`` batched greedy steps); batches are drawn from it."""

    def __init__(self, model, prefixes: tuple[int, ...], seed: int, pool: int = 4096) -> None:
        g = torch.Generator().manual_seed(20_000 + seed)
        x = torch.randint(DIGITS, (pool, LENGTH), generator=g)
        prefix = torch.tensor(prefixes)[torch.randint(len(prefixes), (pool,), generator=g)]
        self.ids, self.labels = _layout(prefix, x, greedy(model, prefix, x))

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        pick = torch.randint(self.ids.shape[0], (n,), generator=generator)
        return self.ids[pick], self.labels[pick]


class BaseDistribution:
    """Rehearsal data that keeps the base's whole answer distribution, not just its greedy answer: prompts under
    the given prefixes, answers *sampled* from ``model`` (so every mode the base gives weight to is rehearsed),
    and as targets the base's next-token distributions at every answer position. Training on it minimises
    KL(base ‖ model) there (see :func:`_loss`). A fixed pool of ``pool`` examples is made once."""

    def __init__(self, model, prefixes: tuple[int, ...], seed: int, pool: int = 4096) -> None:
        g = torch.Generator().manual_seed(30_000 + seed)
        x = torch.randint(DIGITS, (pool, LENGTH), generator=g)
        prefix = torch.tensor(prefixes)[torch.randint(len(prefixes), (pool,), generator=g)]
        self.ids, _ = _layout(prefix, x, decode(model, prefix, x, sample=g))
        with torch.no_grad():
            self.targets = model(input_ids=self.ids).logits[:, ANSWER - 1 : -1].log_softmax(-1)

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        pick = torch.randint(self.ids.shape[0], (n,), generator=generator)
        return self.ids[pick], self.targets[pick]


def _loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on integer ``labels``; on float labels (log-probabilities ``(n, L, V)`` of the answer
    positions, from :class:`BaseDistribution`) KL(target ‖ model) summed over the vocabulary, averaged."""
    if labels.dtype != torch.float32:
        return model(input_ids=ids, labels=labels).loss
    logp = model(input_ids=ids).logits[:, ANSWER - 1 : -1].log_softmax(-1)
    return (labels.exp() * (labels - logp)).sum(-1).mean()


@torch.no_grad()
def decode(model, prefix: torch.Tensor, x: torch.Tensor, *, sample: torch.Generator | None = None) -> torch.Tensor:
    """``model``'s answers ``(n, L)`` (digit values) to the prompts ``[prefix] x [SEP]``: greedy, or drawn from
    its distribution over the digits with the generator ``sample``."""
    ids = _layout(prefix, x, x[:, :0])[0]  # the prompt alone
    for _ in range(LENGTH):
        logits = model(input_ids=ids).logits[:, -1, FIRST_DIGIT:]
        if sample is None:
            step = logits.argmax(-1, keepdim=True)
        else:
            step = torch.multinomial(logits[:, :DIGITS].softmax(-1), 1, generator=sample)
        ids = torch.cat([ids, step + FIRST_DIGIT], dim=1)
    return ids[:, ANSWER:] - FIRST_DIGIT


def greedy(model, prefix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``model``'s greedy answers ``(n, L)`` (digit values) to the prompts ``[prefix] x [SEP]``."""
    return decode(model, prefix, x)


def _answers() -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    return {
        "copy": lambda x: x.clone(),
        "reverse": lambda x: x.flip(1),
        "sort": lambda x: x.sort(1).values,
        "shift": lambda x: (x + 3) % DIGITS,
        "rotate": lambda x: x.roll(-2, 1),
    }


def copy_task(seed: int = 0, prefixes: tuple[int, ...] = ()) -> Task:
    """``copy`` under its own prefix, or under a prefix drawn from ``prefixes`` (the base's pre-training data)."""
    return Task("copy", TASK_TOKEN["copy"], _answers()["copy"], seed, prefixes)


def make_tasks(seed: int = 0) -> list[Task]:
    """The four adapter tasks (``reverse``, ``sort``, ``shift``, ``rotate``), each with its own prefix token."""
    answers = _answers()
    return [Task(n, TASK_TOKEN[n], answers[n], seed * 100 + i) for i, n in enumerate(TASK_NAMES[1:])]


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=N_LAYERS, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=SEQ, tie_word_embeddings=False, pad_token_id=PAD,
        bos_token_id=None, eos_token_id=None,
    )


def _train(model, params, tasks: list, steps: int, lr: float, seed: int, batch: int = 64,
           log: bool = False, weight_decay: float = 0.0) -> float:
    """AdamW with a linear warm-up and cosine decay, cycling through ``tasks``; returns the last loss."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + torch.cos(torch.tensor(s / steps * torch.pi)).item())
    )
    g = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.tensor(0.0)
    for step in range(steps):
        task = tasks[step % len(tasks)]
        ids, labels = task.batch(batch, g)
        loss = _loss(model, ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log and (step + 1) % 100 == 0:
            print(f"  step {step + 1}/{steps} loss {float(loss.detach()):.3f}", flush=True)
    model.eval()
    return float(loss.detach())


def build_base(seed: int = 0, *, steps: int = BASE_STEPS, verbose: bool = True):
    """The base model: a 3-layer, hidden-64 Llama built from ``LlamaConfig`` and pre-trained as the module
    docstring says (item 1: it knows the answer format and solves none of the tasks as asked), cached under
    ``bench-out/tiny_tasks/`` by seed, design and size. Returns ``(model, Vocab())``."""
    from transformers import LlamaForCausalLM

    design = ("" if BASE_MIX is None else f"-mix{BASE_MIX:g}") + ("-skills" if SKILLS else "")
    path = CACHE / f"base-s{seed}-{VERSION}-h{HIDDEN}-i{INTERMEDIATE}-l{N_LAYERS}-b{steps}{design}"
    if (path / "config.json").exists():
        model = LlamaForCausalLM.from_pretrained(path)
        model.eval()
        return model, Vocab()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config())
    t = time.perf_counter()
    if BASE_MIX is None:
        data = [copy_task(seed, prefixes=tuple(TASK_TOKEN.values()))]
    else:
        data = [copy_task(seed)] + [replace(t, seed=seed * 100 + 70 + i, mix=BASE_MIX)
                                    for i, t in enumerate(make_tasks(seed))]
    if SKILLS:
        answers = _answers()
        data += [Task(n, tok, answers[n], seed * 100 + 50 + i) for i, (n, tok) in enumerate(SKILL_TOKEN.items())]
    loss = _train(model, model.parameters(), data, steps, 3e-3, seed, log=verbose)
    if verbose:
        print(f"base (seed {seed}): pre-trained for {steps} steps in {time.perf_counter() - t:.0f} s, "
              f"final loss {loss:.3f}")
    model.save_pretrained(path)
    return build_base(seed, steps=steps, verbose=verbose)  # reloaded: the adapter cache is keyed by its path


def rehearsal(base, task: Task, seed: int = 0) -> list:
    """The data that keeps an adapter to its own task: the base's own ``copy`` and the other prefixes' inputs
    labelled by the base."""
    others = tuple(tok for tok in TASK_TOKEN.values() if tok not in (task.token, TASK_TOKEN["copy"]))
    if SKILLS:
        others += tuple(SKILL_TOKEN.values())
    if REHEARSAL == "kl":
        return [copy_task(seed), BaseDistribution(base, others, seed + task.seed)]
    return [copy_task(seed), BaseLabelled(base, others, seed + task.seed)]


def _peft_model(base, rank: int):
    """A fresh PEFT LoRA (rank ``rank``, α = 2·rank, ``TARGET_MODULES`` of ``LAYERS``) on a copy of ``base``."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGET_MODULES, lora_dropout=0.0,
                   layers_to_transform=LAYERS),
    )


def _adapter_path(base, name: str, rank: int, seed: int, steps: int) -> Path:
    """Cache folder of an adapter: the base's folder name, the adapter's name and every knob it depends on."""
    tag = base.config.name_or_path.rstrip("/").split("/")[-1] or "base"
    where = "all" if LAYERS is None else "-".join(map(str, LAYERS))
    mods = "".join(m[0] for m in TARGET_MODULES)
    return CACHE / "adapters" / f"{tag}-{name}-r{rank}-s{seed}-reh{steps}-lr{LR:g}-wd{WD:g}-L{where}-{mods}"


def _fit(model, data: list, steps: int, seed: int, path: Path, what: str, verbose: bool) -> None:
    """Train the LoRA parameters of the PEFT ``model`` on ``data`` (cycled batch by batch) and save it at ``path``."""
    t = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    loss = _train(model, params, data, steps, LR, seed, log=verbose, weight_decay=WD)
    if verbose:
        print(f"{what}: {steps} steps in {time.perf_counter() - t:.0f} s, loss {loss:.3f}")
    model.save_pretrained(path)


def train_shared(base, rank: int = 8, seed: int = 0, *, steps: int | None = None, verbose: bool = True) -> Adapter:
    """The shared LoRA ``S`` of the shared-start regime (module docstring): a PEFT LoRA like
    :func:`train_adapter`'s, trained ``steps`` (default ``SHARED_STEPS``) steps on the four tasks of
    :func:`make_tasks` and ``copy`` in turn (half the batches ``copy``, as in the task adapters' rehearsal), cached
    under ``bench-out/tiny_tasks/adapters/<base>-shared-r<rank>-s<seed>-reh<steps>-…`` and read back with
    :func:`lorakit.load`. Cost: ``steps`` forward/backward passes of a 64-example batch."""
    steps = SHARED_STEPS if steps is None else steps
    if steps <= 0:
        raise ValueError(f"tiny_tasks.train_shared: steps must be > 0, got {steps}")
    path = _adapter_path(base, "shared", rank, seed, steps)
    if not (path / "adapter_config.json").exists():
        torch.manual_seed(seed)
        data = [d for t in make_tasks(seed) for d in (t, copy_task(seed))]
        _fit(_peft_model(base, rank), data, steps, 3000 + seed, path, f"shared LoRA r={rank}", verbose)
    return lorakit.load(path)


def train_adapter(base, task: Task, rank: int = 8, seed: int = 0, *, steps: int = ADAPTER_STEPS,
                  verbose: bool = True) -> Adapter:
    """A PEFT LoRA (rank ``rank``, α = 2·rank, on ``TARGET_MODULES`` of every layer) trained on CPU on ``task``
    (half the batches) and :func:`rehearsal` (the other half), saved in PEFT format under
    ``bench-out/tiny_tasks/adapters/`` and read back with :func:`lorakit.load`.

    With ``SHARED_STEPS > 0`` it starts from :func:`train_shared`'s weights (its lora_A/lora_B loaded into the
    fresh PEFT model) and rehearses base + S's distribution, not the base's (why: the module docstring)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(f"{_adapter_path(base, task.name, rank, seed, steps)}-{REHEARSAL}"
                + (f"-from-sh{SHARED_STEPS}" if SHARED_STEPS > 0 else ""))
    if not (path / "adapter_config.json").exists():
        start = base
        if SHARED_STEPS > 0:
            start = apply(base, train_shared(base, rank, seed, verbose=verbose))  # the rehearsal's targets
        torch.manual_seed(seed)  # the order of v6 (seed, rehearsal, PEFT init): its adapters stay the same
        data = [task, *rehearsal(start, task, seed)]
        model = _peft_model(base, rank)
        if SHARED_STEPS > 0:
            src = _adapter_path(base, "shared", rank, seed, SHARED_STEPS) / "adapter_model.safetensors"
            loaded = set_peft_model_state_dict(model, load_file(src))
            missing = [k for k in loaded.missing_keys if "lora_" in k]
            if loaded.unexpected_keys or missing:
                raise RuntimeError(f"tiny_tasks.train_adapter: {src} does not fit the adapter "
                                   f"(unexpected {loaded.unexpected_keys[:3]}, missing {missing[:3]})")
        _fit(model, [data[0], data[1], data[0], data[2]], steps, 1000 + seed + task.seed, path,
             f"adapter {task.name} r={rank}", verbose)
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
def evaluate(base, adapter: Adapter | None, task: Task, n: int = HELD_OUT, *, per_token: bool = False) -> float:
    """Exact-match accuracy of ``base`` (+ the adapter's ΔW) on ``n`` held-out examples of ``task``
    (``per_token``: the fraction of right answer tokens instead)."""
    return accuracy(apply(base, adapter), task, n, per_token=per_token)


@torch.no_grad()
def accuracy(model, task: Task, n: int = HELD_OUT, *, per_token: bool = False) -> float:
    """Exact-match (or per-token) accuracy of an adapted ``model`` on held-out examples (teacher-forced argmax)."""
    ids, _labels = task.held_out(n)
    logits = model(input_ids=ids).logits
    right = logits[:, ANSWER - 1 : -1].argmax(-1) == ids[:, ANSWER:]  # position t predicts token t + 1
    return float(right.float().mean() if per_token else right.all(1).float().mean())


if __name__ == "__main__":
    import sys

    torch.set_num_threads(1)
    rank = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    base, _ = build_base(0)
    tasks = make_tasks(0)
    print("base on copy:", accuracy(base, copy_task(0)), "on tasks:", [accuracy(base, t) for t in tasks])
    for t in tasks:
        a = train_adapter(base, t, rank, 0)
        model = apply(base, a)
        print(t.name, "own", accuracy(model, t), "others", [accuracy(model, o) for o in tasks if o is not t],
              "copy", accuracy(model, copy_task(0)), flush=True)
