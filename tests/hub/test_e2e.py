"""Other verbs take ``hf://REPO[@REV]/path`` or ``REPO`` where a file is expected, pulling on demand."""

from __future__ import annotations

import json
import subprocess
import sys

import lorakit
from lorakit.provenance import read_provenance
from lorakit.testing import assert_adapters_close, random_adapter
from tests.hub.conftest import SHAPES, kohya_repo_files, peft_repo_files


def test_convert_and_inspect_hub_inputs(fake_hub, hub_env, tmp_path, cli):
    commit = fake_hub.add_repo("org/a", peft_repo_files(seed=1), tags=["peft"])
    fake_hub.add_repo("org/b", kohya_repo_files(seed=2))
    out = tmp_path / "a-kohya.safetensors"
    code, _, err = cli("convert", "hf://org/a", "--to", "kohya", "-o", out)
    assert code == 0, err
    converted = lorakit.load(out)
    assert converted.meta.source_format == "kohya"
    assert_adapters_close(converted, random_adapter(SHAPES, rank=4, seed=1))
    (inp,) = read_provenance(converted.meta.metadata)["inputs"]
    assert inp["repo"] == "org/a" and inp["revision"] == commit
    code, out_text, err = cli("inspect", "hf://org/b/style.safetensors", "--json")
    assert code == 0, err
    report = json.loads(out_text)
    assert len(report["modules"]) == len(SHAPES)


def test_python_level_sum_of_two_hub_adapters(fake_hub, hub_env, tmp_path):
    fake_hub.add_repo("org/a", peft_repo_files(seed=1))
    fake_hub.add_repo("org/b", peft_repo_files(seed=2))
    merged = lorakit.load("hf://org/a") + lorakit.load("hf://org/b")
    out = lorakit.save(merged, tmp_path / "m.safetensors", format="kohya")
    back = lorakit.load(out)
    a, b = random_adapter(SHAPES, rank=4, seed=1), random_adapter(SHAPES, rank=4, seed=2)
    for name in SHAPES:
        ref = a[name].delta().double() + b[name].delta().double()
        got = back[name].delta().double()
        assert (got - ref).norm() <= 1e-5 * ref.norm()


def test_import_lorakit_without_huggingface_hub():
    code = (
        "import sys; sys.modules['huggingface_hub'] = None\n"
        "import lorakit\n"
        "try:\n"
        "    lorakit.load('hf://org/a')\n"
        "except lorakit.LorakitError as e:\n"
        "    print(type(e).__name__, e.hint)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "MissingDependencyError pip install 'lorakit[hub]'"


def test_merge_cli_with_two_hub_adapters(fake_hub, hub_env, tmp_path, cli):
    """`lorakit merge hf://org/a hf://org/b -o m.safetensors`, end to end against the loopback Hub."""
    commit_a = fake_hub.add_repo("org/a", peft_repo_files(seed=1))
    commit_b = fake_hub.add_repo("org/b", peft_repo_files(seed=2))
    out = tmp_path / "m.safetensors"
    code, stdout, err = cli("merge", "hf://org/a", "hf://org/b", "-o", out, "--weights", "0.7,0.3", "--json")
    assert code == 0, err
    assert json.loads(stdout)["max_error"] == 0.0
    back = lorakit.load(out)
    a, b = random_adapter(SHAPES, rank=4, seed=1), random_adapter(SHAPES, rank=4, seed=2)
    for name in SHAPES:
        ref = 0.7 * a[name].delta().double() + 0.3 * b[name].delta().double()
        assert (back[name].delta().double() - ref).norm() <= 1e-5 * ref.norm()
    inputs = read_provenance(back.meta.metadata)["inputs"]
    assert [(i["repo"], i["revision"]) for i in inputs] == [("org/a", commit_a), ("org/b", commit_b)]
