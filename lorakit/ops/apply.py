"""Fold an adapter into base weights (``W ← W + w·ΔW``), or take it out again (``--subtract``), streamed.

The plan is checked from headers alone before any weight is read: every adapter module must map to one base
tensor (``<module>.weight``; see :func:`weight_key`) whose shape fits the module's ΔW in its layer's
orientation:

- linear: ``W (out, in)`` gets ΔW; with PEFT ``fan_in_fan_out`` (GPT-2 ``Conv1D``) ``W (in, out)`` gets ΔWᵀ
  (a non-square ``(out, in)`` weight stays a Linear, as in PEFT);
- embedding: ``W (num_embeddings, dim)`` gets ΔWᵀ (PEFT's embedding LoRA has ``A (r, num_embeddings)``);
- conv: ``W (out, in, kh, kw)`` gets ΔW reshaped from the flattened ``(out, in·kh·kw)`` (also when the adapter
  stored no kernel, as LoHa/LoKr on Conv2d without Tucker do: the producers reshape it the same way).

Then the checkpoint is rewritten shard by shard, tensor by tensor, in the base's dtypes and sharding: adapted
tensors are updated in float32 (float64 for float64 weights) and cast back; the others are copied. Peak memory is
one tensor plus its ΔW. Cost O(out·in·r) per adapted module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.adapter import Adapter, ModuleInfo
from lorakit.errors import FormatError, KeyMappingError, LorakitError, ShapeMismatchError
from lorakit.io.checkpoint import Checkpoint, CheckpointWriter, companion_files
from lorakit.report import Report

WRAPPER_PREFIXES = ("base_model.model.", "unet.", "transformer.", "text_encoder.", "text_encoder_2.")


def weight_key(module: str, keys: set[str]) -> str | None:
    """The checkpoint tensor a module's ΔW applies to, or ``None``.

    In order: ``<module>.weight``; the same after dropping a wrapper prefix (``base_model.model.``, a
    diffusers component such as ``unet.``); the one key ending in ``.<module>.weight`` if exactly one does.
    """
    names = [module] + [module[len(p):] for p in WRAPPER_PREFIXES if module.startswith(p)]
    for n in names:
        if f"{n}.weight" in keys:
            return f"{n}.weight"
    for n in names:
        hits = [k for k in keys if k.endswith(f".{n}.weight")]
        if len(hits) == 1:
            return hits[0]
    return None


@dataclass(frozen=True)
class Placement:
    """Where and how one module's ΔW lands: the tensor, and whether ΔW is transposed or reshaped to 4-D."""

    module: str
    key: str
    transpose: bool
    shape: tuple[int, ...]


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


def plan_apply(base: Checkpoint, adapter: Adapter) -> dict[str, Placement]:
    """Header-only plan: tensor key → placement, for every module; errors name the first problem."""
    if any(i.has_magnitude for i in adapter.infos().values()):
        raise LorakitError("DoRA adapters are not folded by apply (ΔW depends on the base weight's norm)",
                           file=adapter.meta.source_path, hint="merge a plain LoRA, or fold DoRA with PEFT")
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
        plan[key] = place(info, key, base.shape(key), fan_in_fan_out=fan_in_fan_out, file=base.path)
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


def apply_file(
    base: str | Path,
    adapter_path: str | Path,
    output: str | Path,
    *,
    weight: float = 1.0,
    subtract: bool = False,
    device: str = "auto",
    dry_run: bool = False,
    allow_pickle: bool = False,
) -> Report:
    """``lorakit apply``: ``W + w·ΔW`` (or ``W − w·ΔW``) for every adapted tensor, written like the base."""
    from lorakit.api import load
    from lorakit.device import resolve_device
    from lorakit.io.atomic import check_output_path
    from lorakit.provenance import make_provenance, provenance_metadata

    check_output_path(output, [base, adapter_path])
    if not math.isfinite(weight):
        raise LorakitError(f"--scale must be finite, got {weight}")
    ckpt = Checkpoint(base)
    adapter = load(adapter_path, allow_pickle=allow_pickle)
    plan = plan_apply(ckpt, adapter)
    w = -weight if subtract else weight
    verb = "subtracted" if subtract else "applied"
    report = Report(title=f"{verb} {adapter_path} ×{weight} {'from' if subtract else 'to'} {base} → {output}",
                    columns=["module", "tensor", "shape", "‖w·ΔW‖_F", "‖w·ΔW‖/‖W‖"])
    summary = {"modules_applied": len(plan), "tensors": len(ckpt.keys()), "shards": len(ckpt.shards), "output": str(output)}
    if dry_run:
        report.title = "plan: " + report.title
        for key, p in plan.items():
            report.add_row(p.module, key, list(p.shape), None, None)
        report.summary = summary
        return report
    dev = resolve_device(device)
    layout = ckpt.layout()
    out = Path(output)
    params = {"base": Path(base).name, "scale": weight, "subtract": subtract}
    meta = {**ckpt.metadata(), **provenance_metadata(make_provenance("apply", params, [adapter_path]))}
    with CheckpointWriter(out, layout, metadata=meta, index_name=ckpt.index_path.name if ckpt.index_path else
                          "model.safetensors.index.json", index_metadata=ckpt.index_metadata,
                          companions=companion_files(ckpt)) as writer:
        for names in layout.values():
            for key in names:
                t = ckpt.get(key)
                p = plan.get(key)
                if p is not None:
                    f = adapter[p.module]
                    delta = f.to(dev).delta(torch.float64 if t.dtype == torch.float64 else torch.float32)
                    new = fold(t.to(dev), delta, p, w).cpu()
                    rel = float(delta.norm()) * abs(w) / max(float(t.double().norm()), 1e-300)
                    report.add_row(p.module, key, list(p.shape), float(delta.norm()) * abs(w), rel)
                    t = new
                writer.add(key, t)
    report.summary = summary
    report.notes.extend(adapter.meta.notes)
    return report
