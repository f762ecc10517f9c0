"""``quantize`` and ``dequantize`` of whole adapters, streamed module by module, with a loss report.

Per module: canonical SVD form (exact), then fixed bits for every direction or a per-direction allocation
(:mod:`lorakit.quant.mixed`), then packing; the relative ΔW error is measured in factored form against the
input. The report gives bits per parameter including every stored constant, relative to the original
``rank·(out + in)`` parameters. Reading and writing files is the verb's (:mod:`lorakit.verbs.quantize`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch

from lorakit.adapter import Adapter
from lorakit.device import factors_to
from lorakit.errors import FormatError, OperatorParameterError
from lorakit.factors import LoraFactors
from lorakit.quant.blockwise import QuantConfig
from lorakit.quant.codebooks import check_bits
from lorakit.quant.mixed import allocate, candidate_configs, default_code, direction_table
from lorakit.quant.module import QuantizedModule, factored_error, quantize_canonical, to_canonical

T = TypeVar("T")
Progress = Callable[[Iterable[T], int, str], Iterator[T]]
RETIGHTEN = 4  # attempts to meet an error target whose allocation used the uncorrelated-error estimate


def bits_summary(bits: list[int]) -> str:
    """``"4"`` or ``"8×2 4×6 0×8"`` (bits × directions)."""
    counts: dict[int, int] = {}
    for b in bits:
        counts[b] = counts.get(b, 0) + 1
    if len(counts) == 1:
        return str(bits[0]) if bits else "-"
    return " ".join(f"{b}×{n}" for b, n in sorted(counts.items(), reverse=True))


def quantize_module(
    name: str,
    f: LoraFactors,
    *,
    bits: int | None = 4,
    code: str | None = None,
    block: int = 64,
    double: bool = True,
    error: float | None = None,
    avg_bits: float | None = None,
    pad: bool = False,
    device: torch.device | str | None = None,
) -> tuple[QuantizedModule, float]:
    """Quantize one module; returns it and its relative ΔW error ``‖ΔW − ΔŴ‖_F / ‖ΔW‖_F``.

    ``bits`` fixes the precision of every direction; with ``bits=None`` exactly one of ``error`` (relative ΔW
    error target) or ``avg_bits`` (bits per parameter, constants included) chooses them per direction.
    """
    f.check_finite(module=name)
    if device is not None:
        f = factors_to(f, device)
    canon = to_canonical(f)
    norm = f.norm()
    if bits is not None:
        cfg = QuantConfig(bits, code or default_code(bits), block, double)
        q = quantize_canonical(name, f, canon, [bits] * canon.rank, {bits: cfg}, pad=pad)
        return q, _relative(f, q, norm)
    configs = candidate_configs(block, double, code)
    options, errors, costs = direction_table(canon, configs, pad=pad)
    width = f.out_features + f.in_features
    if avg_bits is not None:
        # The table prices each direction alone; segments add a few fixed constants (offset, last group scale).
        # Re-solve with the excess taken off the budget until the stored size meets it.
        target = avg_bits * canon.rank * width
        capacity = target
        for _ in range(RETIGHTEN):
            try:
                chosen = allocate(options, errors, costs, width, avg_bits=capacity / (canon.rank * width))
            except OperatorParameterError as e:
                least = float(costs[0, 1]) / (canon.rank * width)
                raise OperatorParameterError(
                    f"--avg-bits {avg_bits:g} is below what this module can store (at least {least:.3g} bits per "
                    "parameter: the top direction at 2 bits)",
                    module=name,
                    hint="raise --avg-bits",
                ) from e
            q = quantize_canonical(name, f, canon, chosen, configs, pad=pad)
            if q.storage_bits <= target:
                break
            capacity -= q.storage_bits - target
        return q, _relative(f, q, norm)
    assert error is not None
    budget = (error * norm) ** 2
    best: tuple[QuantizedModule, float] | None = None
    for _ in range(RETIGHTEN):
        try:
            chosen = allocate(options, errors, costs, width, error_budget=budget)
        except OperatorParameterError:
            break
        q = quantize_canonical(name, f, canon, chosen, configs, pad=pad)
        rel = _relative(f, q, norm)
        best = (q, rel)
        if rel <= error or rel == 0:
            return best
        budget *= (error / rel) ** 2 * 0.98
    if best is None or best[1] > error:
        finest = max(configs)
        q = quantize_canonical(name, f, canon, [finest] * canon.rank, configs, pad=pad)
        rel = _relative(f, q, norm)
        if rel > error:
            raise OperatorParameterError(
                f"error target {error:g} is below what {finest}-bit quantization reaches ({rel:.3g})",
                module=name,
                hint="raise --error, or keep this adapter unquantized",
            )
        return q, rel
    return best


def _relative(f: LoraFactors, q: QuantizedModule, norm: float) -> float:
    return factored_error(f, q.factors()) / norm if norm > 0 else 0.0


def _check_options(
    adapter: Adapter,
    bits: int | None,
    code: str | None,
    block: int,
    error: float | None,
    avg_bits: float | None,
    pad: bool,
) -> None:
    if bits is not None:
        check_bits(bits)
        if error is not None or avg_bits is not None:
            raise OperatorParameterError("--bits fixes the precision; --error and --avg-bits go with --mixed")
        QuantConfig(bits, code or default_code(bits), block)
    elif (error is None) == (avg_bits is None):
        raise OperatorParameterError("mixed precision needs exactly one of --error E or --avg-bits B")
    if error is not None and not (error > 0 and math.isfinite(error)):
        raise OperatorParameterError(f"--error must be a positive relative error, got {error}")
    if avg_bits is not None and not (avg_bits > 0 and math.isfinite(avg_bits)):
        raise OperatorParameterError(f"--avg-bits must be positive, got {avg_bits}")
    if block < 1:
        raise OperatorParameterError(f"block size must be positive, got {block}")
    if not pad:
        for name, i in adapter.infos().items():
            for what, n in (("out", i.out_features), ("in", i.in_features)):
                if n % block:
                    raise OperatorParameterError(
                        f"block size {block} does not divide the row length {n} ({what} features)",
                        module=name,
                        hint=f"choose a --block that divides {n}, or pass --pad to pad rows with zeros",
                    )


def dequantize_adapter(adapter: Adapter) -> Adapter:
    """The adapter with its source format and config restored (factors dequantized on access), ready to save."""
    if adapter.meta.source_format != "quantized":
        raise FormatError(
            "the adapter is not quantized",
            file=adapter.meta.source_path,
            hint="lorakit dequantize reads files written by lorakit quantize",
        )
    cfg: dict[str, Any] = dict(adapter.meta.format_config)
    return adapter.with_meta(
        source_format=cfg.get("source_format"), format_config=cfg.get("source_config") or {}, notes=()
    )


