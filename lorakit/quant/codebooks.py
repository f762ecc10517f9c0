"""Code values for block-wise quantization: NormalFloat (QLoRA NF4, generalised to b bits as in LQ-LoRA) and
symmetric integer codes.

NF at b bits (δ = 0.9677083, Φ⁻¹ the standard normal quantile)::

    positive = Φ⁻¹(linspace(δ, 0.5, 2^(b-1) + 1)[:-1])      2^(b-1) values
    negative = −Φ⁻¹(linspace(δ, 0.5, 2^(b-1))[:-1])         2^(b-1) − 1 values
    code     = sort([negative, 0, positive]) / max           2^b values in [−1, 1], exact 0

At b = 4 this is bitsandbytes' NF4 table. The integer code at b bits is k/(2^(b-1) − 1) for
|k| ≤ 2^(b-1) − 1 (absmax round-to-nearest; 2^b − 1 levels, so int8 is −127…127 over 127).
A value ``x/absmax`` goes to the nearest code value: bucket boundaries are the midpoints.
"""

from __future__ import annotations

from functools import cache
from typing import Literal

import numpy as np
import torch

from lorakit.errors import OperatorParameterError

SUPPORTED_BITS = (2, 3, 4, 8)
CodeName = Literal["nf", "int"]
NF_OFFSET = 0.9677083


@cache
def _nf_values(bits: int) -> tuple[float, ...]:
    from scipy.special import ndtri  # Φ⁻¹; lighter to import than scipy.stats

    half = 2 ** (bits - 1)
    positive = ndtri(np.linspace(NF_OFFSET, 0.5, half + 1)[:-1])
    negative = -ndtri(np.linspace(NF_OFFSET, 0.5, half)[:-1])
    values = np.sort(np.concatenate([negative, [0.0], positive]))
    return tuple(float(v) for v in values / values.max())


def check_bits(bits: int) -> None:
    """Raise :class:`OperatorParameterError` unless ``bits`` is one of :data:`SUPPORTED_BITS`."""
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise OperatorParameterError(
            f"{bits} bits is not supported; choose one of {', '.join(map(str, SUPPORTED_BITS))}",
            hint="use --bits 2, 3, 4 or 8 (or --mixed for per-direction precision)",
        )


def nf_code(bits: int = 4) -> torch.Tensor:
    """The ``2**bits`` NormalFloat code values, ascending, float32, ``code[2**(bits-1) - 1] == 0``."""
    check_bits(bits)
    return torch.tensor(_nf_values(bits), dtype=torch.float32)


def int_code(bits: int) -> torch.Tensor:
    """The ``2**bits - 1`` symmetric integer levels ``k/(2**(bits-1) - 1)``, ascending, float32."""
    check_bits(bits)
    m = 2 ** (bits - 1) - 1
    return torch.arange(-m, m + 1, dtype=torch.float64).div(m).float()


def codebook(name: str, bits: int) -> torch.Tensor:
    """The code values of ``name`` (``nf`` or ``int``) at ``bits``."""
    if name == "nf":
        return nf_code(bits)
    if name == "int":
        return int_code(bits)
    raise OperatorParameterError(f"unknown code {name!r}; choose nf or int")


def max_gap(code: torch.Tensor) -> float:
    """Largest distance between neighbouring code values: twice the worst rounding error on ``[−1, 1]``."""
    return float((code[1:] - code[:-1]).max())


def nearest(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code value for each element of ``x`` (values in ``[−1, 1]``), as int64.

    Ties at a midpoint go to the upper value (``torch.bucketize`` with ``right=False`` on the midpoints).
    """
    mid = ((code[1:] + code[:-1]) / 2).to(x.dtype)
    return torch.bucketize(x.contiguous(), mid)
