"""``lorakit dequantize Q -o OUT [--to FORMAT]``: back to PEFT/kohya/diffusers (the source format by default)."""

from __future__ import annotations

import click

from .._options import dtype_option, json_option, output_option, quiet_option, torch_dtype


@click.command(
    epilog="""\b
Examples:
  lorakit dequantize style-nf4.safetensors -o style-dq.safetensors
  lorakit dequantize style-nf4.safetensors --to peft -o style-peft/
"""
)
@click.argument("adapter")
@output_option
@click.option(
    "--to",
    "to_format",
    type=click.Choice(["peft", "kohya", "diffusers"]),
    default=None,
    help="Output format (default: the format the adapter was quantized from).",
)
@dtype_option
@json_option
@quiet_option
def command(adapter: str, output: str, to_format: str | None, dtype: str, as_json: bool, quiet: bool) -> None:
    """Dequantize a quantized adapter into an ordinary LoRA file (the factors in canonical SVD form)."""
    from lorakit.verbs.quantize import dequantize_file
    from lorakit.verbs.store import resolve

    from .._output import emit

    src = resolve(adapter)
    emit(
        dequantize_file(src, output, to_format=to_format, dtype=torch_dtype(dtype)),
        as_json=as_json,
        quiet=quiet,
    )
