"""Extract a LoRA from two checkpoints: ``ΔW = W_finetuned − W_base`` per weight, then a low-rank fit.

Streamed tensor by tensor (peak memory: the two weights, their difference and the residual, plus the
randomized SVD's ``(out + in)·ℓ`` work), so a checkpoint of any size extracts on a small machine.

Per weight ``D (out, in)`` (conv flattened to ``(out, in·kh·kw)``):

- ``--rank K``: randomized SVD (Halko–Martinsson–Tropp; ``K + oversample`` probes, ``n_iter`` power iterations);
- ``--energy E`` / ``--error E``: ``‖D‖_F²`` is known exactly from D, so the kept rank is chosen against the
  true total (not the truncated spectrum, kohya's pitfall); the probe count doubles until the target is met.

The reported error ``‖D − D_k‖_F / ‖D‖_F`` is measured on the residual itself. The result is scale-1 canonical
factors ``B = U√Σ``, ``A = √Σ Vᵀ``. Embeddings are left out by default (their LoRA is transposed and they are
rarely worth it); 1-D tensors (norms, biases) cannot be low-rank and are listed when they changed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.adapter import Adapter, AdapterMeta
from lorakit.errors import KeyMappingError, OperatorParameterError, RankError, ShapeMismatchError
from lorakit.factors import LoraFactors
from lorakit.io.checkpoint import Checkpoint
from lorakit.linalg import SVD, randomized_svd
from lorakit.ops.rank_rules import RankRule
from lorakit.report import Report

DEFAULT_EXCLUDE = r"(embed|wte|wpe|lm_head)"


@dataclass(frozen=True)
class ExtractedModule:
    name: str
    shape: tuple[int, int]
    rank: int
    rel_error: float


def select_weights(base: Checkpoint, tuned: Checkpoint, include: str | None, exclude: str | None) -> list[str]:
    """Header-only plan: the 2-D/4-D float ``*.weight`` tensors to extract, checked present and same-shaped in both.

    Raises:
        KeyMappingError: a selected tensor is missing from one checkpoint.
        ShapeMismatchError: a selected tensor has different shapes in the two checkpoints.
    """
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    names = list(dict.fromkeys([*tuned.keys(), *base.keys()]))
    chosen: list[str] = []
    for k in names:
        if not k.endswith(".weight") or (inc and not inc.search(k)) or (exc and exc.search(k)):
            continue
        ck = tuned if k in tuned else base
        dt = ck.dtype(k)
        if len(ck.shape(k)) not in (2, 4) or dt is None or not dt.is_floating_point:
            continue
        for ckpt, other in ((base, "base"), (tuned, "fine-tuned")):
            if k not in ckpt:
                raise KeyMappingError(f"tensor {k!r} is missing from the {other} checkpoint", file=ckpt.path, key=k,
                                      hint="the checkpoints differ in architecture; select tensors with --include/--exclude")
        if base.shape(k) != tuned.shape(k):
            raise ShapeMismatchError(f"tensor {k!r} is {list(base.shape(k))} in the base but {list(tuned.shape(k))} "
                                     f"in the fine-tune", file=tuned.path, module=k)
        chosen.append(k)
    return chosen


def squared_norm(D: torch.Tensor, rows: int = 256) -> float:
    """‖D‖_F² accumulated in float64 over blocks of rows (a float64 copy of all of D would double the memory)."""
    return sum(float(blk.double().square().sum()) for blk in D.split(rows))


def low_rank_fit(D: torch.Tensor, rule: RankRule, *, oversample: int = 10, n_iter: int = 4, seed: int = 0,
                 max_rank: int | None = None) -> tuple[SVD, float]:
    """Rank-k factors of dense ``D`` under ``rule`` and the relative error of the fit (measured on the residual).

    ``D`` is overwritten by the residual (to keep memory at one dense copy).
    """
    total = squared_norm(D)
    cap = min(D.shape) if max_rank is None else min(max_rank, *D.shape)
    if rule.kind == "rank":
        k_probe = min(int(rule.value), cap)
    else:
        k_probe = min(64, cap)
    while True:
        svd = randomized_svd(D, k_probe, oversample=oversample, n_iter=n_iter, seed=seed, dtype=D.dtype)
        if rule.kind == "rank":
            k = min(int(rule.value), svd.rank)
            break
        s2 = svd.S.double() ** 2
        need = rule.value * total if rule.kind == "energy" else (1 - rule.value**2) * total
        reached = torch.nonzero(torch.cumsum(s2, 0) >= need * (1 - 1e-12))
        if len(reached) or k_probe >= cap:
            k = int(reached[0]) + 1 if len(reached) else svd.rank
            break
        k_probe = min(2 * k_probe, cap)
    svd = svd.truncate(max(k, 1))
    D.addmm_(svd.U * svd.S, svd.Vh, alpha=-1.0)
    err = math.sqrt(squared_norm(D) / total) if total > 0 else 0.0
    return svd, err


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
    seed: int = 0,
    max_rank: int | None = None,
    to_format: str = "peft",
    dtype: torch.dtype | None = None,
    device: str = "auto",
    dry_run: bool = False,
) -> Report:
    """``lorakit extract``: a LoRA approximating ``finetuned − base``; the report gives each module's error."""
    from lorakit.api import save
    from lorakit.device import resolve_device
    from lorakit.io.atomic import check_output_path
    from lorakit.provenance import make_provenance

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
        report = Report(title="plan: " + title, columns=["tensor", "shape"])
        for k in names:
            report.add_row(k, list(b.shape(k)))
        report.summary = {"tensor_count": len(names)}
        return report
    dev = resolve_device(device)
    modules: dict[str, LoraFactors] = {}
    rows: list[ExtractedModule] = []
    unchanged: list[str] = []
    for k in names:
        wb, wt = b.get(k), t.get(k)
        out_dtype = dtype or wt.dtype
        D = wt.to(dev, torch.float32)  # wt's own buffer when already float32: it was read fresh, ours to overwrite
        D.sub_(wb.to(dev, torch.float32))
        del wb, wt
        shape4 = tuple(D.shape)
        D = D.reshape(D.shape[0], -1)
        if not bool(D.any()):
            unchanged.append(k)
            continue
        svd, err = low_rank_fit(D, rule, oversample=oversample, n_iter=n_iter, seed=seed, max_rank=max_rank)
        del D
        f = svd.to_factors(dtype=out_dtype)
        kind, kernel = ("conv", (shape4[2], shape4[3])) if len(shape4) == 4 else ("linear", None)
        name = k.removesuffix(".weight")
        modules[name] = LoraFactors(f.A.cpu().contiguous(), f.B.cpu().contiguous(), 1.0, kernel, kind)  # type: ignore[arg-type]
        rows.append(ExtractedModule(name, (int(shape4[0]), int(math.prod(shape4[1:]))), svd.rank, err))
    changed_1d = [k for k in t.keys() if k in b and len(t.shape(k)) == 1 and not torch.equal(t.get(k), b.get(k))]
    if not modules:
        raise KeyMappingError("the two checkpoints are identical in every selected tensor: nothing to extract",
                              file=finetuned)
    adapter = Adapter(modules, AdapterMeta(base_model=str(base), source_format="peft"))
    params = {"rule": str(rule), "oversample": oversample, "n_iter": n_iter, "seed": seed,
              "base": Path(base).name, "finetuned": Path(finetuned).name}
    save(adapter, output, format=to_format, provenance=make_provenance("extract", params), inputs=(base, finetuned))
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
    return report
