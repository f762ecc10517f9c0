"""Quantization of adapters (block-wise NF/int codes, double quantization, per-direction mixed precision) and
LQ-LoRA low-rank plus quantized decomposition of base weights. See ``docs/quantize.md``."""

from lorakit.quant.blockwise import QuantConfig, QuantizedTensor, dequantize_tensor, quantize_tensor
from lorakit.quant.codebooks import SUPPORTED_BITS, codebook, nf_code

__all__ = [
    "SUPPORTED_BITS",
    "QuantConfig",
    "QuantizedTensor",
    "codebook",
    "dequantize_tensor",
    "nf_code",
    "quantize_tensor",
]
