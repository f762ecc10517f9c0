"""``lorakit apply BASE ADAPTER -o MERGED``: fold ΔW into the base weights (or take it out with --subtract)."""

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


@click.command(epilog="""\b
Examples:
  lorakit apply base-model/ style-lora/ -o merged-model/
  lorakit apply base.safetensors style.safetensors --scale 0.7 -o merged.safetensors
  lorakit apply merged-model/ style-lora/ --subtract -o base-again/
""")
@click.argument("base")
@click.argument("adapter")
@output_option
@click.option("--scale", "weight", type=float, default=1.0, show_default=True, help="Multiply ΔW by w.")
@click.option("--subtract", is_flag=True, help="W − w·ΔW instead of W + w·ΔW (undo an earlier apply).")
@json_option
@quiet_option
@dry_run_option
@device_option
@allow_pickle_option
def command(base: str, adapter: str, output: str, weight: float, subtract: bool, as_json: bool, quiet: bool,
            dry_run: bool, device: str, allow_pickle: bool) -> None:
    """Merge an adapter into a base checkpoint (safetensors, sharded or not), streamed tensor by tensor; the
    output keeps the base's dtypes, sharding and companion files (config.json...)."""
    from lorakit.verbs.apply import apply_file
    from lorakit.verbs.store import resolve

    from .._options import run_options
    from .._output import emit

    src = resolve(adapter, allow_pickle=allow_pickle)
    report = apply_file(base, src, output, weight=weight, subtract=subtract, run=run_options(device), dry_run=dry_run,
                        allow_pickle=allow_pickle)
    emit(report, as_json=as_json, quiet=quiet, max_rows=40)
