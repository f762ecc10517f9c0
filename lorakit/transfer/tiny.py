"""Tiny causal LMs and a character-level tokenizer built in code (no downloads), for tests and benchmarks.

``char_tokenizer()`` is a ``PreTrainedTokenizerFast`` over printable ASCII + newline (one token per character),
so models saved with :func:`save_base` load back with ``AutoTokenizer``/``AutoModelForCausalLM`` from a path.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit._deps import require

CHARS = string.ascii_letters + string.digits + " +-*=:?.,!()\n"
SPECIAL = ("<pad>", "<unk>", "<eos>")


def char_tokenizer() -> Any:
    """A character-level ``PreTrainedTokenizerFast``: ids 0..2 are ``<pad> <unk> <eos>``, then :data:`CHARS`."""
    transformers = require("transformers", "transfer")
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for c in CHARS:
        vocab[c] = len(vocab)
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex(".|\n"), behavior="isolated")
    t.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", unk_token="<unk>",
                                                eos_token="<eos>")


def tiny_model(arch: str = "llama", *, hidden: int = 64, layers: int = 2, heads: int = 4, vocab: int | None = None,
               max_positions: int = 256, seed: int = 0) -> Any:
    """A randomly initialised causal LM (``llama`` or ``gpt2``) sized for seconds-long CPU runs."""
    transformers = require("transformers", "transfer")
    vocab = vocab or len(SPECIAL) + len(CHARS)
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                       num_hidden_layers=layers, num_attention_heads=heads,
                                       num_key_value_heads=heads, max_position_embeddings=max_positions,
                                       pad_token_id=0, bos_token_id=2, eos_token_id=2, tie_word_embeddings=True)
        return transformers.LlamaForCausalLM(cfg).eval()
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads,
                                      n_positions=max_positions, pad_token_id=0, bos_token_id=2, eos_token_id=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(cfg).eval()
    raise ValueError(f"unknown tiny architecture {arch!r} (llama or gpt2)")


def save_base(model: Any, tok: Any, path: str | Path) -> Path:
    """``save_pretrained`` of model and tokenizer into one directory (loadable by :func:`load_causal_lm`)."""
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ---- a synthetic pre-training corpus: a formal language of string and arithmetic tasks -----------------------
PRETRAIN_TASKS = ("copy", "reverse", "sort", "upper", "add")


def random_word(rng: random.Random, lo: int = 3, hi: int = 6) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def pretrain_example(rng: random.Random, task: str) -> tuple[str, str]:
    """One (input, output) pair of a pre-training task."""
    if task == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"{a}+{b}", str(a + b)
    w = random_word(rng, 2, 7)
    return w, {"copy": w, "reverse": w[::-1], "sort": "".join(sorted(w)), "upper": w.upper()}[task]


def corpus_doc(rng: random.Random, examples: int = 4) -> str:
    """A document: ``examples`` rendered pairs of one randomly chosen pre-training task."""
    from lorakit.transfer.models import render

    task = rng.choice(PRETRAIN_TASKS)
    return "".join(render(*pretrain_example(rng, task)) for _ in range(examples))


def pretrain(model: Any, tok: Any, *, steps: int, batch: int, seed: int = 0, lr: float = 3e-3,
             device: torch.device | str = "cpu", log_every: int = 0) -> float:
    """Full-parameter LM training of ``model`` on :func:`corpus_doc` documents (AdamW, 50-step warm-up, linear
    decay); returns the last loss. Cost: ``steps`` forward+backward passes of ``batch × ~100`` tokens."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng = random.Random(seed)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        docs = [tok.encode(corpus_doc(rng), add_special_tokens=False) for _ in range(batch)]
        width = max(map(len, docs))
        ids = torch.zeros(batch, width, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for i, d in enumerate(docs):
            ids[i, : len(d)] = torch.tensor(d)
            labels[i, : len(d)] = torch.tensor(d)
            mask[i, : len(d)] = 1
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50) * (1 - step / steps)
        loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if log_every and step % log_every == 0:
            print(f"  pretrain step {step}/{steps} loss {loss.item():.3f}", flush=True)
    model.eval()
    return float(loss.detach())


# ---- LoRA tasks: none of them is in the pre-training corpus --------------------------------------------------
@dataclass(frozen=True)
class LoraTask:
    """A task for a LoRA on a :func:`pretrain`-ed base: inputs are lower-case words of 3-6 letters."""

    name: str
    answer: Callable[[str], str]

    @staticmethod
    def valid(x: str) -> bool:
        """Whether ``x`` is a well-formed task input (what the generator should write)."""
        return 3 <= len(x) <= 6 and all(c in string.ascii_lowercase for c in x)


LORA_TASKS = {t.name: t for t in (
    LoraTask("first-letter", lambda w: w[:1]),
    LoraTask("last-letter", lambda w: w[-1:]),
    LoraTask("last-two", lambda w: w[-2:]),
    LoraTask("capitalize", lambda w: w[:1].upper() + w[1:]),
    LoraTask("length", lambda w: str(len(w))),
)}


def lora_task_example(task: str, rng: random.Random) -> tuple[str, str]:
    """One (input, output) pair of the LoRA task ``task`` (a key of :data:`LORA_TASKS`)."""
    w = random_word(rng)
    return w, LORA_TASKS[task].answer(w)
