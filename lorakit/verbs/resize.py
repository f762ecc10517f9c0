"""``lorakit resize``: load, check the rule from the headers, resize (streamed), write atomically, report."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from lorakit.adapter import Adapter
from lorakit.errors import naming_file
from lorakit.factors import LoraFactors
from lorakit.io.atomic import check_output_path
from lorakit.linalg import default_window_bytes
from lorakit.ops.rank_rules import RankRule
from lorakit.ops.resize import (
    ModuleResize,
    _check_rule,
    needs_spectra,
    planned_ranks,
    resize_modules,
    resize_report,
)
from lorakit.report import Report
from lorakit.run import RunOptions, run_options
from lorakit.verbs.engine import Output, windowed, write_adapter
from lorakit.verbs.inspect import spectra as inspect_spectra
from lorakit.verbs.store import default_output_format, load


def resize_stream(
    adapter: Adapter,
    rule: RankRule | None = None,
    *,
    budget: int | None = None,
    expand: bool = False,
    device: torch.device | str = "cpu",
    window_bytes: int | None = None,
) -> tuple[Adapter, dict[str, ModuleResize]]:
    """The resized adapter, lazy, and the per-module results, filled in as its modules are computed.

    The output ranks come from :func:`~lorakit.ops.resize.planned_ranks` (over the streamed spectra,
    :func:`lorakit.verbs.inspect.spectra`, for a rule other than ``--rank K``), so the adapter's headers are known
    before any module is decomposed; a writer then pulls the modules in order through the engine's module
    stream (:class:`~lorakit.verbs.engine.ModuleStream`: read ahead, then per window
    :func:`~lorakit.ops.resize.resize_modules`: QR core, the ``k`` kept singular vectors, cast), a window at a
    time (``window_bytes`` of float32 factors; default one module on CPU, 512 MiB of same-shaped modules batched
    on CUDA), and memory stays at one window whatever the adapter's size. Other arguments as for :func:`resize`.
    """
    infos = adapter.infos()
    _check_rule(rule, budget, infos, expand)
    dev = torch.device(device)
    window_bytes = default_window_bytes(dev) if window_bytes is None else window_bytes
    # the planning pass, when the rule needs it: every module's spectrum, streamed like the resize itself
    spectra = dict(inspect_spectra(adapter, device=dev, window_bytes=window_bytes)) if needs_spectra(rule) else None
    ranks = planned_ranks(infos, rule, budget, spectra)
    pad = int(rule.value) if expand and rule is not None else None
    rows: dict[str, ModuleResize] = {}

    def work(view: Adapter, window: list[str]) -> dict[str, LoraFactors]:
        out: dict[str, LoraFactors] = {}
        for n, f, row in resize_modules(view, window, ranks, pad=pad, device=dev):
            out[n], rows[n] = f, row
        return out

    stream = windowed(adapter, work, device=dev, window_bytes=window_bytes)
    out_infos = {n: replace(i, rank=max(ranks[n], pad or 0), scale=1.0) for n, i in infos.items()}
    return Adapter({n: partial(stream.get, n) for n in adapter}, adapter.meta, out_infos), rows


def resize(
    adapter: Adapter,
    rule: RankRule | None = None,
    *,
    budget: int | None = None,
    expand: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[Adapter, list[ModuleResize]]:
    """Resize every module of ``adapter`` by ``rule`` or under a global parameter ``budget`` (in memory; the CLI
    streams the same computation, :func:`resize_stream`, into the output file).

    ``rule`` of kind ``rank`` keeps ``min(K, current rank)`` unless ``expand``, which zero-pads to exactly K
    (ΔW unchanged). Other rules choose per module from its spectrum. The output is in canonical form (scale
    1), in the input's dtype. DoRA magnitudes and extras are carried through.

    Raises:
        RankError: ``--rank K`` larger than a layer's ``min(out, in)``.
        OperatorParameterError: no rule or two, ``--expand`` without ``--rank``, a budget below rank 1 everywhere.
    """
    lazy, rows = resize_stream(adapter, rule, budget=budget, expand=expand, device=device)
    resized = lazy.materialize()
    return resized, [rows[n] for n in adapter]


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

    ``run``: device, output dtype and window (``None``: the defaults, :meth:`RunOptions.resolve`)."""
    run = run_options(run)
    dtype = run.dtype
    check_output_path(output, [source])
    adapter = load(source, allow_pickle=allow_pickle)
    infos = adapter.infos()
    with naming_file(source):
        _check_rule(rule, budget, infos, expand)
    what = f"budget {budget:,}" if budget is not None else str(rule) + (" (expand)" if expand else "")
    if dry_run:
        report = Report(title=f"resize {source} by {what} → {output}", columns=["module", "out x in", "rank in"])
        for n, i in infos.items():
            report.add_row(n, f"{i.out_features}x{i.in_features}", i.rank)
        report.summary = {"module_count": len(infos), "parameters_before": adapter.num_params}
        return report.finish(output=output, inputs=[adapter], dry_run=True)
    resized, rows = resize_stream(adapter, rule, budget=budget, expand=expand, device=run.device,
                                  window_bytes=run.window_bytes)
    if dtype is not None:
        resized = resized.map(lambda _n, f: f.with_(A=f.A.to(dtype), B=f.B.to(dtype)),
                              {n: replace(i, dtype=dtype) for n, i in resized.infos().items()})
    params = {"rule": what, "budget": budget, "expand": expand}
    fmt = to_format or default_output_format(resized)
    write_adapter(resized, Output(output, "resize", params, (source,), fmt))
    report = resize_report([rows[n] for n in adapter], f"resized {source} by {what} → {output}")
    return report.finish(output=output, format=fmt, inputs=[adapter])
