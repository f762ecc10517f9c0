"""``lorakit apply``: plan the fold from the headers, rewrite the base checkpoint shard by shard and tensor by
tensor through :func:`lorakit.ops.apply.fold` (and its kin), atomically, report each adapted tensor."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lorakit.errors import LorakitError
from lorakit.io.atomic import check_output_path
from lorakit.io.checkpoint import Checkpoint, CheckpointWriter, companion_files
from lorakit.ops.apply import _folded, plan_apply
from lorakit.provenance import make_provenance, provenance_metadata
from lorakit.report import Report
from lorakit.run import RunOptions, run_options
from lorakit.verbs.engine import ModuleStream
from lorakit.verbs.store import load


def apply_file(
    base: str | Path,
    adapter_path: str | Path,
    output: str | Path,
    *,
    weight: float = 1.0,
    subtract: bool = False,
    run: RunOptions | None = None,
    dry_run: bool = False,
    allow_pickle: bool = False,
) -> Report:
    """``lorakit apply``: ``W + w·ΔW`` (or ``W − w·ΔW``) for every adapted tensor, written like the base."""
    check_output_path(output, [base, adapter_path])
    if not math.isfinite(weight):
        raise LorakitError(f"--scale must be finite, got {weight}")
    ckpt = Checkpoint(base)
    adapter = load(adapter_path, allow_pickle=allow_pickle)
    plan = plan_apply(ckpt, adapter, weight=weight, subtract=subtract)
    w = -weight if subtract else weight
    verb = "subtracted" if subtract else "applied"
    report = Report(title=f"{verb} {adapter_path} ×{weight} {'from' if subtract else 'to'} {base} → {output}",
                    columns=["module", "tensor", "shape", "‖w·ΔW‖_F", "‖w·ΔW‖/‖W‖"])
    roles = [p.role for p in plan.values()]
    summary = {"modules_applied": roles.count("delta") + roles.count("dora"), "dora_modules": roles.count("dora"),
               "bias_updates": roles.count("bias"), "full_tensors_replaced": roles.count("full"),
               "trainable_token_tables": roles.count("tokens"), "tensors": len(ckpt.keys()), "shards": len(ckpt.shards)}
    if dry_run:
        for key, p in plan.items():
            report.add_row(p.module, key, list(p.shape), None, None)
        report.summary = summary
        return report.finish(output=output, inputs=[adapter], dry_run=True)
    dev = run_options(run).device
    layout = ckpt.layout()
    out = Path(output)
    params = {"base": Path(base).name, "scale": weight, "subtract": subtract}

    def work(window: list[str], inputs) -> dict[str, tuple[torch.Tensor, tuple | None]]:
        key = window[0]  # one tensor at a time: each is a dense base tensor
        t = inputs(key)
        where = plan.get(key)
        if where is None:
            return {key: (t, None)}  # not adapted: written as read
        new = _folded(t, where, adapter, w, dev)
        change = float((new.double() - t.double()).norm())
        label = where.module if where.role in ("delta", "dora") else f"{where.module} ({where.role})"
        return {key: (new, (label, key, list(where.shape), change, change / max(float(t.double().norm()), 1e-300)))}

    # every tensor in layout order (the writer's order); no read-ahead: a second dense tensor would double the
    # peak. Only the folded tensors count as working memory for the heap trimming.
    order = [key for names in layout.values() for key in names]
    stream = ModuleStream(order, ckpt.get, work, read_ahead=False,
                          nbytes=lambda k: 4 * math.prod(plan[k].shape) if k in plan else 0)
    meta = {**ckpt.metadata(), **provenance_metadata(make_provenance("apply", params, [adapter_path]))}
    with CheckpointWriter(out, layout, metadata=meta, index_name=ckpt.index_path.name if ckpt.index_path else
                          "model.safetensors.index.json", index_metadata=ckpt.index_metadata,
                          companions=companion_files(ckpt), tensors=ckpt.tensor_layout()) as writer:
        for key, (t, row) in stream:
            if row is not None:
                report.add_row(*row)
            writer.add(key, t)
    report.summary = summary
    return report.finish(output=output, inputs=[adapter])
