"""LoRA training on (prompt, completion) text pairs with PEFT and ``accelerate``: the loop the discriminator, the
student and the benchmark's reference adapters share.

Loss: cross-entropy on the completion tokens only (prompt and padding masked), or, with a ``teacher`` model that
shares the tokenizer, the token-level KL(teacher ‖ student) on the same positions. AdamW without weight decay,
linear decay to 0 without warmup (Trans-LoRA's schedule). The batch order of epoch ``e`` is drawn from
``seed + e``, and a checkpoint (LoRA weights + optimizer state) is written after every epoch, so an
interrupted run resumed from its checkpoint ends bit-identical to an uninterrupted one (on CPU).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit._deps import require
from lorakit.adapter import Adapter, AdapterMeta
from lorakit.factors import LoraFactors
from lorakit.transfer.models import encode, resolve_target_modules

PEFT_PREFIX = "base_model.model."


@dataclass
class TrainConfig:
    """LoRA and optimizer settings. ``target_modules``: name suffixes; empty = every linear layer."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=list)
    epochs: int = 5
    lr: float = 2e-3
    batch_size: int = 16
    seed: int = 0
    kl_temperature: float = 1.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _batch(tok: Any, pairs: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
    rows = [(encode(tok, p), encode(tok, c)) for p, c in pairs]
    width = max(len(p) + len(c) for p, c in rows)
    pad = tok.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, c) in enumerate(rows):  # right padding keeps positions 0..len-1
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        mask[i, : len(p) + len(c)] = 1
        labels[i, len(p): len(p) + len(c)] = torch.tensor(c)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None, T: float) -> torch.Tensor:
    logits, labels = logits[:, :-1], labels[:, 1:]  # position t predicts token t+1
    keep = labels != -100
    if teacher_logits is None:
        return torch.nn.functional.cross_entropy(logits[keep].float(), labels[keep])
    t = torch.log_softmax(teacher_logits[:, :-1][keep].float() / T, -1)
    s = torch.log_softmax(logits[keep].float() / T, -1)
    return (t.exp() * (t - s)).sum(-1).mean() * T * T


def extract_adapter(peft_model: Any, base_model_name: str | None) -> Adapter:
    """The trained LoRA of a PEFT model as a lorakit :class:`Adapter` (ΔW = scaling·B@A per module)."""
    modules: dict[str, LoraFactors] = {}
    for name, m in peft_model.named_modules():
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
            clean = name.removeprefix(PEFT_PREFIX)
            modules[clean] = LoraFactors(
                A=m.lora_A["default"].weight.detach().float().cpu().clone(),
                B=m.lora_B["default"].weight.detach().float().cpu().clone(),
                scale=float(m.scaling["default"]),
            )
    return Adapter(modules, AdapterMeta(base_model=base_model_name, source_format="peft"))


def train_lora(
    model: Any,
    tok: Any,
    pairs: Sequence[tuple[str, str]],
    config: TrainConfig,
    *,
    device: torch.device | str = "cpu",
    checkpoint: str | Path | None = None,
    teacher: Any | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    base_model_name: str | None = None,
) -> Adapter:
    """Train a fresh LoRA on ``model`` (restored to its original state afterwards) and return it.

    Args:
        pairs: (prompt, completion) texts; the loss covers the completion only.
        checkpoint: a file to resume from and to write after each epoch.
        teacher: a model with the same vocabulary: token-level KL instead of cross-entropy.
        on_step: called with (step, total_steps, loss) after every optimizer step.
    Cost: epochs · len(pairs) forward+backward passes.
    """
    peft = require("peft", "transfer")
    accelerate = require("accelerate", "transfer")
    device = torch.device(device)
    targets = resolve_target_modules(model, config.target_modules, label="model to train")
    torch.manual_seed(config.seed)  # LoRA A's initialisation
    lcfg = peft.LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=targets, lora_dropout=0.0,
                           fan_in_fan_out=type(dict(model.named_modules())[targets[0]]).__name__ == "Conv1D")
    pm = peft.get_peft_model(model, lcfg)
    try:
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
        steps_per_epoch = -(-len(pairs) // config.batch_size)
        total = steps_per_epoch * config.epochs
        first_epoch = 0
        ckpt = Path(checkpoint) if checkpoint else None
        if ckpt is not None and ckpt.exists():
            state = torch.load(ckpt, weights_only=True, map_location="cpu")
            peft.set_peft_model_state_dict(pm, state["lora"])
            opt.load_state_dict(state["optim"])
            first_epoch = int(state["epoch"]) + 1
        acc = accelerate.Accelerator(cpu=device.type == "cpu")
        pm, opt = acc.prepare(pm, opt)
        pm.train()
        step = first_epoch * steps_per_epoch
        for epoch in range(first_epoch, config.epochs):
            order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(config.seed + epoch)).tolist()
            for start in range(0, len(order), config.batch_size):
                # under `accelerate launch` each process takes its share of the batch (DDP averages gradients)
                mine = order[start:start + config.batch_size][acc.process_index::acc.num_processes] or [order[start]]
                batch = {k: v.to(acc.device) for k, v in _batch(tok, [pairs[i] for i in mine]).items()}
                for g in opt.param_groups:
                    g["lr"] = config.lr * (1 - step / total)
                t_logits = None
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(input_ids=batch["input_ids"],
                                           attention_mask=batch["attention_mask"]).logits
                out = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                loss = _loss(out.logits, batch["labels"], t_logits, config.kl_temperature)
                acc.backward(loss)
                opt.step()
                opt.zero_grad()
                step += 1
                if on_step is not None:
                    on_step(step, total, float(loss.detach()))
            if ckpt is not None and acc.is_main_process:
                tmp = ckpt.with_name(ckpt.name + ".tmp")
                lora_state = {k: v.detach().cpu() for k, v in
                              peft.get_peft_model_state_dict(acc.unwrap_model(pm)).items()}
                torch.save({"epoch": epoch, "lora": lora_state, "optim": opt.state_dict()}, tmp)
                os.replace(tmp, ckpt)
        pm = acc.unwrap_model(pm)
        pm.eval()
        return extract_adapter(pm, base_model_name)
    finally:
        pm.unload()
        model.eval()
