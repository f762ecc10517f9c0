"""The report skeleton: ``Report.finish`` (output and format last, dry-run marking, the inputs' notes) and the
JSON layout."""

from __future__ import annotations

import pytest

from lorakit.adapter import Adapter, AdapterMeta
from lorakit.report import PLAN, Report
from lorakit.testing import random_adapter

SHAPES = {"q": (6, 4), "v": (3, 4)}


def _with_notes(path: str | None, *notes: str) -> Adapter:
    return random_adapter(SHAPES, 2).with_meta(source_path=path, notes=notes)


def test_finish_puts_output_then_format_last_and_marks_a_dry_run():
    r = Report("merge 2", ["module"], summary={"module_count": 2})
    assert r.finish(output="o.safetensors", format="peft", dry_run=True) is r
    assert r.title == PLAN + "merge 2"
    assert list(r.summary.items()) == [("module_count", 2), ("output", "o.safetensors"), ("format", "peft"),
                                       ("dry_run", True)]
    plain = Report("x").finish()
    assert plain.title == "x" and plain.summary == {} and plain.notes == []


def test_finish_appends_the_inputs_notes_once_named_by_file_when_several():
    one = Report("r", notes=["own"]).finish(inputs=[_with_notes("/d/a.safetensors", "scale 1.0 applies")])
    assert one.notes == ["own", "scale 1.0 applies"]
    two = Report("r").finish(inputs=[_with_notes("/d/a.safetensors", "n1"), _with_notes("/d/b.safetensors", "n1"),
                                     _with_notes("/d/a.safetensors", "n1"), Adapter({}, AdapterMeta())])
    assert two.notes == ["a.safetensors: n1", "b.safetensors: n1"]


def test_json_layout_and_reserved_keys():
    r = Report("t", ["module", "rank"]).finish(output="o")
    r.add_row("q", 2)
    assert r.to_json() == {"title": "t", "output": "o", "modules": [{"module": "q", "rank": 2}], "notes": []}
    with pytest.raises(ValueError, match="clash"):
        Report("t", ["m"], summary={"modules": 1}).to_json()
