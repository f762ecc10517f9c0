"""``lorakit similarity A B [C...]``: pairwise cosine similarity and norm ratios of adapters, factored."""

from __future__ import annotations

import click

from .._options import allow_pickle_option, device_option, json_option, quiet_option


@click.command(epilog="""\b
Examples:
  lorakit similarity a.safetensors b.safetensors c.safetensors
  lorakit similarity a b --per-module --json
""")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--per-module", is_flag=True, help="Also show each module's cosine (first two adapters) and norms.")
@json_option
@quiet_option
@allow_pickle_option
@device_option
def command(inputs: tuple[str, ...], per_module: bool, as_json: bool, quiet: bool, allow_pickle: bool,
            device: str) -> None:
    """Cosine similarity ⟨ΔW_i, ΔW_j⟩/(‖ΔW_i‖‖ΔW_j‖) over the common modules, computed from the factors."""
    from lorakit.verbs.similarity import similarity_report

    from .._options import run_options
    from .._output import emit

    emit(similarity_report(list(inputs), per_module=per_module, allow_pickle=allow_pickle,
                           run=run_options(device)), as_json=as_json,
         quiet=quiet, max_rows=None if per_module else 40)
