"""What ``lorakit inspect`` shows: an adapter's format, base model, modules, ranks, scales, dtypes, sizes.

Header-only: no tensor is read here. ``‖ΔW‖_F`` per module (``inspect --norms``) is read and computed by the
inspect verb (:func:`lorakit.verbs.inspect.module_norms`, streamed) and passed in as ``norms``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from lorakit.adapter import Adapter, ModuleInfo
from lorakit.report import Report

COLUMNS = ["module", "kind", "shape", "rank", "scale", "dtype"]


def dtype_name(dtype: object) -> str:
    return str(dtype).removeprefix("torch.")


def scale_text(scale: float) -> str:
    """A scale as a stable short string (6 significant digits): ``2``, ``0.5``, ``5.65685``."""
    return f"{scale:.6g}"


def kind_text(info: ModuleInfo) -> str:
    return info.kind + (f" {info.kernel[0]}x{info.kernel[1]}" if info.kernel else "")


def describe(adapter: Adapter, *, norms: Mapping[str, float] | None = None) -> Report:
    """A :class:`Report` with one row per module and the adapter's totals.

    Columns: module, kind, shape (out×in of the flattened ΔW), rank, scale, dtype[, norm = ‖ΔW‖_F].
    Summary (also the top-level keys of ``--json``): ``format``, ``base_model``, ``module_count``, ``ranks``
    and ``scales`` (value → number of modules, values as strings, sorted), ``dtypes``, ``kinds``,
    ``parameters``, ``dora`` and, with ``norms`` (module → ‖ΔW‖_F, every module), ``total_norm`` = sqrt(Σ ‖ΔW‖²).
    """
    meta = adapter.meta
    infos = adapter.infos()
    report = Report(title=f"{meta.source_path or 'adapter'} ({meta.source_format or 'in-memory'})",
                    columns=COLUMNS + (["norm"] if norms is not None else []))
    total_sq = 0.0
    for name, info in infos.items():
        row: list[object] = [name, kind_text(info), f"{info.out_features}x{info.in_features}", info.rank,
                             info.scale, dtype_name(info.dtype)]
        if norms is not None:
            n = norms[name]
            total_sq += n * n
            row.append(n)
        report.add_row(*row)
    ranks = Counter(i.rank for i in infos.values())
    scales = Counter(i.scale for i in infos.values())
    scale_counts: Counter[str] = Counter()
    for s in sorted(scales):
        scale_counts[scale_text(s)] += scales[s]
    report.summary = {
        "format": meta.source_format,
        "base_model": meta.base_model,
        "module_count": len(infos),
        "ranks": {str(k): ranks[k] for k in sorted(ranks)},
        "scales": dict(scale_counts),
        "dtypes": sorted({dtype_name(i.dtype) for i in infos.values()}),
        "kinds": dict(sorted(Counter(kind_text(i) for i in infos.values()).items())),
        "parameters": adapter.num_params,
        "dora": any(i.has_magnitude for i in infos.values()),
    }
    n_bias = sum(i.has_bias for i in infos.values())
    if n_bias:
        report.summary["bias_updates"] = n_bias
    if meta.full_tensors:
        report.summary["saved_module_tensors"] = len(meta.full_tensors)
    if norms is not None:
        report.summary["total_norm"] = total_sq ** 0.5
    if meta.full_tensors:
        report.notes.append(f"{len(meta.full_tensors)} whole module tensor(s) saved with the adapter (modules_to_save,"
                            f" e.g. {next(iter(meta.full_tensors))}): apply replaces the base's")
    if meta.passthrough:
        report.notes.append(f"{len(meta.passthrough)} other non-LoRA tensor(s) carried through (e.g. "
                            f"{next(iter(meta.passthrough))}); apply refuses them")
    return report.finish(inputs=[adapter])
