"""Real-client tests: PEFT writes adapters that lorakit reads exactly (to PEFT's float32 precision), and PEFT loads what lorakit writes.

The base models are tiny random transformers built from configs (no downloads). ΔW is compared in float64
against PEFT's own ``get_delta_weight("default")``, and logits against the source PEFT model.
"""

from __future__ import annotations

import os

import pytest
import torch

import lorakit
from lorakit.testing import random_adapter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = [pytest.mark.peft, pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")]

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

PREFIX = "base_model.model."
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


def randomize_lora(model, seed: int = 1) -> None:
    """PEFT initialises B (or embedding A) to zero; make every LoRA parameter non-zero (magnitudes positive)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.copy_(p * (0.5 + torch.rand(p.shape, generator=g)))
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def peft_layers(model):
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix(PREFIX): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def logits(model, seed: int = 3) -> torch.Tensor:
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


CONFIGS = {
    "plain": {"r": 8, "lora_alpha": 16, "target_modules": LLAMA_TARGETS},
    "patterns": {
        "r": 8, "lora_alpha": 16, "target_modules": LLAMA_TARGETS,
        "rank_pattern": {"q_proj": 4, "model.layers.1.mlp.down_proj": 2},
        "alpha_pattern": {"v_proj": 3, "model.layers.0.self_attn.o_proj": 5.5},
    },
    "rslora": {"r": 8, "lora_alpha": 16, "target_modules": LLAMA_TARGETS, "use_rslora": True,
                   "rank_pattern": {"k_proj": 2}},
    "dora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "use_dora": True},
    "embedding": {"r": 4, "lora_alpha": 12, "target_modules": ["embed_tokens", "q_proj", "v_proj"]},
}


@pytest.fixture(params=sorted(CONFIGS))
def peft_dir(request, tmp_path):
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**CONFIGS[request.param]))
    randomize_lora(model)
    model.eval()
    out = tmp_path / f"peft-{request.param}"
    model.save_pretrained(out, save_embedding_layers=False)
    return request.param, model, out


def test_lorakit_reads_peft_exactly(peft_dir):
    kind, model, path = peft_dir
    adapter = lorakit.load(path)
    layers = peft_layers(model)
    assert set(adapter) == set(layers)
    for name, layer in layers.items():
        expected = layer.get_delta_weight("default").double()
        f = adapter[name]
        got = f.delta(torch.float64)
        if f.kind == "embedding":
            got = got.T  # lorakit keeps ΔW = s·B@A (dim, num_embeddings); the embedding table takes its transpose
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        assert f.scale == pytest.approx(layer.scaling["default"], rel=1e-12)
        assert f.rank == layer.r["default"]
        if kind == "dora":
            mag = layer.lora_magnitude_vector["default"].weight.detach()
            torch.testing.assert_close(f.magnitude.reshape(-1), mag.reshape(-1), rtol=0, atol=0)


def test_peft_loads_lorakit_output_with_same_logits(peft_dir, tmp_path):
    _kind, model, path = peft_dir
    out = tmp_path / "rewritten"
    lorakit.save(lorakit.load(path), out, format="peft")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), out).eval()
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=1e-5, atol=1e-5)
    for name, layer in peft_layers(reloaded).items():
        src = peft_layers(model)[name]
        torch.testing.assert_close(layer.get_delta_weight("default"), src.get_delta_weight("default"),
                                   rtol=1e-5, atol=1e-6)


def test_peft_loads_lorakit_made_adapter_with_arbitrary_scales(tmp_path):
    """An adapter built in lorakit (heterogeneous ranks, non-integer scales) gets a config PEFT reproduces."""
    shapes = {}
    base = tiny_llama()
    for n, m in base.named_modules():
        if n.endswith(("q_proj", "v_proj", "down_proj")):
            shapes[n] = tuple(m.weight.shape)
    ranks = {n: (2, 3, 5)[i % 3] for i, n in enumerate(shapes)}
    a = random_adapter(shapes, ranks, seed=4)
    a = a.map(lambda n, f: f.scaled(0.37 + 0.11 * ranks[n]))
    out = tmp_path / "made"
    lorakit.save(a, out, format="peft")
    model = peft.PeftModel.from_pretrained(base, out).eval()
    layers = peft_layers(model)
    assert set(layers) == set(shapes)
    for name, layer in layers.items():
        torch.testing.assert_close(layer.get_delta_weight("default").double(), a[name].delta(torch.float64),
                                   rtol=1e-5, atol=1e-7)


def test_gpt2_fan_in_fan_out_round_trip(tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    model = peft.get_peft_model(tiny_gpt2(), cfg)
    randomize_lora(model)
    model.eval()
    src = tmp_path / "gpt2"
    model.save_pretrained(src, save_embedding_layers=False)
    adapter = lorakit.load(src)
    for name, layer in peft_layers(model).items():
        # Conv1D stores its weight (in, out): PEFT's delta is the transpose of lorakit's (out, in) ΔW.
        torch.testing.assert_close(adapter[name].delta(torch.float64).T, layer.get_delta_weight("default").double(),
                                   rtol=1e-5, atol=1e-6)
    out = tmp_path / "gpt2-rewritten"
    lorakit.save(adapter, out, format="peft")
    reloaded = peft.PeftModel.from_pretrained(tiny_gpt2(), out).eval()
    assert reloaded.peft_config["default"].fan_in_fan_out
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=1e-5, atol=1e-5)


class TinyConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv3 = torch.nn.Conv2d(4, 6, 3, padding=1)
        self.conv1 = torch.nn.Conv2d(6, 5, 1)
        self.head = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.conv1(torch.relu(self.conv3(x))).mean(dim=(2, 3)))


def tiny_convnet():
    torch.manual_seed(0)
    return TinyConvNet().eval()


@pytest.mark.parametrize("use_dora", [False, True])
def test_conv_lora_3x3_and_1x1_both_ways(tmp_path, use_dora):
    cfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["conv3", "conv1", "head"], use_dora=use_dora,
                          rank_pattern={"conv1": 2})
    model = peft.get_peft_model(tiny_convnet(), cfg)
    randomize_lora(model)
    model.eval()
    src = tmp_path / "conv"
    model.save_pretrained(src)
    adapter = lorakit.load(src)
    x = torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(5))
    for name, layer in peft_layers(model).items():
        expected = layer.get_delta_weight("default").double()
        f = adapter[name]
        assert f.kernel == ((3, 3) if name == "conv3" else (1, 1) if name == "conv1" else None)
        torch.testing.assert_close(f.delta(torch.float64).reshape(expected.shape), expected, rtol=1e-5, atol=1e-6)
    # Through kohya and back to PEFT: the same outputs from PEFT's own forward.
    lorakit.save(adapter, tmp_path / "conv.kohya.safetensors", format="kohya")
    lorakit.save(lorakit.load(tmp_path / "conv.kohya.safetensors"), tmp_path / "back", format="peft")
    reloaded = peft.PeftModel.from_pretrained(tiny_convnet(), tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=1e-5, atol=1e-6)
