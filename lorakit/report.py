"""Reports: what an operation did, per module and in total, as data (rendered by the CLI as a table or JSON).

Every verb's report has one skeleton: a title saying what was done, the per-module table (``columns``, one row
per module), the verb's own totals in ``summary``, its notes; then :meth:`Report.finish` adds what all verbs
share, in one order: the output written (``output``, then ``format``) as the last summary keys, ``"plan: "``
before the title and ``dry_run: true`` for a dry run, and the notes the input adapters carried from their readers
(conventions applied, options ignored) after the verb's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorakit.adapter import Adapter

PLAN = "plan: "  # the title's prefix in a dry run: what would be done


@dataclass
class Report:
    """A table of per-module rows plus totals and notes.

    Args:
        title: one line saying what was done.
        columns: column names of ``rows``.
        rows: one list of values per module.
        summary: totals and facts about the whole (shown under the table; top-level keys in JSON).
        notes: things the user should know (lossy steps, conventions applied).
    """

    title: str
    columns: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add_row(self, *values: Any) -> None:
        self.rows.append(list(values))

    def finish(self, *, output: str | Path | None = None, format: str | None = None,
               inputs: Sequence[Adapter] = (), dry_run: bool = False) -> Report:
        """The end every verb's report shares; returns ``self``.

        Args:
            output: the path written (for a dry run: that would be written): ``summary["output"]``, as text.
            format: the written adapter's format: ``summary["format"]``, after ``output``.
            inputs: the input adapters; their readers' notes (``meta.notes``) follow the verb's own, each once,
                prefixed by the input's file name when there are several inputs.
            dry_run: nothing was written: ``"plan: "`` before the title, ``summary["dry_run"] = True`` last.
        """
        if output is not None:
            self.summary["output"] = str(output)
        if format is not None:
            self.summary["format"] = format
        if dry_run:
            self.title = PLAN + self.title
            self.summary["dry_run"] = True
        for a in inputs:
            label = Path(a.meta.source_path).name if len(inputs) > 1 and a.meta.source_path else None
            for note in a.meta.notes:
                text = f"{label}: {note}" if label else note
                if text not in self.notes:
                    self.notes.append(text)
        return self

    def to_json(self) -> dict[str, Any]:
        """``{"title", **summary, "modules": [row dicts keyed by column], "notes"}``.

        ``modules`` is present only for a report with columns; a summary key may not shadow it (or ``title``,
        ``notes``): that would silently drop data, so it raises ``ValueError``.
        """
        reserved = {"title", "notes"} | ({"modules"} if self.columns else set())
        clash = reserved & set(self.summary)
        if clash:
            raise ValueError(f"report summary keys {sorted(clash)} clash with the JSON layout")
        out: dict[str, Any] = {"title": self.title, **self.summary}
        if self.columns:
            out["modules"] = [dict(zip(self.columns, r)) for r in self.rows]
        out["notes"] = list(self.notes)
        return out
