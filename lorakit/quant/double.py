"""Double quantization of the block constants (QLoRA ``compress_statistics``).

The first-level absmax values ``a`` (one per block of 64 elements) are themselves quantized::

    offset = mean(a)                                        one fp32 per tensor
    a − offset  →  8-bit symmetric integer codes, absmax per group of 256 constants (one fp32 ``scale2`` each)
    â = code[q] · scale2[group] + offset

Storage per parameter at block 64: 8/64 + 32/(64·256) bits for the constants instead of 32/64; with 4-bit codes
that is 4.127 bits/parameter against 4.5. QLoRA uses bitsandbytes' dynamic (tree) 8-bit map for the second
level; lorakit uses the uniform 8-bit integer code, which costs the same bits and has a simple error bound:
``|a − â| ≤ scale2/(2·127)``.
"""

from __future__ import annotations

import torch

from lorakit.quant.codebooks import codebook, nearest

CONSTANT_BITS = 8
CONSTANT_BLOCK = 256


def quantize_constants(
    absmax: torch.Tensor, *, bits: int = CONSTANT_BITS, block: int = CONSTANT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize the 1-D fp32 ``absmax`` (n,) → ``(codes uint8 (n,), scale2 fp32 (ceil(n/block),), offset fp32 ())``."""
    a = absmax.float().reshape(-1)
    offset = a.mean() if a.numel() else torch.zeros((), device=a.device)
    centred = a - offset
    n_groups = -(-a.numel() // block)
    padded = torch.zeros(n_groups * block, device=a.device)
    padded[: a.numel()] = centred
    scale2 = padded.reshape(n_groups, block).abs().amax(dim=1)
    safe = torch.where(scale2 > 0, scale2, torch.ones_like(scale2))
    normed = (padded.reshape(n_groups, block) / safe[:, None]).reshape(-1)[: a.numel()]
    codes = nearest(normed.clamp(-1, 1), codebook("int", bits).to(a.device)).to(torch.uint8)
    return codes, scale2, offset.reshape(())


def dequantize_constants(
    codes: torch.Tensor,
    scale2: torch.Tensor,
    offset: torch.Tensor,
    *,
    bits: int = CONSTANT_BITS,
    block: int = CONSTANT_BLOCK,
) -> torch.Tensor:
    """``â = code[q]·scale2[group] + offset``, clamped at 0 (an absmax is never negative). Returns fp32 (n,)."""
    values = codebook("int", bits).to(codes.device)[codes.long()]
    group = torch.arange(codes.numel(), device=codes.device) // block
    return (values * scale2.float()[group] + offset.float()).clamp_min(0)
