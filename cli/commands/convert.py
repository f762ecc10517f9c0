"""``lorakit convert IN -o OUT --to FORMAT``: rewrite an adapter in another format, ΔW and scales kept."""

from __future__ import annotations

import click

from .._options import (
    allow_pickle_option,
    json_option,
    keymap_options,
    max_rank_option,
    output_option,
    quiet_option,
)


@click.command(epilog="""\b
Examples:
  lorakit convert style.safetensors --to peft -o style-peft/
  lorakit convert style-peft/ --to kohya -o style.safetensors
  lorakit convert flux_lora.safetensors --arch flux --to diffusers -o flux_diffusers.safetensors
  lorakit convert loha.safetensors --to kohya --max-rank 32 -o lora.safetensors
""")
@click.argument("adapter")
@output_option
@click.option("--to", "to_format", type=click.Choice(["peft", "kohya", "diffusers"]), required=True,
              help="Target format.")
@json_option
@quiet_option
@allow_pickle_option
@keymap_options
@max_rank_option
def command(adapter: str, output: str, to_format: str, as_json: bool, quiet: bool, allow_pickle: bool,
            arch: str | None, base: str | None, max_rank: int | None) -> None:
    """Convert an adapter between formats (exact: ΔW and every module's scale are preserved)."""
    from lorakit.verbs.convert import convert
    from lorakit.verbs.store import resolve

    from .._output import emit

    src = resolve(adapter, allow_pickle=allow_pickle)
    report = convert(src, output, to_format, allow_pickle=allow_pickle, arch=arch, base=base, max_rank=max_rank)
    emit(report, as_json=as_json, quiet=quiet)
