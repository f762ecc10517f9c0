"""What ``lorakit inspect`` shows: an adapter's format, base model, modules, ranks, scales, dtypes, sizes.

Header-only by default (no tensor is read); ``norms=True`` reads each module once and computes ‖ΔW‖_F in
factored form, O((out + in)·r²) per module.
"""

from __future__ import annotations

from collections import Counter

from lorakit.adapter import Adapter
from lorakit.report import Report


def _dtype_name(dtype: object) -> str:
    return str(dtype).removeprefix("torch.")


def describe(adapter: Adapter, *, norms: bool = False) -> Report:
    """A :class:`Report` with one row per module and the adapter's totals.

    Columns: module, kind, shape (out×in of the flattened ΔW), rank, scale, dtype[, norm].
    """
    meta = adapter.meta
    infos = adapter.infos()
    columns = ["module", "kind", "out x in", "rank", "scale", "dtype"] + (["‖ΔW‖_F"] if norms else [])
    report = Report(title=f"{meta.source_path or 'adapter'} ({meta.source_format or 'in-memory'})", columns=columns)
    total_sq = 0.0
    for name, info in infos.items():
        row: list[object] = [name, info.kind + (f" {info.kernel[0]}x{info.kernel[1]}" if info.kernel else ""),
                             f"{info.out_features}x{info.in_features}", info.rank, info.scale, _dtype_name(info.dtype)]
        if norms:
            n = adapter[name].norm()
            total_sq += n * n
            row.append(n)
        report.add_row(*row)
    ranks = Counter(i.rank for i in infos.values())
    scales = Counter(round(i.scale, 6) for i in infos.values())
    report.summary = {
        "format": meta.source_format,
        "base_model": meta.base_model,
        "modules": len(infos),
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "scales": {str(k): v for k, v in sorted(scales.items())},
        "dtypes": sorted({_dtype_name(i.dtype) for i in infos.values()}),
        "kinds": dict(Counter(i.kind for i in infos.values())),
        "parameters": adapter.num_params,
        "dora": any(i.has_magnitude for i in infos.values()),
    }
    if norms:
        report.summary["total_norm"] = total_sq ** 0.5
    if meta.passthrough:
        report.notes.append(f"{len(meta.passthrough)} non-LoRA tensor(s) carried through (e.g. modules_to_save)")
    report.notes.extend(meta.notes)
    return report
