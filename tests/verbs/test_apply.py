"""apply / --subtract: W ± w·ΔW per tensor against float64 references, layouts kept, bad input refused."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit.adapter import Adapter, AdapterMeta
from lorakit.factors import LoraFactors
from lorakit.io.checkpoint import Checkpoint, weight_key
from tests.io._checkpoints import write_checkpoint


def _base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(50, 16, generator=g),  # (num_embeddings, dim)
        "model.layers.0.q.weight": torch.randn(24, 16, generator=g).to(torch.bfloat16),
        "model.layers.0.c_attn.weight": torch.randn(16, 40, generator=g),  # Conv1D: (in, out)
        "model.conv.weight": torch.randn(8, 3, 3, 3, generator=g),
        "model.norm.weight": torch.ones(16),
        "model.layers.0.k.weight": torch.randn(8, 16, generator=g, dtype=torch.float64),
    }


def _adapter(fan_in_fan_out: bool = True) -> Adapter:
    g = torch.Generator().manual_seed(1)

    def f(out, inn, r, **kw):
        return LoraFactors(torch.randn(r, inn, generator=g), torch.randn(out, r, generator=g), 0.5, **kw)

    mods = {
        "model.embed_tokens": f(16, 50, 4, kind="embedding"),
        "model.layers.0.q": f(24, 16, 4),
        "model.layers.0.k": f(8, 16, 2),
        "model.conv": f(8, 27, 3, kind="conv", kernel=(3, 3)),
    }
    if fan_in_fan_out:
        mods["model.layers.0.c_attn"] = f(40, 16, 4)
    meta = AdapterMeta(source_format="peft", format_config={"fan_in_fan_out": fan_in_fan_out, "r": 4,
                                                            "lora_alpha": 2})
    return Adapter(mods, meta)


def _expected(base: dict[str, torch.Tensor], adapter: Adapter, w: float) -> dict[str, torch.Tensor]:
    out = dict(base)
    for n in adapter:
        d = w * adapter[n].delta(torch.float64)
        key = f"{n}.weight"
        t = base[key]
        if adapter[n].kind == "embedding" or n.endswith("c_attn"):
            d = d.T
        out[key] = (t.double() + d.reshape(t.shape)).to(t.dtype)
    return out


@pytest.mark.parametrize("shards", [1, 3])
def test_apply_matches_reference_and_keeps_layout(tmp_path, cli, shards, monkeypatch):
    from lorakit.io import writer

    base = _base()
    src = write_checkpoint(tmp_path / ("base.safetensors" if shards == 1 else "base"), base, shards)
    ad = tmp_path / "lora.safetensors"
    lorakit.save(_adapter(), ad, format="peft")

    def copied(*_a, **_k):
        raise AssertionError("apply writes every tensor at its place (the base's dtypes and shapes)")

    monkeypatch.setattr(writer, "_copy_range", copied)
    adapter = lorakit.load(ad)
    out = tmp_path / ("merged.safetensors" if shards == 1 else "merged")
    code, stdout, err = cli("apply", src, ad, "-o", out, "--scale", "0.7", "--json")
    assert code == 0, err
    assert json.loads(stdout)["modules_applied"] == 5
    merged = Checkpoint(out)
    expected = _expected(base, adapter, 0.7)
    assert set(merged.keys()) == set(base)
    for k, t in expected.items():
        got = merged.get(k)
        assert got.dtype == base[k].dtype and got.shape == base[k].shape
        tol = {torch.bfloat16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-12}[got.dtype]
        torch.testing.assert_close(got.double(), t.double(), atol=tol, rtol=tol)
    assert torch.equal(merged.get("model.norm.weight"), base["model.norm.weight"])
    if shards > 1:
        assert merged.layout() == Checkpoint(src).layout()
        assert (out / "config.json").read_text() == (src / "config.json").read_text()
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in base.values())
    # subtract undoes apply (to the storage dtype's rounding)
    back = tmp_path / ("back.safetensors" if shards == 1 else "back")
    code, _, err = cli("apply", out, ad, "-o", back, "--scale", "0.7", "--subtract")
    assert code == 0, err
    restored = Checkpoint(back)
    for k, t in base.items():
        if t.dtype in (torch.float32, torch.float64):
            torch.testing.assert_close(restored.get(k), t, atol=1e-5, rtol=1e-5)


def test_apply_matches_peft_merge_on_a_tiny_llama(tmp_path, cli, tiny_llama_2l):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lorakit.testing import random_adapter

    model = tiny_llama_2l
    model.save_pretrained(tmp_path / "base")
    shapes = {f"model.layers.{i}.self_attn.{p}": s for i in range(2)
              for p, s in {"q_proj": (64, 64), "v_proj": (32, 64)}.items()}
    shapes["model.layers.1.mlp.down_proj"] = (64, 128)
    lorakit.save(random_adapter(shapes, rank=4, scale=2.0, seed=2), tmp_path / "lora", format="peft")
    code, _, err = cli("apply", tmp_path / "base", tmp_path / "lora", "-o", tmp_path / "merged")
    assert code == 0, err
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    host = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    peft_model = peft.PeftModel.from_pretrained(host, str(tmp_path / "lora")).eval()
    ids = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, peft_model(input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)


def test_weight_key_mapping():
    keys = {"model.layers.0.q_proj.weight", "down_blocks.0.attn.to_q.weight", "x.weight", "a.x.weight"}
    assert weight_key("model.layers.0.q_proj", keys) == "model.layers.0.q_proj.weight"
    assert weight_key("base_model.model.model.layers.0.q_proj", keys) == "model.layers.0.q_proj.weight"
    assert weight_key("unet.down_blocks.0.attn.to_q", keys) == "down_blocks.0.attn.to_q.weight"
    assert weight_key("layers.0.q_proj", keys) == "model.layers.0.q_proj.weight"  # unique suffix
    assert weight_key("x", keys) == "x.weight"
    assert weight_key("nothere", keys) is None


@pytest.mark.parametrize("case,message", [
    ("missing", "have no weight in the base checkpoint"),
    ("shape", "expected"),
    ("transposed", "fan_in_fan_out"),
])
def test_bad_input_clear_error_nothing_written(tmp_path, cli, case, message):
    base = _base()
    src = write_checkpoint(tmp_path / "base.safetensors", base)
    g = torch.Generator().manual_seed(2)
    if case == "missing":
        ad = Adapter({"model.layers.9.q": LoraFactors(torch.randn(2, 16, generator=g), torch.randn(24, 2, generator=g))})
    elif case == "shape":
        ad = Adapter({"model.layers.0.q": LoraFactors(torch.randn(2, 17, generator=g), torch.randn(24, 2, generator=g))})
    else:
        ad = _adapter(fan_in_fan_out=False).select(["model.layers.0.q"])
        ad = Adapter({**{n: ad[n] for n in ad},
                      "model.layers.0.c_attn": LoraFactors(torch.randn(2, 16, generator=g), torch.randn(40, 2, generator=g))})
    lorakit.save(ad, tmp_path / "lora.safetensors", format="peft")
    before = src.read_bytes()
    code, _, err = cli("apply", src, tmp_path / "lora.safetensors", "-o", tmp_path / "out.safetensors")
    assert code == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "out.safetensors").exists() and src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "lora.safetensors"]
