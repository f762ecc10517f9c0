"""Precision per singular direction (LoRAQuant's idea, generalised): more bits for the top directions.

In canonical form direction ``j`` is ``b_j a_jᵀ`` with ``‖b_j‖ = ‖a_j‖ = √σ_j``. For each candidate precision
``p ∈ {0, 2, 3, 4, 8}`` bits the loss of that direction alone is, exactly and in O(out + in)::

    e_j(p) = ‖b_j a_jᵀ − b̂_j â_jᵀ‖²_F = ‖b‖²‖a‖² − 2(b·b̂)(a·â) + ‖b̂‖²‖â‖²         (e_j(0) = σ_j²)

and its storage is ``c_j(p) = (out + in)·p'`` with ``p'`` the bits per parameter including block constants.
The allocation minimises ``Σ_j e_j`` under a bit budget, or ``Σ_j c_j`` under an error target
``Σ_j e_j ≤ (E·‖ΔW‖_F)²``, as a multiple-choice knapsack (:mod:`lorakit.quant.knapsack`). ``Σ_j e_j`` ignores
the cross terms between directions' errors; the error reported afterwards is the exact one, and the error
target is re-tightened until the exact error meets it.
"""

from __future__ import annotations

import numpy as np

from lorakit.errors import OperatorParameterError
from lorakit.factors import LoraFactors
from lorakit.quant.blockwise import QuantConfig, dequantize_tensor, quantize_tensor

MIXED_BITS = (0, 2, 3, 4, 8)


def default_code(bits: int) -> str:
    """``nf`` below 8 bits (normal-shaped values), ``int`` at 8 (uniform, exact int8 round trip)."""
    return "int" if bits == 8 else "nf"


def candidate_configs(
    block: int, double: bool, code: str | None = None, bits: tuple[int, ...] = MIXED_BITS
) -> dict[int, QuantConfig]:
    """One :class:`QuantConfig` per non-zero candidate precision."""
    return {b: QuantConfig(b, code or default_code(b), block, double) for b in bits if b > 0}


def direction_table(
    canon: LoraFactors, configs: dict[int, QuantConfig], *, pad: bool = False
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """``(options, errors (r, n), bits (r, n))``: per direction and option, ``e_j(p)`` and ``c_j(p)``."""
    Bt, A = canon.B.T.double(), canon.A.double()
    options = [0, *sorted(configs)]
    r = canon.rank
    errors = np.zeros((r, len(options)))
    costs = np.zeros((r, len(options)))
    nb2, na2 = (Bt * Bt).sum(1), (A * A).sum(1)
    errors[:, 0] = (nb2 * na2).cpu().numpy()
    width = canon.out_features + canon.in_features
    for k, p in enumerate(options[1:], start=1):
        cfg = configs[p]
        Bh = dequantize_tensor(quantize_tensor(Bt.float(), cfg, pad=pad)).double()
        Ah = dequantize_tensor(quantize_tensor(A.float(), cfg, pad=pad)).double()
        e = nb2 * na2 - 2 * (Bt * Bh).sum(1) * (A * Ah).sum(1) + (Bh * Bh).sum(1) * (Ah * Ah).sum(1)
        errors[:, k] = e.clamp_min(0).cpu().numpy()
        costs[:, k] = width * cfg.bits_per_parameter
    return options, errors, costs


def allocate(
    options: list[int],
    errors: np.ndarray,
    costs: np.ndarray,
    width: int,
    *,
    avg_bits: float | None = None,
    error_budget: float | None = None,
) -> list[int]:
    """Bits per direction: least ``Σe`` with ``Σc ≤ avg_bits·r·width`` (``width = out + in``; ``avg_bits`` counts
    the block constants), or least ``Σc`` with ``Σe ≤ error_budget`` (absolute, squared). The top direction is
    never dropped, so a module is never emptied.
    """
    from lorakit.quant.knapsack import choose_one_per_item

    if (avg_bits is None) == (error_budget is None):
        raise OperatorParameterError(
            "mixed precision needs exactly one of an error target or an average bit budget"
        )
    r = errors.shape[0]
    if r == 0:
        return []
    e = errors.copy()
    e[0, 0] = np.inf
    if avg_bits is not None:
        choice = choose_one_per_item(e, costs, avg_bits * r * width)
    else:
        assert error_budget is not None
        allowed_cost = np.where(np.isfinite(e), costs, np.inf)
        choice = choose_one_per_item(allowed_cost, np.where(np.isfinite(e), e, np.inf), error_budget)
    return [options[int(k)] for k in choice]
