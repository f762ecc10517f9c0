"""extract: a LoRA from two checkpoints, error equal to the optimal truncation error, bad input refused."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit.ops.extract import low_rank_fit
from lorakit.ops.rank_rules import rank_rule
from tests.io._checkpoints import write_checkpoint


def _pair(shards: int = 1):
    g = torch.Generator().manual_seed(0)
    base = {
        "model.embed_tokens.weight": torch.randn(40, 32, generator=g),
        "model.layers.0.q_proj.weight": torch.randn(48, 32, generator=g),
        "model.layers.0.up_proj.weight": torch.randn(80, 32, generator=g),
        "model.layers.0.down_proj.weight": torch.randn(32, 80, generator=g),
        "model.conv.weight": torch.randn(12, 4, 3, 3, generator=g),
        "model.norm.weight": torch.ones(32),
    }
    tuned = {}
    for k, t in base.items():
        if t.ndim == 1:
            tuned[k] = t + 0.01
            continue
        flat = t.reshape(t.shape[0], -1)
        m, n = flat.shape
        # a decaying spectrum plus a little full-rank noise: realistic, and the tail is not zero
        U, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g))
        V, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g))
        s = 0.7 ** torch.arange(min(m, n), dtype=torch.float32)
        d = (U * s) @ V.T + 1e-3 * torch.randn(m, n, generator=g)
        tuned[k] = t + d.reshape(t.shape)
    tuned["model.embed_tokens.weight"] = base["model.embed_tokens.weight"].clone()
    return base, tuned


def _optimal(base, tuned, k, rank):
    d = (tuned[k].double() - base[k].double()).reshape(base[k].shape[0], -1)
    s = torch.linalg.svdvals(d)
    return float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())


@pytest.mark.parametrize("shards", [1, 2])
def test_extract_rank_error_is_optimal(tmp_path, cli, shards):
    base, tuned = _pair()
    b = write_checkpoint(tmp_path / ("base.safetensors" if shards == 1 else "base"), base, shards)
    t = write_checkpoint(tmp_path / ("tuned.safetensors" if shards == 1 else "tuned"), tuned, shards)
    out = tmp_path / "lora"
    code, stdout, err = cli("extract", b, t, "--rank", "6", "-o", out, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    rows = {m["module"]: m for m in report["modules"]}
    assert set(rows) == {"model.layers.0.q_proj", "model.layers.0.up_proj", "model.layers.0.down_proj",
                         "model.conv"}  # embeddings excluded, 1-D skipped
    assert any("1-D" in n for n in report["notes"])
    lora = lorakit.load(out)
    for name, row in rows.items():
        key = name + ".weight"
        opt = _optimal(base, tuned, key, 6)
        assert row["rel error"] == pytest.approx(opt, rel=0.01)
        d = (tuned[key].double() - base[key].double()).reshape(base[key].shape[0], -1)
        got = torch.linalg.norm(d - lora[name].delta(torch.float64)) / torch.linalg.norm(d)
        assert float(got) == pytest.approx(row["rel error"], rel=1e-3)
        assert lora.info(name).rank == 6
    assert lora.info("model.conv").kind == "conv" and lora.info("model.conv").kernel == (3, 3)


def test_extract_energy_picks_the_smallest_sufficient_rank(tmp_path, cli):
    base, tuned = _pair()
    b = write_checkpoint(tmp_path / "b.safetensors", base)
    t = write_checkpoint(tmp_path / "t.safetensors", tuned)
    code, stdout, err = cli("extract", b, t, "--energy", "0.95", "-o", tmp_path / "l.safetensors", "--json")
    assert code == 0, err
    for m in json.loads(stdout)["modules"]:
        key = m["module"] + ".weight"
        d = (tuned[key].double() - base[key].double()).reshape(base[key].shape[0], -1)
        s2 = torch.linalg.svdvals(d).square()
        c = torch.cumsum(s2, 0) / s2.sum()
        assert m["rank"] == int((c < 0.95).sum()) + 1
        assert 1 - m["rel error"] ** 2 >= 0.95 - 1e-6


def test_low_rank_fit_grows_probes_until_energy_is_reached():
    g = torch.Generator().manual_seed(5)
    U, _ = torch.linalg.qr(torch.randn(300, 200, generator=g))
    V, _ = torch.linalg.qr(torch.randn(200, 200, generator=g))
    s = 0.99 ** torch.arange(200, dtype=torch.float32)  # slow decay: needs far more than 64 directions
    D = (U * s) @ V.T
    svd, err = low_rank_fit(D.clone(), rank_rule(energy=0.9))
    c = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum()
    assert svd.rank == int((c < 0.9).sum()) + 1 > 64
    assert err <= (0.1 + 1e-5) ** 0.5


@pytest.mark.parametrize("case,args,message", [
    ("shape", ["--rank", "4"], "in the base but"),
    ("missing", ["--rank", "4"], "is missing from the"),
    ("rank", ["--rank", "33"], "larger than the layer"),
    ("rule", ["--sv-ratio", "3"], "No such option"),
    ("energy", ["--energy", "1.2"], "--energy must be in (0, 1]"),
])
def test_bad_input_clear_error_nothing_written(tmp_path, cli, case, args, message):
    base, tuned = _pair()
    if case == "shape":
        tuned["model.layers.0.q_proj.weight"] = torch.zeros(48, 31)
    if case == "missing":
        del tuned["model.layers.0.up_proj.weight"]
    b = write_checkpoint(tmp_path / "b.safetensors", base)
    t = write_checkpoint(tmp_path / "t.safetensors", tuned)
    before = (b.read_bytes(), t.read_bytes())
    code, _, err = cli("extract", b, t, *args, "-o", tmp_path / "out")
    assert code in (1, 2) and message in err and "Traceback" not in err
    assert code == (2 if case == "rule" else 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors", "t.safetensors"]
    assert (b.read_bytes(), t.read_bytes()) == before
