"""``lorakit extract``: plan from the two checkpoints' headers, stream ``W_finetuned − W_base`` tensor by tensor
through the low-rank fit (:func:`lorakit.ops.extract.low_rank_fit`), write atomically, report."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lorakit.adapter import Adapter, AdapterMeta
from lorakit.errors import KeyMappingError, OperatorParameterError, RankError
from lorakit.factors import LoraFactors
from lorakit.io.atomic import check_output_path
from lorakit.io.checkpoint import Checkpoint
from lorakit.ops.extract import DEFAULT_EXCLUDE, ExtractedModule, low_rank_fit, select_weights
from lorakit.ops.rank_rules import RankRule
from lorakit.report import Report
from lorakit.run import RunOptions, run_options
from lorakit.verbs.engine import ModuleStream, Output, write_adapter


def extract_file(
    base: str | Path,
    finetuned: str | Path,
    output: str | Path,
    rule: RankRule,
    *,
    include: str | None = None,
    exclude: str | None = DEFAULT_EXCLUDE,
    oversample: int = 10,
    n_iter: int = 4,
    max_rank: int | None = None,
    to_format: str = "peft",
    run: RunOptions | None = None,
    dry_run: bool = False,
) -> Report:
    """``lorakit extract``: a LoRA approximating ``finetuned − base``; the report gives each module's error.

    ``run``: device, output dtype and the seed of the random probes (default 0)."""
    run = run_options(run)
    dtype, seed = run.dtype, run.seed_or(0)
    if rule.kind not in ("rank", "energy", "error"):
        raise OperatorParameterError(f"extract chooses ranks by --rank, --energy or --error, not {rule}",
                                     parameter=rule.kind, hint="the full spectrum of a dense difference is not known")
    check_output_path(output, [base, finetuned])
    b, t = Checkpoint(base), Checkpoint(finetuned)
    names = select_weights(b, t, include, exclude)
    if not names:
        raise KeyMappingError("no weight tensors selected for extraction", file=finetuned,
                              hint="check --include/--exclude")
    if rule.kind == "rank":
        for k in names:
            shp = b.shape(k)
            if int(rule.value) > min(shp[0], math.prod(shp[1:])):
                raise RankError(f"rank {int(rule.value)} is larger than the layer ({shp[0]}x{math.prod(shp[1:])})",
                                module=k, file=finetuned)
    title = f"extract {finetuned} − {base} by {rule} → {output}"
    if dry_run:
        report = Report(title=title, columns=["tensor", "shape"])
        for k in names:
            report.add_row(k, list(b.shape(k)))
        report.summary = {"tensor_count": len(names)}
        return report.finish(output=output, dry_run=True)
    dev = run.device
    modules: dict[str, LoraFactors] = {}
    rows: list[ExtractedModule] = []
    unchanged: list[str] = []

    def read(k: str) -> tuple[torch.Tensor, torch.Tensor]:
        return b.get(k), t.get(k)

    def work(window: list[str], inputs) -> dict[str, tuple[LoraFactors, ExtractedModule] | None]:
        k = window[0]  # one tensor at a time: each is a dense matrix
        wb, wt = inputs(k)
        out_dtype = dtype or wt.dtype
        D = wt.to(dev, torch.float32)  # wt's own buffer when already float32: it was read fresh, ours to overwrite
        D.sub_(wb.to(dev, torch.float32))
        del wb, wt
        shape4 = tuple(D.shape)
        D = D.reshape(D.shape[0], -1)
        if not bool(D.any()):
            return {k: None}  # unchanged: nothing to extract
        svd, err = low_rank_fit(D, rule, oversample=oversample, n_iter=n_iter, seed=seed, max_rank=max_rank)
        del D
        f = svd.to_factors(dtype=out_dtype)
        kind, kernel = ("conv", (shape4[2], shape4[3])) if len(shape4) == 4 else ("linear", None)
        name = k.removesuffix(".weight")
        factors = LoraFactors(f.A.cpu().contiguous(), f.B.cpu().contiguous(), 1.0, kernel, kind)  # type: ignore[arg-type]
        return {k: (factors, ExtractedModule(name, (int(shape4[0]), int(math.prod(shape4[1:]))), svd.rank, err))}

    # no read-ahead: a second pair of dense checkpoint tensors in memory would double the peak
    stream = ModuleStream(names, read, work, nbytes=lambda k: 4 * math.prod(b.shape(k)), read_ahead=False)
    for k, done in stream:
        if done is None:
            unchanged.append(k)
            continue
        factors, row = done
        modules[row.name] = factors
        rows.append(row)
    changed_1d = [k for k in t.keys() if k in b and len(t.shape(k)) == 1 and not torch.equal(t.get(k), b.get(k))]
    if not modules:
        raise KeyMappingError("the two checkpoints are identical in every selected tensor: nothing to extract",
                              file=finetuned)
    adapter = Adapter(modules, AdapterMeta(base_model=str(base), source_format="peft"))
    params = {"rule": str(rule), "oversample": oversample, "n_iter": n_iter, "seed": seed,
              "base": Path(base).name, "finetuned": Path(finetuned).name}
    write_adapter(adapter, Output(output, "extract", params, (base, finetuned), to_format, hash_inputs=False))
    report = Report(title=title, columns=["module", "out x in", "rank", "rel error"])
    for r in rows:
        report.add_row(r.name, f"{r.shape[0]}x{r.shape[1]}", r.rank, r.rel_error)
    report.summary = {
        "module_count": len(rows),
        "parameters": adapter.num_params,
        "rel_error_max": max(r.rel_error for r in rows),
        "rel_error_mean": sum(r.rel_error for r in rows) / len(rows),
    }
    if unchanged:
        report.notes.append(f"{len(unchanged)} tensor(s) identical in both checkpoints, skipped (e.g. {unchanged[0]})")
    if changed_1d:
        report.notes.append(f"{len(changed_1d)} 1-D tensor(s) (norms, biases) cannot be a LoRA and were not "
                            f"compared or extracted (e.g. {changed_1d[0]})")
    return report.finish(output=output, format=to_format)
