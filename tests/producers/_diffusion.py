"""Tiny diffusers / transformers models built from configs, and the diffusers round trips the producer tests
share. Nothing is downloaded. diffusers is imported lazily (it takes seconds): call these from module-scoped
fixtures after ``pytest.importorskip("diffusers")``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

REL = 1e-5  # float64 relative error bound for "equal to the producer's own computation"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


def tiny_unet(seed: int = 0) -> Any:
    """A two-level UNet2DConditionModel (SD1-like: Conv2d proj_in/out, 3x3 resnet convs, a 1x1 shortcut)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    ).double().eval()


def unet_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64),
            "timestep": torch.tensor([3]), "encoder_hidden_states": torch.randn(1, 5, 8, generator=g,
                                                                                dtype=torch.float64)}


def tiny_sd3(seed: int = 0) -> Any:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=2,
        joint_attention_dim=8, caption_projection_dim=8, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=8,
    ).double().eval()


def sd3_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64),
            "encoder_hidden_states": torch.randn(1, 5, 8, generator=g, dtype=torch.float64),
            "pooled_projections": torch.randn(1, 8, generator=g, dtype=torch.float64),
            "timestep": torch.tensor([3])}


FLUX_CONFIG: dict[str, Any] = {
    "patch_size": 1, "in_channels": 4, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 4,
    "num_attention_heads": 2, "joint_attention_dim": 8, "pooled_projection_dim": 8, "guidance_embeds": True,
    "axes_dims_rope": (0, 2, 2),
}


def tiny_flux(seed: int = 0) -> Any:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**FLUX_CONFIG).double().eval()


def flux_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n_img, n_txt = 16, 4
    return {"hidden_states": torch.randn(1, n_img, 4, generator=g, dtype=torch.float64),
            "encoder_hidden_states": torch.randn(1, n_txt, 8, generator=g, dtype=torch.float64),
            "pooled_projections": torch.randn(1, 8, generator=g, dtype=torch.float64),
            "timestep": torch.tensor([0.5], dtype=torch.float64),
            "guidance": torch.tensor([3.5], dtype=torch.float64),
            "img_ids": torch.zeros(n_img, 3, dtype=torch.float64),
            "txt_ids": torch.zeros(n_txt, 3, dtype=torch.float64)}


def accept_installed_peft() -> None:
    """transformers 5.x gates its PEFT integration (``add_adapter``/``load_adapter``, which diffusers' text-encoder
    LoRA loading calls) on peft >= 0.22; the installed peft is older but has every API that path uses. Lower the
    gate to the installed version, so the text-encoder tests run transformers' and diffusers' own code."""
    import peft
    import transformers.integrations.peft as tp

    tp.MIN_PEFT_VERSION = min(tp.MIN_PEFT_VERSION, peft.__version__)


def tiny_clip(seed: int = 0, *, projection: bool = False) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    accept_installed_peft()

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=64, bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, projection_dim=8)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(cfg).double().eval()


def clip_inputs() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor([[1, 5, 9, 3, 2]])}


def add_lora(model: Any, seed: int = 2, **config: Any) -> Any:
    """``model.add_adapter(LoraConfig(**config))`` with random non-zero factors (both A and B)."""
    from peft import LoraConfig

    cfg = LoraConfig(init_lora_weights=False, **config)
    model.add_adapter(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return cfg


def peft_deltas(model: Any) -> dict[str, torch.Tensor]:
    """The producer's own ΔW per adapted module (PEFT's ``get_delta_weight``), flattened to 2-D."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and "default" in m.lora_A:
            d = m.get_delta_weight("default")
            out[name] = d.reshape(d.shape[0], -1)
    return out


def lora_layers(model: Any) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def outputs(model: Any, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    return out


def check_deltas(adapter: Any, deltas: Mapping[str, torch.Tensor], prefix: str, *, tol: float = REL) -> None:
    """Every producer module is in ``adapter`` under ``prefix + name`` with ΔW equal to the producer's."""
    names = {prefix + n for n in deltas}
    assert names == set(adapter), (sorted(names ^ set(adapter)))[:5]
    for n, d in deltas.items():
        f = adapter[prefix + n]
        assert f.delta(torch.float64).shape == d.shape, n
        assert rel_err(f.delta(torch.float64), d) <= tol, n


def assert_close_outputs(a: torch.Tensor, b: torch.Tensor, tol: float = REL) -> None:
    assert a.shape == b.shape
    err = rel_err(a, b)
    assert err <= tol, err



def sd_pipeline(unet: Any = None, text_encoder: Any = None) -> Any:
    """A StableDiffusionPipeline holding only the parts under test (no VAE, tokenizer or scheduler)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=None, text_encoder=text_encoder, tokenizer=None, unet=unet, scheduler=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def sd3_pipeline(transformer: Any = None, text_encoder: Any = None, text_encoder_2: Any = None) -> Any:
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(transformer=transformer, scheduler=None, vae=None, text_encoder=text_encoder,
                                    tokenizer=None, text_encoder_2=text_encoder_2, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)


def flux_pipeline(transformer: Any = None, text_encoder: Any = None) -> Any:
    from diffusers import FluxPipeline

    return FluxPipeline(transformer=transformer, scheduler=None, vae=None, text_encoder=text_encoder,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None)


def convert(src: Path, out: Path, to: str, **options: Any) -> Any:
    """lorakit's ``convert`` (the same function as ``lorakit convert``); returns the report."""
    from lorakit.verbs.convert import convert as lk_convert

    return lk_convert(src, out, to, **options)
