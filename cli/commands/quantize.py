"""``lorakit quantize IN -o OUT --bits 4`` (or ``--mixed --error E`` / ``--avg-bits B``): a quantized adapter file."""

from __future__ import annotations

import click

from .._options import (
    allow_pickle_option,
    device_option,
    dry_run_option,
    json_option,
    output_option,
    quiet_option,
)


@click.command(
    epilog="""\b
Examples:
  lorakit quantize style.safetensors --bits 4 -o style-nf4.safetensors
  lorakit quantize style.safetensors --bits 8 -o style-int8.safetensors
  lorakit quantize style.safetensors --mixed --error 0.05 -o style-mixed.safetensors
  lorakit quantize adapter_dir/ --mixed --avg-bits 3 --block 32 -o a-q.safetensors --json
"""
)
@click.argument("adapter")
@output_option
@click.option(
    "--bits", type=int, default=None, help="Bits for every singular direction: 2, 3, 4 or 8 [default: 4]."
)
@click.option(
    "--mixed",
    is_flag=True,
    help="Choose bits per singular direction (0, 2, 3, 4 or 8) to meet --error or --avg-bits.",
)
@click.option("--error", type=float, default=None, help="With --mixed: relative ΔW error target per module.")
@click.option(
    "--avg-bits",
    type=float,
    default=None,
    help="With --mixed: average bits per parameter per module, block constants included.",
)
@click.option(
    "--code",
    type=click.Choice(["auto", "nf", "int"]),
    default="auto",
    show_default=True,
    help="Code values: NormalFloat or symmetric integer (auto: nf below 8 bits, int at 8).",
)
@click.option("--block", type=int, default=64, show_default=True, help="Elements per absmax block.")
@click.option("--no-double", is_flag=True, help="Store block constants as fp32 (no double quantization).")
@click.option("--pad", is_flag=True, help="Pad rows that the block size does not divide (default: refuse).")
@json_option
@quiet_option
@dry_run_option
@device_option
@allow_pickle_option
def command(
    adapter: str,
    output: str,
    bits: int | None,
    mixed: bool,
    error: float | None,
    avg_bits: float | None,
    code: str,
    block: int,
    no_double: bool,
    pad: bool,
    as_json: bool,
    quiet: bool,
    dry_run: bool,
    device: str,
    allow_pickle: bool,
) -> None:
    """Quantize an adapter's factors block-wise (NF4 and friends) in canonical SVD form, reporting the loss."""
    import lorakit
    from lorakit.errors import OperatorParameterError
    from lorakit.verbs.quantize import quantize_adapter
    from lorakit.verbs.store import resolve

    from .._options import run_options
    from .._output import emit, progress

    if mixed and bits is not None:
        raise OperatorParameterError("--bits and --mixed exclude each other")
    if not mixed:
        bits = 4 if bits is None else bits
    src = resolve(adapter, allow_pickle=allow_pickle)
    a = lorakit.load(src, allow_pickle=allow_pickle)
    report = quantize_adapter(
        a,
        output,
        bits=bits,
        code=None if code == "auto" else code,
        block=block,
        double=not no_double,
        error=error,
        avg_bits=avg_bits,
        pad=pad,
        inputs=(src,),
        dry_run=dry_run,
        run=run_options(device),
        progress=lambda items, total, desc: progress(items, total, desc, quiet=quiet or as_json),
    )
    emit(report, as_json=as_json, quiet=quiet, max_rows=40)
