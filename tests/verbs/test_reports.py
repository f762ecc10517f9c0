"""Every verb's report ends the same way (``Report.finish``): the output, then its format, last in the summary;
a dry run titled ``plan: ``, marked ``dry_run`` and writing nothing; one key per fact across verbs."""

from __future__ import annotations

import json

import pytest

import lorakit
from lorakit.report import PLAN
from lorakit.testing import random_adapter

SHAPES = {"q": (8, 4), "v": (4, 4)}


@pytest.mark.parametrize("verb", [
    ["merge", "{a}", "{b}", "-o", "{out}"],
    ["merge", "{a}", "{b}", "-o", "{out}", "--dry-run"],
    ["resize", "{a}", "--rank", "1", "-o", "{out}"],
    ["resize", "{a}", "--rank", "1", "-o", "{out}", "--dry-run"],
    ["convert", "{a}", "--to", "kohya", "-o", "{out}"],
    ["quantize", "{a}", "--bits", "4", "--block", "2", "-o", "{out}"],
    ["quantize", "{a}", "--bits", "4", "--block", "2", "-o", "{out}", "--dry-run"],
])
def test_every_adapter_verb_report_ends_with_its_output(verb, tmp_path, cli):
    a, b, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "out.safetensors"
    lorakit.save(random_adapter(SHAPES, 2, seed=0), a, format="peft")
    lorakit.save(random_adapter(SHAPES, 2, seed=1), b, format="peft")
    code, stdout, err = cli(*[v.format(a=a, b=b, out=out) for v in verb], "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    keys = [k for k in rep if k not in ("title", "modules", "notes")]
    dry = "--dry-run" in verb
    tail = ["output", "dry_run"] if dry else (["output", "format"])
    assert keys[-len(tail):] == tail and rep["output"] == str(out)
    assert rep["title"].startswith(PLAN) == dry and out.exists() != dry
    assert "n_modules" not in rep and "params" not in rep
