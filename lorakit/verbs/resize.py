"""``lorakit resize``: load, check the rule from the headers, resize (streamed), write atomically, report."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from lorakit.errors import naming_file
from lorakit.io.atomic import check_output_path
from lorakit.ops.rank_rules import RankRule
from lorakit.ops.resize import _check_rule, resize_report, resize_stream
from lorakit.report import Report
from lorakit.run import RunOptions, run_options
from lorakit.verbs.engine import Output, write_adapter
from lorakit.verbs.store import load


def resize_file(
    source: str | Path,
    output: str | Path,
    rule: RankRule | None = None,
    *,
    budget: int | None = None,
    expand: bool = False,
    to_format: str | None = None,
    run: RunOptions | None = None,
    dry_run: bool = False,
    allow_pickle: bool = False,
) -> Report:
    """``lorakit resize``: load, validate from the header, resize, write atomically; returns the report.

    ``run``: device and output dtype (``None``: the defaults, :meth:`RunOptions.resolve`)."""
    run = run_options(run)
    dtype = run.dtype
    check_output_path(output, [source])
    adapter = load(source, allow_pickle=allow_pickle)
    infos = adapter.infos()
    with naming_file(source):
        _check_rule(rule, budget, infos, expand)
    what = f"budget {budget:,}" if budget is not None else str(rule) + (" (expand)" if expand else "")
    if dry_run:
        report = Report(title=f"plan: resize {source} by {what} → {output}",
                        columns=["module", "out x in", "rank in"])
        for n, i in infos.items():
            report.add_row(n, f"{i.out_features}x{i.in_features}", i.rank)
        report.summary = {"module_count": len(infos), "parameters_before": adapter.num_params}
        return report
    resized, rows = resize_stream(adapter, rule, budget=budget, expand=expand, device=run.device)
    if dtype is not None:
        resized = resized.map(lambda _n, f: f.with_(A=f.A.to(dtype), B=f.B.to(dtype)),
                              {n: replace(i, dtype=dtype) for n, i in resized.infos().items()})
    params = {"rule": what, "budget": budget, "expand": expand}
    write_adapter(resized, Output(output, "resize", params, (source,), to_format))
    report = resize_report([rows[n] for n in adapter], f"resized {source} by {what} → {output}")
    report.notes.extend(adapter.meta.notes)
    return report
