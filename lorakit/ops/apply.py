"""Fold an adapter into base weights (``W ← W + w·ΔW``), or take it out again (``--subtract``), streamed.

The plan is checked from headers alone before any weight is read: every adapter module must map to one base
tensor (``<module>.weight``; see :func:`weight_key`) whose shape fits the module's ΔW in its layer's
orientation:

- linear: ``W (out, in)`` gets ΔW; with PEFT ``fan_in_fan_out`` (GPT-2 ``Conv1D``) ``W (in, out)`` gets ΔWᵀ
  (a non-square ``(out, in)`` weight stays a Linear, as in PEFT);
- embedding: ``W (num_embeddings, dim)`` gets ΔWᵀ (PEFT's embedding LoRA has ``A (r, num_embeddings)``);
- conv: ``W (out, in, kh, kw)`` gets ΔW reshaped from the flattened ``(out, in·kh·kw)`` (also when the adapter
  stored no kernel, as LoHa/LoKr on Conv2d without Tucker do: the producers reshape it the same way).

What else an adapter holds is folded too, never dropped:

- a bias update (PEFT ``lora_bias``) goes into ``<module>.bias``: ``b ← b + w·Δb`` (``Δb = s·lora_B.bias``, as in
  PEFT's merge); a base layer without a bias is refused, as PEFT refuses it;
- a DoRA module replaces its weight by PEFT's ``merge_and_unload`` result: in the ``(out, in)`` orientation,
  ``W' = m ⊙ (W + ΔW) / ‖W + ΔW‖`` with the norm taken per output row over the input dimensions (``dim=1`` for
  Linear, all but dim 0 for conv; for embeddings and Conv1D on the transposed weight, as PEFT does). Only at
  weight 1: DoRA is not linear in ΔW, and ``--subtract`` cannot recover ``W`` (every row of ``W'`` has norm
  ``|m|``, whatever ``W`` was);
- a whole module tensor ``T`` (PEFT ``modules_to_save``) replaces the base tensor of its name:
  ``W ← W + w·(T − W)`` (``T`` at weight 1); not with ``--subtract``, which cannot recover ``W``;
- PEFT trainable tokens (``trainable_token_indices``) replace those rows of the embedding table the same way.

Then the checkpoint is rewritten shard by shard, tensor by tensor, in the base's dtypes and sharding: adapted
tensors are updated in float32 (float64 for float64 weights) and cast back; the others are copied. Peak memory is
one tensor plus its ΔW. Cost O(out·in·r) per adapted module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lorakit.adapter import Adapter, ModuleInfo
from lorakit.errors import FormatError, KeyMappingError, LorakitError, NonFiniteError, ShapeMismatchError
from lorakit.factors import all_finite
from lorakit.io.checkpoint import WRAPPER_PREFIXES, Checkpoint, weight_key


@dataclass(frozen=True)
class Placement:
    """Where and how one module's ΔW lands: the tensor, and whether ΔW is transposed or reshaped to 4-D.

    ``role``: ``delta`` (``W + w·ΔW``), ``dora`` (PEFT's DoRA fold), ``bias`` (``b + w·Δb`` of the module),
    ``full`` (``W + w·(T − W)`` for the whole tensor ``module`` names in ``meta.full_tensors``) or ``tokens``
    (PEFT trainable tokens: the listed rows of the embedding table become the saved rows, ``shape`` is theirs).
    """

    module: str
    key: str
    transpose: bool
    shape: tuple[int, ...]
    role: str = "delta"


def place(info: ModuleInfo, key: str, shape: tuple[int, ...], *, fan_in_fan_out: bool, file: Path) -> Placement:
    """Check that ``info``'s ΔW fits the tensor ``key`` of ``shape``; raise :class:`ShapeMismatchError` if not."""
    out, inn = info.shape
    if info.kind == "embedding":
        expected, transpose = (inn, out), True
    elif info.kind == "conv":
        ok = len(shape) == 4 and shape[0] == out and math.prod(shape[1:]) == inn
        if not ok:
            raise ShapeMismatchError(f"conv ΔW is {out}x{inn} (flattened) but {key} has shape {list(shape)}",
                                     file=file, module=info.name)
        return Placement(info.name, key, False, shape)
    elif info.kind == "linear" and len(shape) in (3, 4) and shape[0] == out and math.prod(shape[1:]) == inn:
        # A conv ΔW stored flattened with no kernel in the file (LoHa/LoKr on Conv2d without Tucker): the
        # producers (PEFT, LyCORIS, ComfyUI) reshape it to the base weight, and so does apply.
        return Placement(info.name, key, False, shape)
    elif fan_in_fan_out and not (tuple(shape) == (out, inn) and out != inn):
        # PEFT's fan_in_fan_out is global, but it resets the flag for nn.Linear targets: a non-square
        # (out, in) weight is a Linear; a square one is ambiguous and the config decides.
        expected, transpose = (inn, out), True
    else:
        expected, transpose = (out, inn), False
    if tuple(shape) != expected:
        hint = "the adapter may be for another base model"
        if info.kind == "linear" and tuple(shape) == (inn, out):
            hint = "the base stores this weight transposed (GPT-2 Conv1D): the adapter needs fan_in_fan_out"
        raise ShapeMismatchError(
            f"ΔW is {out}x{inn} but {key} has shape {list(shape)} (expected {list(expected)})",
            file=file, module=info.name, hint=hint,
        )
    return Placement(info.name, key, transpose, shape)


def full_tensor_key(name: str, keys: set[str]) -> str | None:
    """The checkpoint tensor a whole saved tensor (``lm_head.weight``) replaces: the same name, the name without
    a wrapper prefix, or the one key ending in ``.<name>``."""
    names = [name] + [name[len(p):] for p in WRAPPER_PREFIXES if name.startswith(p)]
    for n in names:
        if n in keys:
            return n
    for n in names:
        hits = [k for k in keys if k.endswith(f".{n}")]
        if len(hits) == 1:
            return hits[0]
    return None


def plan_apply(base: Checkpoint, adapter: Adapter, *, weight: float = 1.0, subtract: bool = False
               ) -> dict[str, Placement]:
    """Header-only plan: tensor key → placement, for every module, its bias update and every whole saved
    tensor; errors name the first problem."""
    from lorakit.formats.peft import trainable_token_rows

    src = adapter.meta.source_path
    tokens = trainable_token_rows(adapter)
    unknown = [k for k in adapter.meta.passthrough if k not in {key for _, key in tokens.values()}]
    if unknown:
        raise FormatError(
            f"{len(unknown)} tensor(s) are neither LoRA factors nor whole module tensors (e.g. "
            f"{unknown[0]}): apply cannot know what they do to the base model", file=src,
            hint="merge this adapter with PEFT (merge_and_unload), which knows its extra layers",
        )
    if tokens and subtract:
        raise LorakitError("--subtract cannot undo trainable tokens: the rows they replaced are gone", file=src,
                           hint="start again from the original base model")
    dora = [n for n, i in adapter.infos().items() if i.has_magnitude]
    if dora and (subtract or weight != 1.0):
        raise LorakitError(
            "DoRA modules fold only at --scale 1 without --subtract (W' = m·(W + ΔW)/‖W + ΔW‖ is not linear in "
            "ΔW, and W cannot be recovered from W')", file=src, module=dora[0],
            hint="apply it at scale 1 to the original base model",
        )
    if adapter.meta.full_tensors and subtract:
        raise LorakitError(
            f"--subtract cannot undo whole module tensors (modules_to_save, e.g. {next(iter(adapter.meta.full_tensors))}):"
            " the base tensor they replaced is gone", file=src, hint="start again from the original base model",
        )
    fan_in_fan_out = bool(adapter.meta.format_config.get("fan_in_fan_out")) if adapter.meta.source_format == "peft" \
        else False
    keys = set(base.keys())
    plan: dict[str, Placement] = {}
    missing: list[str] = []
    for name, info in adapter.infos().items():
        key = weight_key(name, keys)
        if key is None:
            missing.append(name)
            continue
        if key in plan:
            raise KeyMappingError(f"modules {plan[key].module} and {name} both map to {key}", module=name, key=key)
        p = place(info, key, base.shape(key), fan_in_fan_out=fan_in_fan_out, file=base.path)
        plan[key] = replace(p, role="dora") if info.has_magnitude else p
        if info.has_bias:
            bkey = key[: -len("weight")] + "bias"
            if bkey not in keys:
                raise KeyMappingError(
                    f"the adapter has a bias update (lora_bias) for {name} but the base has no {bkey}", file=base.path,
                    module=name, key=bkey, hint="PEFT cannot merge lora_bias into a layer without a bias either",
                )
            if tuple(base.shape(bkey)) != (info.out_features,):
                raise ShapeMismatchError(f"bias update is ({info.out_features},) but {bkey} has shape "
                                         f"{list(base.shape(bkey))}", file=base.path, module=name)
            plan[bkey] = Placement(name, bkey, False, (info.out_features,), "bias")
    for t_name, t in adapter.meta.full_tensors.items():
        key = full_tensor_key(t_name, keys)
        if key is None:
            raise KeyMappingError(
                f"the adapter saves the whole tensor {t_name} (modules_to_save) but the base checkpoint has no such "
                "tensor", file=base.path, key=t_name, hint="is this the adapter's base model?",
            )
        if key in plan:
            raise KeyMappingError(f"{key} is both adapted by {plan[key].module} and saved whole as {t_name}",
                                  file=src, key=key)
        if tuple(base.shape(key)) != tuple(t.shape):
            raise ShapeMismatchError(f"saved module tensor {t_name} has shape {list(t.shape)} but {key} has shape "
                                     f"{list(base.shape(key))}", file=base.path, key=key,
                                     hint="the adapter may be for another base model")
        plan[key] = Placement(t_name, key, False, tuple(t.shape), "full")
    for module, (rows, tkey) in tokens.items():
        key = weight_key(module, keys)
        if key is None:
            raise KeyMappingError(f"trainable tokens for {module} but the base has no {module}.weight",
                                  file=base.path, module=module, key=tkey)
        if key in plan:
            raise KeyMappingError(f"{key} has both trainable tokens and another update", file=src, key=key)
        shape = tuple(base.shape(key))
        if len(shape) != 2 or max(rows) >= shape[0]:
            raise ShapeMismatchError(f"trainable token row {max(rows)} does not fit {key} of shape {list(shape)}",
                                     file=base.path, module=module)
        plan[key] = Placement(module, key, False, (len(rows), shape[1]), "tokens")
    if missing:
        raise KeyMappingError(
            f"{len(missing)} adapter module(s) have no weight in the base checkpoint, e.g. "
            f"{missing[0]!r} (looked for {missing[0]}.weight)",
            file=base.path, module=missing[0],
            hint="is this the adapter's base model? module names must match the checkpoint's tensor names",
        )
    for key in plan:
        dt = base.dtype(key)
        if dt is None or not dt.is_floating_point:
            raise FormatError(f"{key} is stored as {base.info(key).dtype}, not a float: cannot add ΔW", file=base.path)
    return plan


def fold(weight: torch.Tensor, delta: torch.Tensor, p: Placement, weight_scale: float) -> torch.Tensor:
    """``weight + weight_scale·ΔW`` in ``weight``'s dtype (computed in float32, or float64 for float64)."""
    dt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    d = delta.to(dt)
    d = d.T if p.transpose else d.reshape(p.shape)
    return (weight.to(dt) + weight_scale * d).to(weight.dtype)


def fold_dora(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, p: Placement) -> torch.Tensor:
    """PEFT's DoRA merge: ``m ⊙ (W + ΔW) / ‖W + ΔW‖`` per output row, in ``weight``'s dtype.

    ``delta`` is the flattened ``(out, in)`` ΔW; the base tensor is brought to that orientation (transposed for
    embeddings and Conv1D, flattened for conv), each row (one output) is rescaled to norm ``m``, and the result
    is put back. Cost O(out·in)."""
    dt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.to(dt)
    W = W.T if p.transpose else W.reshape(delta.shape)
    merged = W + delta.to(dt)
    norm = torch.linalg.vector_norm(merged, dim=1, keepdim=True)
    out = merged * (magnitude.to(dt).reshape(-1, 1) / norm)
    out = out.T if p.transpose else out.reshape(p.shape)
    return out.contiguous().to(weight.dtype)


def _folded(t: torch.Tensor, p: Placement, adapter: Adapter, w: float, dev: torch.device) -> torch.Tensor:
    """The new value of base tensor ``t`` under placement ``p`` (see the module docstring)."""
    dt = torch.float64 if t.dtype == torch.float64 else torch.float32
    if p.role == "full":
        full = adapter.meta.full_tensors[p.module].load()
        if not all_finite(full):
            raise NonFiniteError("saved module tensor contains NaN or Inf", file=adapter.meta.source_path,
                                 key=full_key(adapter, p.module))
        if w == 1.0:
            return full.to(t.dtype)
        return (t.to(dt) + w * (full.to(dt) - t.to(dt))).to(t.dtype)
    if p.role == "tokens":
        from lorakit.formats.peft import trainable_token_rows

        rows, tkey = trainable_token_rows(adapter)[p.module]
        new_rows = adapter.meta.passthrough[tkey]()
        if tuple(new_rows.shape) != (len(rows), t.shape[1]):
            raise ShapeMismatchError(f"trainable tokens {tkey} have shape {list(new_rows.shape)}, expected "
                                     f"[{len(rows)}, {t.shape[1]}]", file=adapter.meta.source_path)
        if not all_finite(new_rows):
            raise NonFiniteError("trainable tokens contain NaN or Inf", file=adapter.meta.source_path, key=tkey)
        out = t.to(dt).clone()
        idx = torch.tensor(rows)
        out[idx] = out[idx] + w * (new_rows.to(dt) - out[idx])  # the rows themselves at weight 1, as PEFT merges
        return out.to(t.dtype)
    f = adapter[p.module]
    if p.role == "bias":
        assert f.bias is not None
        return (t.to(dt) + w * f.bias.to(dt)).to(t.dtype)
    f = f.to(dev)
    delta = f.delta(dt)
    if p.role == "dora":
        assert f.magnitude is not None
        return fold_dora(t.to(dev), delta, f.magnitude, p).cpu()
    return fold(t.to(dev), delta, p, w).cpu()


def full_key(adapter: Adapter, name: str) -> str:
    return adapter.meta.full_tensors[name].key or name


