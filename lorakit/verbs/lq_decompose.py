"""``lorakit lq-decompose``: stream the matrices of a base checkpoint through the LQ-LoRA decomposition
(:func:`lorakit.quant.lq_lora.lq_decompose`), write the quantized residual and the LoRA initialisation, report;
and read such a residual back (:func:`load_residual`)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorakit.adapter import Adapter, AdapterMeta
from lorakit.errors import CorruptFileError, FormatError, OperatorParameterError
from lorakit.factors import LoraFactors
from lorakit.formats.quantized import crc32, dtype_from_name
from lorakit.io.atomic import atomic_output, check_output_path
from lorakit.io.files import loads_json
from lorakit.io.safetensors_file import SafetensorsFile
from lorakit.io.writer import SafetensorsWriter
from lorakit.provenance import make_provenance, provenance_metadata
from lorakit.quant.blockwise import QuantConfig, QuantizedTensor, dequantize_tensor
from lorakit.quant.lq_lora import (
    DEFAULT_EXCLUDE,
    DEFAULT_GRID,
    RESIDUAL_KEY,
    RESIDUAL_SCHEMA,
    RESIDUAL_VERSION,
    CostTable,
    LQResult,
    grid_configs,
    lq_decompose,
    matrices_to_decompose,
    matrix_costs,
    solve_budget,
)
from lorakit.quant.mixed import default_code
from lorakit.report import Report
from lorakit.run import RunOptions, run_options
from lorakit.verbs.engine import ModuleStream
from lorakit.verbs.store import save


def plan_budget(
    tensors: Callable[[str], torch.Tensor],
    names: list[str],
    rank: int,
    budget: float,
    *,
    grid: Iterable[tuple[int, int]] = DEFAULT_GRID,
    iters: int = 2,
    pad: bool = False,
    device: torch.device | str | None = None,
    progress: Callable[[Iterable[str], int, str], Iterator[str]] | None = None,
) -> tuple[dict[str, QuantConfig], dict[str, Any]]:
    """The ILP allocation of one configuration per matrix meeting ``budget`` bits/parameter on average.

    The cost table streams the matrices through the engine's loop (:class:`~lorakit.verbs.engine.ModuleStream`,
    no read-ahead: one dense matrix in memory at a time), each row from
    :func:`~lorakit.quant.lq_lora.matrix_costs` (one short decomposition per configuration of ``grid``); then
    :func:`~lorakit.quant.lq_lora.solve_budget`.
    """
    configs = grid_configs(grid)

    def work(window: list[str], inputs) -> dict[str, tuple[int, np.ndarray, np.ndarray]]:
        n = window[0]  # one matrix at a time: each is dense
        W = inputs(n)
        return {n: (W.numel(), *matrix_costs(W, rank, configs, iters=iters, pad=pad, device=device))}

    # sizes are unknown to a callable source: no heap trimming (as before); no read-ahead of a dense matrix
    stream = ModuleStream(names, tensors, work, nbytes=lambda n: 0, read_ahead=False, progress=progress,
                          label="ILP costs")
    rows = [row for _, row in stream]
    table = CostTable(names, configs, np.array([c for _, c, _ in rows]).reshape(len(names), len(configs)),
                      np.array([s for _, _, s in rows]).reshape(len(names), len(configs)),
                      np.array([float(k) for k, _, _ in rows]))
    return solve_budget(table, budget)


def lq_decompose_file(
    base: str | Path,
    output: str | Path,
    *,
    rank: int,
    bits: int | None = 4,
    budget: float | None = None,
    block: int = 64,
    iters: int = 20,
    ilp_iters: int = 2,
    include: str | None = None,
    exclude: str | None = DEFAULT_EXCLUDE,
    pad: bool = False,
    dry_run: bool = False,
    run: RunOptions | None = None,
    progress: Callable[[Iterable[str], int, str], Iterator[str]] | None = None,
) -> Report:
    """Decompose the matrices of a safetensors base checkpoint; write ``OUTPUT/residual.safetensors`` (quantized
    Q, other tensors as they were) and ``OUTPUT/adapter/`` (PEFT LoRA initialisation, ``lora_B = L₁``,
    ``lora_A = L₂``, scale 1). Exactly one of ``bits`` and ``budget``. ``run``: device and the seed of the
    randomized SVDs (default 0).
    """
    run = run_options(run)
    device, seed = run.device, run.seed_or(0)
    if (bits is None) == (budget is None):
        raise OperatorParameterError("give exactly one of --bits and --budget")
    if budget is not None and not (budget > 0 and math.isfinite(budget)):
        raise OperatorParameterError(
            f"--budget must be a positive number of bits per parameter, got {budget}"
        )
    if bits is not None:
        QuantConfig(bits, default_code(bits), block)
    src = SafetensorsFile(base)
    if RESIDUAL_KEY in src.metadata or "lorakit.quantized" in src.metadata:
        raise FormatError(
            "the base checkpoint is already quantized",
            file=base,
            hint="lq-decompose reads full-precision base weights",
        )
    names = matrices_to_decompose(src.keys(), lambda k: src.info(k).shape, rank, include, exclude)
    if not names:
        raise FormatError(
            f"no 2-D weight matrix larger than rank {rank} to decompose",
            file=base,
            hint="check --include/--exclude and --rank",
        )
    if bits is not None and not pad:
        for n in names:
            cols = src.info(n).shape[1]
            if cols % block:
                raise OperatorParameterError(
                    f"block size {block} does not divide the row length {cols}",
                    module=n,
                    hint=f"choose a --block that divides {cols}, or pass --pad",
                )
    report = Report(
        f"lq-decompose (rank {rank}, " + (f"{bits} bits" if bits else f"budget {budget:g} bits") + ")",
        ["matrix", "shape", "bits", "block", "iterations", "first error", "best error", "bits/param"],
    )
    if dry_run:
        for n in names:
            report.add_row(n, "x".join(map(str, src.info(n).shape)), bits, block, None, None, None, None)
        report.summary.update(matrices=len(names))
        return report.finish(output=output, dry_run=True)
    out = check_output_path(output, (base,))
    chosen: dict[str, QuantConfig]
    if budget is not None:
        chosen, facts = plan_budget(
            lambda k: src.get(k),
            names,
            rank,
            budget,
            iters=ilp_iters,
            pad=pad,
            device=device,
            progress=progress,
        )
        report.summary.update(ilp_avg_bits=facts["avg_bits"], ilp_configs=facts["configs"])
    else:
        assert bits is not None
        chosen = {n: QuantConfig(bits, default_code(bits), block, True) for n in names}
    params = {"rank": rank, "bits": bits, "budget": budget, "block": block, "iters": iters, "seed": seed}
    prov = provenance_metadata(make_provenance("lq-decompose", params, (base,)))
    schema: dict[str, Any] = {
        "schema": RESIDUAL_SCHEMA,
        "version": RESIDUAL_VERSION,
        "rank": rank,
        "matrices": {},
    }
    factors: dict[str, LoraFactors] = {}
    total_bits = total_numel = 0
    err2 = norm2 = 0.0

    def work(window: list[str], inputs) -> dict[str, tuple[torch.Tensor, LQResult]]:
        n = window[0]  # one matrix at a time: each is dense
        W = inputs(n)
        return {n: (W, lq_decompose(W, rank, chosen[n], iters=iters, seed=seed, pad=pad, device=device))}

    # no read-ahead: a second dense base matrix in memory would double the peak
    stream = ModuleStream(names, src.get, work, nbytes=lambda n: 4 * math.prod(src.info(n).shape),
                          read_ahead=False, progress=progress, label="lq-decompose")
    with atomic_output(out, directory=True) as tmp:
        with SafetensorsWriter(tmp / "residual.safetensors", {"format": "pt", **prov}) as w:
            todo = set(names)
            for k in src.keys():
                if k not in todo:
                    w.add(k, src.get(k))
            for n, (W, res) in stream:
                assert res.Q is not None
                for role, t in res.Q.tensors().items():
                    w.add(f"{n}.{role}", t)
                schema["matrices"][n] = {
                    "shape": list(W.shape),
                    "dtype": str(W.dtype).removeprefix("torch."),
                    **chosen[n].to_json(),
                    "crc32": crc32(res.Q.codes),
                }
                module = n.removesuffix(".weight")
                factors[module] = LoraFactors(res.L2.to("cpu", W.dtype), res.L1.to("cpu", W.dtype), 1.0)
                total_bits += res.Q.storage_bits
                total_numel += W.numel()
                wn2 = float(W.float().norm()) ** 2
                err2 += res.error**2 * wn2
                norm2 += wn2
                report.add_row(
                    n,
                    f"{W.shape[0]}x{W.shape[1]}",
                    chosen[n].bits,
                    chosen[n].block,
                    len(res.errors),
                    res.errors[0],
                    res.error,
                    res.Q.storage_bits / W.numel(),
                )
            w.metadata[RESIDUAL_KEY] = json.dumps(schema, sort_keys=True)
        adapter = Adapter(factors, AdapterMeta(base_model=str(base), source_format="peft"))
        save(adapter, tmp / "adapter", format="peft", metadata=prov)
    report.summary.update(
        matrices=len(names),
        quantized_bits_per_param=total_bits / max(total_numel, 1),
        rel_error=math.sqrt(err2 / norm2) if norm2 else 0.0,
    )
    report.notes.append(
        "errors are ‖W − (Q + L₁L₂)‖_F/‖W‖_F; bits/param counts the quantized residual with its "
        "constants (the rank-r factors are stored in adapter/ at the base dtype)"
    )
    return report.finish(output=out)


def load_residual(path: str | Path) -> dict[str, torch.Tensor]:
    """The dense base weights of a residual file: quantized matrices dequantized (in their original dtype), every
    other tensor as stored. Raises :class:`CorruptFileError` for a damaged file."""
    f = SafetensorsFile(path)
    try:
        schema = loads_json(f.metadata[RESIDUAL_KEY])  # ValueError, not RecursionError, when nested deeply
        matrices = schema["matrices"]
    except (KeyError, ValueError, TypeError) as e:
        raise CorruptFileError(f"metadata {RESIDUAL_KEY} is missing or malformed", file=path) from e
    if schema.get("version") != RESIDUAL_VERSION:
        raise FormatError(f"residual version {schema.get('version')} is not supported", file=path)
    out: dict[str, torch.Tensor] = {}
    owned = {f"{n}.{r}" for n in matrices for r in ("codes", "absmax", "qabsmax", "scale2", "offset")}
    for k in f.keys():
        if k not in owned:
            out[k] = f.get(k)
    for n, spec in matrices.items():
        cfg = QuantConfig(int(spec["bits"]), spec["code"], int(spec["block"]), bool(spec["double"]))
        roles = ("qabsmax", "scale2", "offset") if cfg.double else ("absmax",)
        missing = [r for r in ("codes", *roles) if f"{n}.{r}" not in f]
        if missing:
            raise CorruptFileError(f"tensor {n}.{missing[0]} is missing", file=path, module=n)
        q = QuantizedTensor(
            tuple(spec["shape"]), cfg, f.get(f"{n}.codes"), **{r: f.get(f"{n}.{r}") for r in roles}
        )
        if crc32(q.codes) != int(spec["crc32"]):
            raise CorruptFileError("codes fail their checksum (the file is damaged)", file=path, module=n)
        try:
            out[n] = dequantize_tensor(q, where=n).to(dtype_from_name(spec["dtype"]))
        except CorruptFileError as e:
            raise CorruptFileError(e.message, file=path, module=n) from e
    return out
