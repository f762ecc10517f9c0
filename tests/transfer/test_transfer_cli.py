"""``lorakit transfer`` through the real entry point, and its bad inputs (one-line error, exit 1, nothing written)."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit.transfer.models import load_causal_lm
from lorakit.transfer.projection import model_weights


def test_prepare_writes_a_kit(cli, micro, tmp_path):
    code, out, err = cli("transfer", "prepare", micro["lora"], "--base", micro["source"], "--data", micro["data"],
                         "--seeds", "3", "--negatives", "8", "--epochs", "1", "--recall", "0", "--device", "cpu",
                         "-o", tmp_path / "kit", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["seeds"] == 3 and report["generated_negatives"] <= 8
    kit = tmp_path / "kit"
    assert len((kit / "seeds.jsonl").read_text().splitlines()) == 3
    info = json.loads((kit / "kit.json").read_text())
    assert info["task"] == "revupper"
    assert info["discriminator"]["recall"] == 0 and info["discriminator"]["threshold"] == 0  # the paper's rule
    a, b = lorakit.load(micro["lora"]), lorakit.load(kit / "adapter")
    for name in a:
        torch.testing.assert_close(a[name].delta(), b[name].delta())


def test_prepare_dry_run_writes_nothing(cli, micro, tmp_path):
    code, out, _ = cli("transfer", "prepare", micro["lora"], "--base", micro["source"], "--data", micro["data"],
                       "-o", tmp_path / "kit", "--dry-run")
    assert code == 0 and "plan: write a kit" in out and not (tmp_path / "kit").exists()


def test_seeds_file_with_fewer_examples_than_asked(cli, micro, tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"input": "ab", "output": "BA"}\n{"input": "cd", "output": "DC"}\n')
    code, _, err = cli("transfer", "prepare", micro["lora"], "--base", micro["source"], "--data", micro["data"],
                       "--seeds-file", seeds, "--seeds", "5", "-o", tmp_path / "kit")
    assert code == 1
    assert "2 examples, fewer than the 5 asked" in err and "hint: add examples or pass --seeds 2" in err
    assert not (tmp_path / "kit").exists()


@pytest.mark.parametrize("line,why", [
    ('{"input": "ab", "output": "BA"', "line 2 is not valid JSON"),
    ('{"input": "ab"}', 'line 2 needs string fields "input" and "output"'),
    ('["ab", "BA"]', 'line 2 needs string fields'),
])
def test_malformed_jsonl(cli, micro, tmp_path, line, why):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"input": "xy", "output": "YX"}\n' + line + "\n")
    before = data.read_bytes()
    code, _, err = cli("transfer", "prepare", micro["lora"], "--base", micro["source"], "--data", data,
                       "-o", tmp_path / "kit")
    assert code == 1 and why in err and str(data) in err
    assert err.count("\n") <= 2 and "Traceback" not in err
    assert not (tmp_path / "kit").exists() and data.read_bytes() == before


def test_target_without_matching_modules_names_the_ones_it_has(cli, kit, micro, tmp_path):
    code, _, err = cli("transfer", "run", kit, "--source-base", micro["source"], "--target-base", micro["target"],
                       "--target-modules", "c_attn", "-o", tmp_path / "out", "--device", "cpu")
    assert code == 1
    assert "no linear module of the target model" in err and "c_attn" in err
    assert "q_proj" in err and "down_proj" in err  # the hint lists the target's own module names
    assert not (tmp_path / "out").exists()


def test_kit_from_another_source_model(cli, kit, micro, tmp_path):
    code, _, err = cli("transfer", "run", kit, "--source-base", micro["other"], "--target-base", micro["target"],
                       "-o", tmp_path / "out", "--device", "cpu")
    assert code == 1 and "another source model" in err and "hint:" in err
    assert not (tmp_path / "out").exists()


def test_run_on_a_directory_that_is_not_a_kit(cli, micro, tmp_path):
    code, _, err = cli("transfer", "run", tmp_path, "--source-base", micro["source"], "--target-base",
                       micro["target"], "-o", tmp_path / "out")
    assert code == 1 and "not a transfer kit" in err


def test_project_identical_bases_is_exact(cli, micro, tmp_path):
    out = tmp_path / "proj"
    code, stdout, err = cli("transfer", "project", micro["lora"], "--source-base", micro["source"],
                            "--target-base", micro["source"], "--q", "0.25", "-o", out, "--json", "--device", "cpu")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["modules_projected"] == len(lorakit.load(micro["lora"]))
    assert all(m["similarity"] == pytest.approx(1.0) for m in rep["modules"])
    a, b = lorakit.load(micro["lora"]), lorakit.load(out)
    for name in a:
        torch.testing.assert_close(b[name].delta(torch.float64), a[name].delta(torch.float64), rtol=1e-5, atol=1e-6)


def test_project_between_different_bases_reports_per_module(cli, micro, tmp_path):
    code, stdout, _ = cli("transfer", "project", micro["lora"], "--source-base", micro["source"],
                          "--target-base", micro["other"], "--q", "4", "--min-similarity", "0.99", "--dry-run",
                          "--json")
    assert code == 0
    rep = json.loads(stdout)
    sims = [m["similarity"] for m in rep["modules"] if m["similarity"] is not None]
    assert sims and all(0 <= s < 0.99 for s in sims)
    assert rep["modules_projected"] == 0 and "output" not in rep and rep["dry_run"] is True


def test_project_refuses_a_different_shape_target(cli, micro, tmp_path):
    code, _, err = cli("transfer", "project", micro["lora"], "--source-base", micro["source"],
                       "--target-base", micro["target"], "-o", tmp_path / "p")
    assert code == 1 and "no base weight for this module in the target model" in err
    assert not (tmp_path / "p").exists()


def test_model_weights_orientation_matches_the_adapter(micro):
    weights = model_weights(load_causal_lm(micro["source"])[0])
    a = lorakit.load(micro["lora"])
    assert all(tuple(weights[n].shape) == a.info(n).shape for n in a)


def test_kit_whose_seeds_file_lost_examples(cli, kit, micro, tmp_path):
    import shutil

    broken = tmp_path / "kit"
    shutil.copytree(kit, broken)
    lines = (broken / "seeds.jsonl").read_text().splitlines()
    (broken / "seeds.jsonl").write_text("\n".join(lines[:2]) + "\n")
    code, _, err = cli("transfer", "run", broken, "--source-base", micro["source"], "--target-base",
                       micro["target"], "-o", tmp_path / "out")
    assert code == 1 and "2 examples, fewer than the 5 the kit was made with" in err
    assert not (tmp_path / "out").exists()


def test_run_through_the_cli_and_resume_a_finished_run(cli, kit, micro, tmp_path):
    args = ("transfer", "run", kit, "--source-base", micro["source"], "--target-base", micro["target"],
            "--samples", "3", "--epochs", "1", "--rank", "2", "--no-filter", "--device", "cpu",
            "-o", tmp_path / "out", "--json")
    code, out, err = cli(*args)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["accepted"] == 3 and rep["filter"] is False
    first = lorakit.load(tmp_path / "out" / "adapter")
    assert first.meta.base_model == micro["target"]
    state = json.loads((tmp_path / "out" / "state.json").read_text())
    assert state["done"] == ["synthesize", "teacher", "student"]
    code, out2, err = cli(*args)  # everything is done: nothing is recomputed, the same report comes back
    assert code == 0, err
    assert json.loads(out2)["accepted"] == 3
    again = lorakit.load(tmp_path / "out" / "adapter")
    for name in first:
        assert torch.equal(first[name].A, again[name].A)


def test_run_dry_run_writes_nothing(cli, kit, micro, tmp_path):
    code, out, _ = cli("transfer", "run", kit, "--source-base", micro["source"], "--target-base", micro["target"],
                       "-o", tmp_path / "out", "--dry-run")
    assert code == 0 and "plan: transfer" in out and not (tmp_path / "out").exists()


def test_run_refuses_an_output_directory_that_is_not_a_run(cli, kit, micro, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = cli("transfer", "run", kit, "--source-base", micro["source"], "--target-base", micro["target"],
                       "-o", out)
    assert code == 1 and "not a transfer run" in err
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
