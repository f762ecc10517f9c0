"""Multiple-choice knapsack: pick one option per item, minimising a total value under a total weight limit.

Used for the bits of each singular direction (:mod:`lorakit.quant.mixed`) and for LQ-LoRA's configuration per
matrix (:mod:`lorakit.quant.lq_lora`). Solved exactly as a binary ILP with ``scipy.optimize.milp`` (HiGHS)::

    min Σ_ic v_ic x_ic   s.t.   Σ_ic w_ic x_ic ≤ W,   Σ_c x_ic = 1 ∀i,   x ∈ {0, 1}

Values are normalised (‖v‖ = 1000, LQ-LoRA's trick) for the solver's tolerances.
"""

from __future__ import annotations

import numpy as np

from lorakit.errors import NumericalError, OperatorParameterError


def choose_one_per_item(
    values: np.ndarray, weights: np.ndarray, capacity: float, *, time_limit: float = 60.0
) -> np.ndarray:
    """Indices ``(n,)`` of the option chosen for each item; ``values``, ``weights``: ``(n, c)`` (``inf`` = not
    allowed).

    Raises:
        OperatorParameterError: no choice fits under ``capacity`` (the message gives the smallest possible total).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    v = np.asarray(values, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    n, c = v.shape
    allowed = np.isfinite(v) & np.isfinite(w)
    lightest = np.where(allowed, w, np.inf).min(axis=1).sum()
    if lightest > capacity * (1 + 1e-12):
        raise OperatorParameterError(
            f"the budget cannot be met: the smallest possible total is {lightest:.6g}, the budget {capacity:.6g}"
        )
    norm = np.linalg.norm(np.where(allowed, v, 0.0))
    v_scaled = np.where(allowed, v * (1000.0 / norm if norm > 0 else 1.0), 0.0).reshape(-1)
    w_flat = np.where(allowed, w, 0.0).reshape(-1)
    one_each = np.kron(np.eye(n), np.ones((1, c)))
    constraints = [LinearConstraint(w_flat[None, :], -np.inf, capacity), LinearConstraint(one_each, 1, 1)]
    upper = allowed.reshape(-1).astype(np.float64)
    res = milp(
        v_scaled,
        constraints=constraints,
        integrality=np.ones(n * c),
        bounds=Bounds(0, upper),
        options={"time_limit": time_limit},
    )
    if res.x is None:
        raise NumericalError(f"the bit-allocation ILP found no solution ({res.message})")
    choice = np.rint(res.x).reshape(n, c).argmax(axis=1)
    return choice
