"""``lorakit inspect FILE``: format, base model, modules, ranks, scales, dtypes, parameters; ``--norms``."""

from __future__ import annotations

import click

from .._options import allow_pickle_option, device_option, json_option, keymap_options


@click.command(epilog="""\b
Examples:
  lorakit inspect examples/style.safetensors
  lorakit inspect adapter_dir/ --norms --json
  lorakit inspect adapter_dir/ --spectrum
  lorakit inspect sdxl_lora.safetensors --arch sdxl
""")
@click.argument("adapter")
@click.option("--norms", is_flag=True, help="Read the tensors and show ‖ΔW‖_F per module (factored, exact).")
@click.option("--spectrum", is_flag=True, help="Per-module singular values and effective rank (exact, from the factors; batched on --device).")
@click.option("--all", "show_all", is_flag=True, help="Show every module (default: the first and last 20).")
@json_option
@allow_pickle_option
@keymap_options
@device_option
def command(adapter: str, norms: bool, spectrum: bool, show_all: bool, as_json: bool, allow_pickle: bool,
            arch: str | None, base: str | None, device: str) -> None:
    """Show what is inside an adapter, reading only the header unless --norms or --spectrum is given."""
    from lorakit.verbs.inspect import inspect

    from .._options import run_options
    from .._output import emit

    run = run_options(device)  # checked first: --device cuda without a GPU fails before any reading
    emit(inspect(adapter, norms=norms, spectrum=spectrum, full=as_json, allow_pickle=allow_pickle, arch=arch,
                 base=base, run=run), as_json=as_json, max_rows=None if show_all else 40)
