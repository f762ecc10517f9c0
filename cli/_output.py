"""Printing: reports as rich tables or JSON on stdout; progress bars and notes on stderr."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from lorakit.report import Report

T = TypeVar("T")
_consoles: dict[str, Any] = {}


def _console(name: str) -> Any:
    """The rich console ``stdout`` or ``stderr``, made on first use, so that a run that prints nothing
    (``--quiet``, ``--json``) never imports rich (45 ms of a ``merge``'s start-up)."""
    if name not in _consoles:
        from rich.console import Console

        _consoles[name] = Console(soft_wrap=True) if name == "stdout" else Console(stderr=True)
    return _consoles[name]


def __getattr__(name: str) -> Any:
    """The module's ``stdout`` and ``stderr`` (:func:`_console`)."""
    if name not in ("stdout", "stderr"):
        raise AttributeError(name)
    return _console(name)


def fmt(value: Any) -> str:
    """A value as table text: floats to 4 significant digits, ``{value: count}`` tallies as ``8 (×16)``,
    lists comma-separated, booleans as yes/no, ``None`` as ``-``."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{fmt(k)} (×{v})" for k, v in value.items()) or "-"
    if isinstance(value, float):
        if value == 0 or not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if abs(value) >= 1e-3 else f"{value:.3e}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value)
    return "-" if value is None else str(value)


def emit(report: Report, *, as_json: bool = False, quiet: bool = False, max_rows: int | None = None) -> None:
    """Print a report: JSON (complete) or a table (rows elided beyond ``max_rows``) with summary and notes."""
    if as_json:
        print(json.dumps(report.to_json(), indent=2, default=str))
        return
    if quiet:
        return
    from rich.console import Console
    from rich.table import Table

    stdout, stderr = _console("stdout"), _console("stderr")
    if report.rows:
        table = Table(title=report.title, title_justify="left", show_edge=False, pad_edge=False)
        for i, c in enumerate(report.columns):
            table.add_column(c, justify="left" if i == 0 else "right", overflow="fold", no_wrap=i > 0)
        rows = report.rows
        if max_rows is not None and len(rows) > max_rows:
            half = max_rows // 2
            rows = [*rows[:half], ["…"] * len(report.columns), *rows[-half:]]
        for r in rows:
            table.add_row(*(fmt(v) for v in r))
        # Piped output is not wrapped at 80 columns: module names stay whole, one row per line (grep-able).
        out = stdout if stdout.is_terminal else Console(soft_wrap=True, width=100_000)
        out.print(table)
    else:
        stdout.print(report.title)
    for k, v in report.summary.items():
        stdout.print(f"  {k.replace('_', ' ')}: {fmt(v)}")
    for n in report.notes:
        stderr.print(f"note: {n}", style="yellow")


def progress(items: Iterable[T], total: int, description: str, *, quiet: bool = False) -> Iterator[T]:
    """Iterate with a progress bar and ETA on stderr (hidden with ``--quiet`` or when not a terminal)."""
    if quiet or not _console("stderr").is_terminal:
        yield from items
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=_console("stderr"), transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
