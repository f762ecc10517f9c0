"""``lorakit quantize`` / ``lorakit dequantize``: quantize every module of an adapter (the operator:
:func:`lorakit.quant.quantize.quantize_module`) into the quantized file format, and back."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from lorakit.adapter import Adapter
from lorakit.errors import FormatError
from lorakit.factors import LoraFactors
from lorakit.formats.quantized import write_quantized
from lorakit.io.atomic import check_output_path
from lorakit.provenance import make_provenance, provenance_metadata
from lorakit.quant.blockwise import QuantConfig
from lorakit.quant.mixed import default_code
from lorakit.quant.module import QuantizedModule
from lorakit.quant.quantize import Progress, _check_options, bits_summary, dequantize_adapter, quantize_module
from lorakit.report import Report
from lorakit.run import RunOptions, run_options
from lorakit.verbs.engine import ModuleStream, Output, streamed, write_adapter
from lorakit.verbs.store import default_output_format, load


def quantize_adapter(
    adapter: Adapter,
    output: str | Path | None,
    *,
    bits: int | None = 4,
    code: str | None = None,
    block: int = 64,
    double: bool = True,
    error: float | None = None,
    avg_bits: float | None = None,
    pad: bool = False,
    inputs: tuple[str | Path, ...] = (),
    progress: Progress | None = None,
    dry_run: bool = False,
    run: RunOptions | None = None,
) -> Report:
    """Quantize every module of ``adapter`` and write the quantized file to ``output`` (nothing with
    ``dry_run``). See :func:`quantize_module` for the parameters.

    Raises:
        FormatError: the adapter is already quantized.
        OperatorParameterError: unsupported bits, a block size that does not divide a row (without ``pad``),
            contradictory options.
    """
    if adapter.meta.source_format == "quantized":
        raise FormatError(
            "the adapter is already quantized",
            file=adapter.meta.source_path,
            hint="dequantize it first (lorakit dequantize), or quantize the original",
        )
    if adapter.meta.full_tensors:
        name = next(iter(adapter.meta.full_tensors))
        raise FormatError(
            f"{len(adapter.meta.full_tensors)} whole module tensor(s) (modules_to_save, e.g. {name}) have no "
            "place in a quantized file", file=adapter.meta.source_path,
            hint="keep this adapter in the PEFT format, or apply it to its base model (lorakit apply)",
        )
    _check_options(adapter, bits, code, block, error, avg_bits, pad)
    params = {
        "bits": bits,
        "code": code,
        "block": block,
        "double": double,
        "error": error,
        "avg_bits": avg_bits,
        "pad": pad,
    }
    mode = (
        f"{bits} bits"
        if bits is not None
        else (f"mixed, error ≤ {error:g}" if error is not None else f"mixed, {avg_bits:g} bits average")
    )
    report = Report(
        f"quantize ({mode}, block {block}{', double quantization' if double else ''})",
        ["module", "shape", "rank", "kept", "bits", "bits/param", "rel error"],
    )
    if dry_run:
        for name, i in adapter.infos().items():
            est = (
                QuantConfig(bits, code or default_code(bits), block, double).bits_per_parameter
                if bits
                else None
            )
            report.add_row(name, f"{i.out_features}x{i.in_features}", i.rank, None, bits, est, None)
        report.summary.update(module_count=len(adapter), parameters=adapter.num_params)
        return report.finish(output=output, inputs=[adapter], dry_run=True)
    out = check_output_path(output, inputs) if output is not None else None
    device = run_options(run).device
    totals = {"bits": 0, "params": 0, "err2": 0.0, "norm2": 0.0}

    def work(window: list[str], inputs) -> dict[str, tuple[LoraFactors, QuantizedModule, float]]:
        name = window[0]  # one module at a time: the quantizer has no batched path
        f = inputs(name)
        q, rel = quantize_module(name, f, bits=bits, code=code, block=block, double=double, error=error,
                                 avg_bits=avg_bits, pad=pad, device=device)
        return {name: (f, q, rel)}

    infos = adapter.infos()
    stream = ModuleStream(list(adapter), adapter.__getitem__, work, nbytes=lambda n: infos[n].num_params * 4,
                          progress=progress, label="quantize")

    def produce() -> Iterator[QuantizedModule]:
        for name, (f, q, rel) in stream:
            norm = f.norm()
            totals["bits"] += q.storage_bits
            totals["params"] += q.num_params
            totals["err2"] += (rel * norm) ** 2
            totals["norm2"] += norm**2
            report.add_row(
                name,
                f"{q.out_features}x{q.in_features}",
                q.rank,
                q.kept_rank,
                bits_summary(q.bits),
                q.storage_bits / max(q.num_params, 1),
                rel,
            )
            yield q

    if out is not None:
        prov = make_provenance("quantize", params, inputs)
        write_quantized(out, produce(), adapter.meta, provenance_metadata(prov))
        report.summary["file_bytes"] = out.stat().st_size
    else:
        for _ in produce():
            pass
    report.summary.update(
        module_count=len(adapter),
        parameters=totals["params"],
        bits_per_param=totals["bits"] / max(totals["params"], 1),
        fp16_bytes=2 * totals["params"],
        rel_error=math.sqrt(totals["err2"] / totals["norm2"]) if totals["norm2"] > 0 else 0.0,
    )
    report.notes.append(
        "errors are ‖ΔW − ΔŴ‖_F/‖ΔW‖_F per module, computed in factored form; bits/param counts "
        "codes and all block constants against the original rank·(out+in) parameters"
    )
    if adapter.meta.passthrough:
        report.notes.append(
            f"{len(adapter.meta.passthrough)} non-LoRA tensors (modules_to_save...) are not "
            "carried into the quantized file"
        )
    return report.finish(output=out, format=None if out is None else "quantized", inputs=[adapter])


def dequantize_file(
    path: str | Path, output: str | Path, *, to_format: str | None = None, dtype: Any = None
) -> Report:
    """Read a quantized file and write it as an ordinary adapter (``to_format``, default: its source format)."""
    q = load(path)
    plain = dequantize_adapter(q)  # the source format restored; each module dequantized when read
    cast = None if dtype is None else lambda _n, f: f.to(dtype=dtype)
    out_infos = None if dtype is None else {n: replace(i, dtype=dtype) for n, i in plain.infos().items()}
    plain = streamed(plain, cast, out_infos)  # the next module read and dequantized while one is written
    fmt = to_format or default_output_format(plain)
    out = write_adapter(plain, Output(output, "dequantize", {"to": fmt}, (path,), fmt))
    report = Report(f"dequantize to {fmt}", ["module", "shape", "rank"])
    for n, i in plain.infos().items():
        report.add_row(n, f"{i.out_features}x{i.in_features}", i.rank)
    report.summary["module_count"] = len(plain)
    return report.finish(output=out, format=fmt, inputs=[plain])
