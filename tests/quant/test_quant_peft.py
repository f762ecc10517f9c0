"""Real client: PEFT loads lq-decompose's LoRA initialisation on top of the dequantized residual of a tiny
random Llama, and the model computes what the original base computed (up to the quantization error)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.peft


def test_peft_loads_the_lq_lora_initialisation(tmp_path):
    from peft import PeftModel

    from lorakit.io.writer import write_safetensors
    from lorakit.verbs.lq_decompose import load_residual, lq_decompose_file

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    # Give the weights a low-rank component, as trained weights have, so that L₁L₂ carries real signal.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name and "lm_head" not in name:
                p.add_(torch.randn(p.shape[0], 4) @ torch.randn(4, p.shape[1]) * 0.05)
    base = tmp_path / "base.safetensors"
    write_safetensors(base, {k: v.contiguous() for k, v in model.state_dict().items()})
    lq_decompose_file(base, tmp_path / "lq", rank=4, bits=4, iters=5)

    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        want = model(ids).logits
        quantized = transformers.LlamaForCausalLM(config).eval()
        quantized.load_state_dict(load_residual(tmp_path / "lq" / "residual.safetensors"))
        without = quantized(ids).logits
        peft_model = PeftModel.from_pretrained(quantized, str(tmp_path / "lq" / "adapter")).eval()
        got = peft_model(ids).logits
        # What PEFT must compute: base weights Q + L₁L₂ (scale 1), built by hand.
        import lorakit

        lora = lorakit.load(tmp_path / "lq" / "adapter")
        state = load_residual(tmp_path / "lq" / "residual.safetensors")
        for name in lora:
            state[name + ".weight"] = state[name + ".weight"] + lora[name].delta()
        manual = transformers.LlamaForCausalLM(config).eval()
        manual.load_state_dict(state)
        expected = manual(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    err_with = float((got - want).norm() / want.norm())
    err_without = float((without - want).norm() / want.norm())
    assert err_with < 0.1
    assert err_with < 0.5 * err_without
