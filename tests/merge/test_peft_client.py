"""Real client: PEFT loads lorakit's merged adapters into a tiny random Llama and gives the logits of the
dense weighted sum; our ``svd`` equals PEFT 0.21's ``add_weighted_adapter(combination_type="svd")`` where PEFT
is right, and the rsLoRA over-scale of PEFT (issue #3761) is measured."""

from __future__ import annotations

import math

import pytest
import torch

import lorakit
from lorakit.pipeline import merge

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj", "down_proj"]
W = [0.7, -0.4]


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def make_peft(tmp_path, rslora: bool):
    """Two PEFT adapters with different ranks and alphas, random B (PEFT initialises B = 0), saved to disk."""
    paths = []
    for i, (r, alpha) in enumerate([(4, 8), (6, 3)]):
        model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS,
                                                                  use_rslora=rslora))
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        path = tmp_path / f"adapter{i}"
        model.save_pretrained(path)
        paths.append(path)
    return paths


def dense_weighted_logits(paths, ids):
    base = tiny_llama()
    adapters = [lorakit.load(p) for p in paths]
    with torch.no_grad():
        for n in adapters[0]:
            mod = base.get_submodule(n)
            mod.weight += sum(w * a[n].delta(torch.float64) for a, w in zip(adapters, W)).float()
        return base(ids).logits


@pytest.mark.parametrize("method, extra", [("cat", {}), ("svd", {"rank": 10})])
@pytest.mark.parametrize("rslora", [False, True])
def test_peft_loads_the_merge_and_gives_the_dense_logits(tmp_path, method, extra, rslora):
    paths = make_peft(tmp_path, rslora)
    out = tmp_path / "merged"
    merge(paths, out, weights=W, method=method, to_format="peft", **extra)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    model = peft.PeftModel.from_pretrained(tiny_llama(), out).eval()
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, dense_weighted_logits(paths, ids), rtol=1e-4, atol=1e-4)


def peft_svd_deltas(paths, rank):
    model = peft.PeftModel.from_pretrained(tiny_llama(), paths[0], adapter_name="a0")
    model.load_adapter(paths[1], adapter_name="a1")
    model.add_weighted_adapter(["a0", "a1"], W, "m", combination_type="svd", svd_rank=rank)
    return {n.removeprefix("base_model.model."): mod.get_delta_weight("m").double()
            for n, mod in model.named_modules() if hasattr(mod, "get_delta_weight") and "m" in mod.lora_A}


@pytest.mark.parametrize("rslora", [False, True])
def test_svd_against_peft_add_weighted_adapter(tmp_path, rslora):
    paths = make_peft(tmp_path, rslora)
    K = 5
    ours_path = tmp_path / "ours.safetensors"
    merge(paths, ours_path, weights=W, method="svd", rank=K, to_format="peft")
    ours = lorakit.load(ours_path)
    theirs = peft_svd_deltas(paths, K)
    assert set(theirs) == set(ours)
    for n in ours:
        mine = ours[n].delta(torch.float64)
        if rslora:
            # PEFT keeps use_rslora on the merged adapter (scale α/√r with α = r = K): √K times too large.
            torch.testing.assert_close(theirs[n], math.sqrt(K) * mine, rtol=1e-3, atol=1e-5)
        else:
            torch.testing.assert_close(theirs[n], mine, rtol=1e-3, atol=1e-5)
