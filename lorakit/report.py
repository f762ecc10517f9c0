"""Reports: what an operation did, per module and in total, as data (rendered by the CLI as a table or JSON)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
