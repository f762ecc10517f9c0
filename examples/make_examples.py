"""Generate the bundled example adapters, deterministically (run from the repository root).

- ``examples/style.safetensors``, ``examples/detail.safetensors``: kohya-format LoRAs for an SD-1.x-like
  U-Net's attention projections (16 modules, ranks 8 and 16, different alphas, decaying spectra).
- ``examples/tiny-llama-lora/``: a PEFT adapter (rank 8, rsLoRA off, alpha 16) for a 2-layer Llama of hidden
  size 64, the model the tests build from a config.

Together they are well under 1 MB.
"""

from __future__ import annotations

from pathlib import Path

import torch

import lorakit
from lorakit.adapter import AdapterMeta
from lorakit.testing import random_adapter

HERE = Path(__file__).parent
SD_BLOCKS = [("down_blocks.0", 320), ("down_blocks.1", 640), ("up_blocks.2", 640), ("up_blocks.3", 320)]


def sd_shapes() -> dict[str, tuple[int, int]]:
    shapes = {}
    for block, dim in SD_BLOCKS:
        base = f"unet.{block}.attentions.0.transformer_blocks.0"
        shapes[f"{base}.attn1.to_q"] = (dim, dim)
        shapes[f"{base}.attn1.to_k"] = (dim, dim)
        shapes[f"{base}.attn1.to_v"] = (dim, dim)
        shapes[f"{base}.attn1.to_out.0"] = (dim, dim)
    return shapes


def tiny_llama_shapes(hidden: int = 64, inter: int = 128, layers: int = 2) -> dict[str, tuple[int, int]]:
    shapes = {}
    for i in range(layers):
        shapes[f"model.layers.{i}.self_attn.q_proj"] = (hidden, hidden)
        shapes[f"model.layers.{i}.self_attn.v_proj"] = (hidden // 2, hidden)
        shapes[f"model.layers.{i}.mlp.down_proj"] = (hidden, inter)
    return shapes


def main() -> None:
    meta = AdapterMeta(base_model="runwayml/stable-diffusion-v1-5", source_format="kohya")
    style = random_adapter(sd_shapes(), rank=8, scale=4.0 / 8, decay=0.7, seed=1, dtype=torch.float16, meta=meta)
    detail = random_adapter(sd_shapes(), rank=16, scale=1.0, decay=0.8, seed=2, dtype=torch.float16, meta=meta)
    prov = {"operation": "examples/make_examples.py"}
    lorakit.save(style, HERE / "style.safetensors", format="kohya", provenance=prov)
    lorakit.save(detail, HERE / "detail.safetensors", format="kohya", provenance=prov)
    llama = random_adapter(tiny_llama_shapes(), rank=8, scale=16 / 8, decay=0.8, seed=3,
                           meta=AdapterMeta(base_model="tiny-llama-from-config", source_format="peft"))
    lorakit.save(llama, HERE / "tiny-llama-lora", format="peft", provenance=prov)


if __name__ == "__main__":
    main()
