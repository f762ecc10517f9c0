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
    import lorakit
    from lorakit.describe import describe

    from .._options import run_options
    from .._output import emit

    dev = run_options(device).device  # checked first: --device cuda without a GPU fails before any reading
    a = lorakit.load(adapter, allow_pickle=allow_pickle, arch=arch, base=base)
    if spectrum:
        from lorakit.ops.spectrum import spectrum_report

        emit(spectrum_report(a, device=dev, full=as_json), as_json=as_json, max_rows=None if show_all else 40)
        return
    emit(describe(a, norms=norms), as_json=as_json, max_rows=None if show_all else 40)
