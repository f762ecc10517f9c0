"""Write-then-read returns the same adapter, in every writable format and across formats.

"Same" means: the same module set, ΔW equal in float64, the same effective scale, rank, kind, kernel, factor
dtype and DoRA magnitude. kohya stores alpha as a float32 scalar, so its scales agree to float32 precision.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorakit
from lorakit import Adapter, LoraFactors
from lorakit.adapter import AdapterMeta
from lorakit.io import write_safetensors

# (format, output name): the PEFT format writes a directory, or one file with the config in its metadata.
TARGETS = [("peft", "out-dir"), ("peft", "out.safetensors"), ("kohya", "out.safetensors"),
           ("diffusers", "out.safetensors")]
SCALE_RTOL = {"kohya": 1e-7, "peft": 1e-12, "diffusers": 1e-12}


def factors(out: int, inn: int, r: int, *, scale: float, seed: int, kernel=None, dtype=torch.float32,
            magnitude: bool = False) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    cols = inn * (kernel[0] * kernel[1] if kernel else 1)
    A = torch.randn(r, cols, generator=g).to(dtype)
    B = torch.randn(out, r, generator=g).to(dtype)
    mag = (torch.rand(out, generator=g) + 0.5).to(dtype) if magnitude else None
    return LoraFactors(A, B, scale, kernel, "conv" if kernel else "linear", mag)


def assert_same(a: Adapter, b: Adapter, scale_rtol: float = 1e-12) -> None:
    assert list(a) == list(b) or set(a) == set(b), sorted(set(a) ^ set(b))
    for name in a:
        fa, fb = a[name], b[name]
        ia, ib = a.info(name), b.info(name)
        assert (ia.rank, ia.kind, ia.kernel, ia.dtype, ia.shape) == (ib.rank, ib.kind, ib.kernel, ib.dtype, ib.shape)
        assert fb.scale == pytest.approx(fa.scale, rel=scale_rtol), name
        assert ib.scale == fb.scale  # the header-only scale is the one the factors carry
        assert fb.A.dtype == fa.A.dtype and fb.B.dtype == fa.B.dtype
        torch.testing.assert_close(fb.delta(torch.float64), fa.delta(torch.float64), rtol=max(scale_rtol, 1e-12),
                                   atol=0, msg=lambda m, n=name: f"{n}: {m}")
        assert (fa.magnitude is None) == (fb.magnitude is None), name
        if fa.magnitude is not None:
            assert fb.magnitude.dtype == fa.magnitude.dtype
            torch.testing.assert_close(fb.magnitude.reshape(-1), fa.magnitude.reshape(-1), rtol=0, atol=0)


def rich_adapter(dtype=torch.float32) -> Adapter:
    """Heterogeneous ranks and scales, linear + conv 3x3 + conv 1x1, DoRA on two modules; diffusers-style names."""
    mods = {
        "unet.down_blocks.0.attentions.0.proj_in": factors(16, 8, 4, scale=2.0, seed=1, dtype=dtype),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q":
            factors(12, 16, 8, scale=16 / math.sqrt(8), seed=2, dtype=dtype, magnitude=True),
        "unet.down_blocks.0.resnets.0.conv1": factors(6, 5, 3, scale=0.37, seed=3, kernel=(3, 3), dtype=dtype),
        "unet.down_blocks.0.resnets.0.conv_shortcut": factors(6, 5, 2, scale=1.0, seed=4, kernel=(1, 1),
                                                              dtype=dtype),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj":
            factors(10, 10, 1, scale=-0.75, seed=5, dtype=dtype, magnitude=True),
        "text_encoder_2.text_model.encoder.layers.0.mlp.fc1": factors(20, 10, 5, scale=1 / 3, seed=6, dtype=dtype),
    }
    return Adapter(mods, AdapterMeta(base_model="tiny/base"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("fmt", "name"), TARGETS)
def test_write_read_is_identity(tmp_path, fmt, name, dtype):
    a = rich_adapter(dtype)
    out = tmp_path / name
    lorakit.save(a, out, format=fmt)
    b = lorakit.load(out)
    assert b.meta.source_format == fmt
    assert_same(a, b, SCALE_RTOL[fmt])
    # Reading what we wrote and writing it again in the same format changes nothing either.
    again = tmp_path / ("again-" + name)
    lorakit.save(b, again, format=fmt)
    assert_same(b, lorakit.load(again), SCALE_RTOL[fmt])


@pytest.mark.parametrize(("fmt", "name"), TARGETS)
def test_writers_predict_their_layout_so_every_tensor_is_written_in_place(tmp_path, monkeypatch, fmt, name):
    """Each format tells the writer every tensor's name, dtype and shape from the module infos (conv, DoRA,
    embedding included), so no byte is copied a second time; were a prediction wrong, the file would be the
    same (tests/io), only slower."""
    from lorakit.io import writer

    def copied(*_a, **_k):
        raise AssertionError("a tensor was not written in place")

    monkeypatch.setattr(writer, "_copy_range", copied)
    a = rich_adapter(torch.bfloat16)
    if fmt == "peft":
        emb = LoraFactors(torch.randn(3, 50), torch.randn(8, 3), 0.5, kind="embedding")
        a = Adapter({**{n: a[n] for n in a}, "model.embed_tokens": emb}, a.meta)
    lorakit.save(a, tmp_path / name, format=fmt)
    assert_same(a, lorakit.load(tmp_path / name), SCALE_RTOL[fmt])


def test_no_temporary_files_left(tmp_path):
    for fmt, name in TARGETS:
        lorakit.save(rich_adapter(), tmp_path / f"{fmt}-{name}", format=fmt)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def write_peft_dir(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    write_safetensors(path / "adapter_model.safetensors", tensors)
    return path


def peft_tensors(ranks: dict[str, int], out: int = 12, inn: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {}
    for name, r in ranks.items():
        t[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, inn, generator=g)
        t[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out, r, generator=g)
    return t


RANKS = {"model.layers.0.self_attn.q_proj": 4, "model.layers.0.self_attn.v_proj": 8,
         "model.layers.1.self_attn.q_proj": 4, "model.layers.1.mlp.down_proj": 2}


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_patterns_and_rslora_survive_every_format(tmp_path, rslora):
    config = {"r": 8, "lora_alpha": 16, "use_rslora": rslora, "rank_pattern": {"q_proj": 4, "down_proj": 2},
              "alpha_pattern": {"model.layers.1.self_attn.q_proj": 5, "down_proj": 0.5}}
    src = lorakit.load(write_peft_dir(tmp_path / "src", config, peft_tensors(RANKS)))
    root = math.sqrt if rslora else (lambda r: r)
    expected = {"model.layers.0.self_attn.q_proj": 16 / root(4), "model.layers.0.self_attn.v_proj": 16 / root(8),
                "model.layers.1.self_attn.q_proj": 5 / root(4), "model.layers.1.mlp.down_proj": 0.5 / root(2)}
    assert {n: src.info(n).scale for n in src} == pytest.approx(expected, rel=1e-15)
    for fmt, name in TARGETS:
        if fmt == "diffusers":
            continue  # language-model names have no diffusers component; see test_diffusers_refuses_bare_names
        out = tmp_path / f"{fmt}-{name}"
        lorakit.save(src, out, format=fmt)
        assert_same(src, lorakit.load(out), SCALE_RTOL[fmt])
    written = json.loads((tmp_path / "peft-out-dir" / "adapter_config.json").read_text())
    assert written["use_rslora"] is rslora
    # Alphas re-derived from scales carry no rounding noise: only the real overrides become patterns.
    assert written["lora_alpha"] == 16 and isinstance(written["lora_alpha"], int)
    assert written["alpha_pattern"] == {"model.layers.1.self_attn.q_proj": 5, "model.layers.1.mlp.down_proj": 0.5}
    # The most common rank (4) becomes r; the others are patterns under their full module names.
    assert written["r"] == 4
    assert written["rank_pattern"] == {"model.layers.0.self_attn.v_proj": 8, "model.layers.1.mlp.down_proj": 2}


def test_cross_format_chain_keeps_delta_and_scale(tmp_path):
    a = rich_adapter()
    lorakit.save(a, tmp_path / "a-peft", format="peft")
    lorakit.save(lorakit.load(tmp_path / "a-peft"), tmp_path / "a.kohya.safetensors", format="kohya")
    lorakit.save(lorakit.load(tmp_path / "a.kohya.safetensors"), tmp_path / "a.diff.safetensors",
                 format="diffusers")
    lorakit.save(lorakit.load(tmp_path / "a.diff.safetensors"), tmp_path / "b-peft", format="peft")
    b = lorakit.load(tmp_path / "b-peft")
    assert b.meta.source_format == "peft"
    assert_same(a, b, SCALE_RTOL["kohya"])


def test_diffusers_refuses_bare_names(tmp_path, cli):
    src = write_peft_dir(tmp_path / "src", {"r": 8, "lora_alpha": 8}, peft_tensors(RANKS))
    code, _, err = cli("convert", src, "--to", "diffusers", "-o", tmp_path / "d.safetensors")
    assert code == 1 and "component" in err and "peft" in err
    assert not (tmp_path / "d.safetensors").exists()


def test_kohya_without_alpha_reads_scale_one_and_inspect_says_so(tmp_path, cli):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "noalpha.safetensors"
    write_safetensors(path, {
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.randn(4, 8, generator=g),
        "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.randn(8, 4, generator=g),
        "lora_unet_mid_block_attentions_0_proj_out.lora_down.weight": torch.randn(2, 8, generator=g),
        "lora_unet_mid_block_attentions_0_proj_out.lora_up.weight": torch.randn(8, 2, generator=g),
        "lora_unet_mid_block_attentions_0_proj_out.alpha": torch.tensor(0.0),  # 0 means "alpha = rank"
    })
    a = lorakit.load(path)
    assert {a.info(n).scale for n in a} == {1.0}
    assert any("no alpha" in n and "1.0" in n for n in a.meta.notes)
    code, out, err = cli("inspect", path)
    assert code == 0 and "no alpha" in err and "scale 1.0" in err
    code, out, _ = cli("inspect", path, "--json")
    report = json.loads(out)
    assert any("no alpha" in n for n in report["notes"]) and report["scales"] == {"1": 2}


DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64])


@st.composite
def random_modules(draw):
    n = draw(st.integers(1, 4))
    mods = {}
    for i in range(n):
        out, inn = draw(st.integers(1, 9)), draw(st.integers(1, 9))
        kernel = draw(st.sampled_from([None, None, (1, 1), (3, 3), (1, 3)]))
        r = draw(st.integers(1, 6))
        scale = draw(st.one_of(st.floats(-100, 100, allow_nan=False).filter(lambda s: abs(s) > 1e-3),
                               st.sampled_from([1.0, 0.5, 2.0, 16 / math.sqrt(8)])))
        mods[f"unet.blocks.{i}.proj"] = factors(out, inn, r, scale=scale, seed=i, kernel=kernel,
                                                dtype=draw(DTYPES), magnitude=draw(st.booleans()))
    return Adapter(mods)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(adapter=random_modules(), target=st.sampled_from(TARGETS))
def test_round_trip_property(adapter, target):
    fmt, name = target
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / name
        lorakit.save(adapter, out, format=fmt)
        assert_same(adapter, lorakit.load(out).materialize(), SCALE_RTOL[fmt])


def test_inspect_reports_what_was_written(tmp_path, cli):
    out = tmp_path / "rich.safetensors"
    lorakit.save(rich_adapter(torch.bfloat16), out, format="kohya")
    code, text, _ = cli("inspect", out)
    assert code == 0
    summary = dict(line.strip().split(": ", 1) for line in text.splitlines() if line.startswith("  "))
    assert summary["module count"] == "6" and summary["dtypes"] == "bfloat16" and summary["dora"] == "yes"
    assert summary["ranks"] == "1 (×1), 2 (×1), 3 (×1), 4 (×1), 5 (×1), 8 (×1)"
    assert summary["kinds"] == "conv 1x1 (×1), conv 3x3 (×1), linear (×4)"
    assert "{" not in text and "'" not in text  # no Python reprs
    code, text, _ = cli("inspect", out, "--json", "--norms")
    report = json.loads(text)
    assert list(report) == ["title", "format", "base_model", "module_count", "ranks", "scales", "dtypes", "kinds",
                            "parameters", "dora", "total_norm", "modules", "notes"]
    assert report["ranks"] == {"1": 1, "2": 1, "3": 1, "4": 1, "5": 1, "8": 1}
    assert report["scales"]["0.37"] == 1 and report["scales"]["-0.75"] == 1
    a = lorakit.load(out)
    for row in report["modules"]:
        assert row["norm"] == pytest.approx(float(torch.linalg.norm(a[row["module"]].delta(torch.float64))),
                                            rel=1e-9)


def test_pissa_initialised_adapter_gets_a_note(tmp_path):
    src = write_peft_dir(tmp_path / "pissa", {"r": 4, "lora_alpha": 4, "init_lora_weights": "pissa_niter_4"},
                         peft_tensors({"model.layers.0.self_attn.q_proj": 4}))
    assert any("modified at initialisation" in n for n in lorakit.load(src).meta.notes)


def test_saving_over_the_source_is_refused(tmp_path):
    from lorakit.errors import OutputError

    path = tmp_path / "a.safetensors"
    lorakit.save(rich_adapter(), path, format="kohya")
    before = path.read_bytes()
    a = lorakit.load(path)
    with pytest.raises(OutputError, match="would overwrite the input"):
        lorakit.save(a, path)
    assert path.read_bytes() == before


def test_dora_magnitude_layouts(tmp_path):
    """PEFT stores conv magnitudes as (1, out, 1, 1); lorakit holds (out,); a per-input magnitude has no PEFT
    form and is refused by the PEFT writer."""
    conv = factors(6, 5, 3, scale=1.0, seed=1, kernel=(3, 3), magnitude=True)
    a = Adapter({"unet.conv": conv})
    lorakit.save(a, tmp_path / "p", format="peft")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "p" / "adapter_model.safetensors"), framework="pt") as f:
        assert tuple(f.get_slice("base_model.model.unet.conv.lora_magnitude_vector").get_shape()) == (1, 6, 1, 1)
    assert tuple(lorakit.load(tmp_path / "p")["unet.conv"].magnitude.shape) == (6,)
    per_input = Adapter({"unet.lin": factors(6, 6, 2, scale=1.0, seed=2).with_(magnitude=torch.ones(1, 6))})
    from lorakit.errors import FormatError

    for fmt, name in [("peft", "q"), ("diffusers", "q.safetensors")]:
        with pytest.raises(FormatError, match="per-input"):
            lorakit.save(per_input, tmp_path / name, format=fmt)
        assert not (tmp_path / name).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_reader_option_of_another_format_is_noted(tmp_path):
    lorakit.save(rich_adapter(), tmp_path / "p", format="peft")
    adapter = lorakit.load(tmp_path / "p", keymap={})
    assert any("keymap ignored" in n and "peft" in n for n in adapter.meta.notes)


def test_tucker_conv_is_folded_exactly_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(3)
    A = torch.randn(3, 4, 1, 1, generator=g, dtype=torch.float64)
    mid = torch.randn(3, 3, 3, 3, generator=g, dtype=torch.float64)
    B = torch.randn(5, 3, 1, 1, generator=g, dtype=torch.float64)
    path = tmp_path / "locon.safetensors"
    write_safetensors(path, {"lora_unet_conv_in.lora_down.weight": A, "lora_unet_conv_in.lora_mid.weight": mid,
                             "lora_unet_conv_in.lora_up.weight": B, "lora_unet_conv_in.alpha": torch.tensor(1.5)})
    a = lorakit.load(path)
    f = a["lora_unet_conv_in"]
    assert (f.kind, f.kernel, f.rank, f.scale) == ("conv", (3, 3), 3, 0.5)
    reference = 0.5 * torch.einsum("om,mnhw,ni->oihw", B[:, :, 0, 0], mid, A[:, :, 0, 0])
    torch.testing.assert_close(f.delta(torch.float64).reshape(5, 4, 3, 3), reference, rtol=1e-12, atol=1e-12)
    lorakit.save(a, tmp_path / "plain.safetensors", format="kohya")
    assert_same(a, lorakit.load(tmp_path / "plain.safetensors"), SCALE_RTOL["kohya"])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(adapter=random_modules(), chain=st.lists(st.sampled_from(TARGETS), min_size=2, max_size=4))
def test_conversion_chain_property(adapter, chain):
    """Any chain of conversions keeps ΔW, scales, ranks, kernels, dtypes and magnitudes."""
    current = adapter
    with tempfile.TemporaryDirectory() as d:
        for i, (fmt, name) in enumerate(chain):
            out = Path(d) / f"{i}-{name}"
            lorakit.save(current, out, format=fmt)
            current = lorakit.load(out)
        through_kohya = any(fmt == "kohya" for fmt, _ in chain)
        assert_same(adapter, current.materialize(), SCALE_RTOL["kohya" if through_kohya else "peft"])
