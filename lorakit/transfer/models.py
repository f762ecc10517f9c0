"""Causal LMs through ``transformers``: loading, fingerprints, module discovery, sampling, scoring, applying a
lorakit adapter. Everything the four roles share; device-agnostic (CPU or CUDA).

Task examples are plain text pairs rendered as ``"Q: {input}\\nA: {output}\\n"`` (see :func:`render`); a newline
ends every field, so generation stops at the first newline.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from lorakit._deps import require
from lorakit.adapter import Adapter
from lorakit.errors import KeyMappingError, LorakitError

STOP = "\n"


def render(x: str, y: str | None = None) -> str:
    """One example as text; with ``y=None`` the prompt that asks for the answer."""
    return f"Q: {x}\nA: " if y is None else f"Q: {x}\nA: {y}\n"


def load_causal_lm(spec: str, device: torch.device | str = "cpu") -> tuple[Any, Any]:
    """A causal LM and its tokenizer from a local directory or a Hub id, in eval mode, float32, on ``device``."""
    transformers = require("transformers", "transfer")
    transformers.utils.logging.disable_progress_bar()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(spec)
        model = transformers.AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise LorakitError(f"cannot load a causal LM from {spec!r}: {str(e).splitlines()[0]}", file=spec,
                           hint="give a local model directory (config.json + weights + tokenizer) or a Hub id") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok


def fingerprint(model: Any) -> str:
    """A sha256 over parameter names, shapes and a strided sample of each tensor's values: identifies a base
    model without hashing every byte (cost O(#params / stride))."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)][:256].to("cpu", torch.float32)
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(sample.numpy().round(6).tobytes())
    return h.hexdigest()


def linear_modules(model: Any) -> list[str]:
    """Names of the model's linear layers (``nn.Linear`` and GPT-2 ``Conv1D``), the output head excluded."""
    out = []
    for name, m in model.named_modules():
        if (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D") and not name.endswith("lm_head"):
            out.append(name)
    return out


def resolve_target_modules(model: Any, requested: list[str] | None, *, label: str = "model") -> list[str]:
    """Module names to put LoRA on: every linear layer whose name ends with one of ``requested`` (all linear
    layers when ``requested`` is empty). Raises with the available suffixes when nothing matches."""
    names = linear_modules(model)
    if not requested:
        return names
    picked = [n for n in names if any(n == r or n.endswith("." + r) for r in requested)]
    if not picked:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise KeyMappingError(
            f"no linear module of the {label} matches {', '.join(requested)}",
            hint=f"its linear modules end with: {', '.join(suffixes)} (pass --target-modules with some of these)",
        )
    return picked


def encode(tok: Any, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False))


def stop_id(tok: Any) -> int:
    ids = encode(tok, STOP)
    if len(ids) != 1:
        raise LorakitError("the tokenizer does not encode a newline as a single token",
                           hint="lorakit transfer ends fields at a newline; use a tokenizer with a newline token")
    return ids[0]


@torch.no_grad()
def sample(model: Any, prompt: list[int], n: int, *, max_new_tokens: int, stop: int, temperature: float = 1.0,
           generator: torch.Generator | None = None, batch_size: int = 64) -> list[list[int] | None]:
    """``n`` continuations of one prompt by ancestral sampling (greedy when ``temperature == 0``).

    Returns the new token ids up to (not including) ``stop``, or ``None`` for a continuation that hit
    ``max_new_tokens`` first. Sampling draws from ``generator`` on the CPU, so results are reproducible.
    """
    device = next(model.parameters()).device
    results: list[list[int] | None] = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        seq = torch.tensor([prompt] * b, device=device)
        done = torch.zeros(b, dtype=torch.bool)
        ended_at = [-1] * b
        for t in range(max_new_tokens):
            logits = model(input_ids=seq).logits[:, -1].float().cpu()
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
            for i in range(b):
                if not done[i] and int(nxt[i]) == stop:
                    done[i] = True
                    ended_at[i] = t
            seq = torch.cat([seq, nxt.to(device)[:, None]], 1)
            if bool(done.all()):
                break
        new = seq[:, len(prompt):].tolist()
        results.extend(new[i][: ended_at[i]] if done[i] else None for i in range(b))
    return results


@torch.no_grad()
def greedy(model: Any, tok: Any, prompts: list[str], *, max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy completion of each prompt up to the first newline (prompts of equal token length are batched,
    so no padding is needed). A completion that never ends is returned as generated."""
    s = stop_id(tok)
    device = next(model.parameters()).device
    ids = [encode(tok, p) for p in prompts]
    out: list[str] = [""] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, x in enumerate(ids):
        by_len.setdefault(len(x), []).append(i)
    for idx in by_len.values():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            seq = torch.tensor([ids[i] for i in chunk], device=device)
            n0 = seq.shape[1]
            for _ in range(max_new_tokens):
                nxt = model(input_ids=seq).logits[:, -1].argmax(-1)
                seq = torch.cat([seq, nxt[:, None]], 1)
                if bool((seq[:, n0:] == s).any(1).all()):
                    break
            for row, i in zip(seq[:, n0:].tolist(), chunk):
                cut = row.index(s) if s in row else len(row)
                out[i] = tok.decode(row[:cut])
    return out


@torch.no_grad()
def continuation_logprob(model: Any, tok: Any, prompts: list[str], continuation: str | list[int],
                         batch_size: int = 64) -> torch.Tensor:
    """``log p(continuation | prompt)`` for each prompt (sum over the continuation's tokens), float64 on CPU.
    ``continuation`` is a text or a list of token ids."""
    device = next(model.parameters()).device
    cont = encode(tok, continuation) if isinstance(continuation, str) else list(continuation)
    pad = tok.pad_token_id
    out = torch.empty(len(prompts), dtype=torch.float64)
    for start in range(0, len(prompts), batch_size):
        chunk = [encode(tok, p) + cont for p in prompts[start:start + batch_size]]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(chunk):  # right padding: positions stay 0..len-1 for every row
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.double(), -1)
        for i, row in enumerate(chunk):
            n = len(row)
            pos = torch.arange(n - len(cont) - 1, n - 1, device=logp.device)
            out[start + i] = logp[i, pos, torch.tensor(cont, device=logp.device)].sum().cpu()
    return out


def check_fits(model: Any, adapter: Adapter, *, label: str = "model") -> None:
    """Check from the adapter's header that every module exists in ``model`` with ΔW's shape (no tensor read)."""
    modules = dict(model.named_modules())
    for name, info in adapter.infos().items():
        m = modules.get(name)
        if m is None or not hasattr(m, "weight"):
            raise KeyMappingError(f"the {label} has no layer of this name", module=name,
                                  hint="the adapter was trained on another architecture")
        shape = tuple(m.weight.shape)
        if type(m).__name__ == "Conv1D":
            shape = shape[::-1]
        if shape != info.shape:
            raise KeyMappingError(f"ΔW is {info.shape} but the {label}'s weight is {shape}", module=name,
                                  hint="the adapter was trained on another base model")


@torch.no_grad()
def apply_adapter(model: Any, adapter: Adapter, *, sign: float = 1.0) -> None:
    """Add ``sign·ΔW`` of every adapter module to the matching layer's weight, in place (exact, float32).

    Module names are paths in the model (``model.layers.0.self_attn.q_proj``); GPT-2 ``Conv1D`` weights, stored
    ``(in, out)``, get ``ΔWᵀ``. Raises :class:`KeyMappingError` naming the first module the model lacks.
    """
    modules = dict(model.named_modules())
    for name in adapter:
        m = modules.get(name)
        if m is None or not hasattr(m, "weight"):
            raise KeyMappingError("the model has no such layer", module=name,
                                  hint="the adapter was trained on another architecture")
        delta = adapter[name].delta(torch.float32).to(m.weight.device)
        if type(m).__name__ == "Conv1D":
            delta = delta.T
        if tuple(delta.shape) != tuple(m.weight.shape):
            raise KeyMappingError(f"ΔW is {tuple(delta.shape)} but the layer's weight is {tuple(m.weight.shape)}",
                                  module=name, hint="the adapter was trained on another base model")
        m.weight.add_(sign * delta.to(m.weight.dtype))
