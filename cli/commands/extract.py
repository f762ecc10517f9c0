"""``lorakit extract BASE FINETUNED -o LORA``: a LoRA from the difference of two checkpoints."""

from __future__ import annotations

import click

from .._options import (
    device_option,
    dry_run_option,
    dtype_option,
    json_option,
    output_option,
    quiet_option,
)


@click.command(epilog="""\b
Examples:
  lorakit extract base-model/ finetuned-model/ --rank 32 -o extracted-lora/
  lorakit extract base.safetensors tuned.safetensors --energy 0.9 --to kohya -o lora.safetensors
  lorakit extract base/ tuned/ --rank 16 --include 'self_attn' -o attn-lora/
""")
@click.argument("base")
@click.argument("finetuned")
@output_option
@click.option("--rank", type=int, default=None, help="Rank K in every module.")
@click.option("--energy", type=float, default=None, help="Smallest rank keeping E of ‖ΔW‖_F² per module, E in (0, 1].")
@click.option("--error", type=float, default=None, help="Smallest rank with relative error ≤ E per module.")
@click.option("--max-rank", type=int, default=None, help="Cap for --energy/--error.")
@click.option("--include", default=None, help="Regex: only tensors whose name matches.")
@click.option("--exclude", default=r"(embed|wte|wpe|lm_head)", show_default=True,
              help="Regex: skip tensors whose name matches ('' to keep all).")
@click.option("--oversample", type=int, default=10, show_default=True, help="Extra random probes.")
@click.option("--n-iter", type=int, default=4, show_default=True, help="Power iterations.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random probes.")
@click.option("--to", "to_format", type=click.Choice(["peft", "kohya", "diffusers"]), default="peft",
              show_default=True, help="Output format.")
@dtype_option
@json_option
@quiet_option
@dry_run_option
@device_option
def command(base: str, finetuned: str, output: str, rank: int | None, energy: float | None, error: float | None,
            max_rank: int | None, include: str | None, exclude: str, oversample: int, n_iter: int, seed: int,
            to_format: str, dtype: str, as_json: bool, quiet: bool, dry_run: bool, device: str) -> None:
    """Extract a LoRA from FINETUNED − BASE, streamed tensor by tensor, with a randomized SVD; reports each
    module's relative error."""
    from lorakit.errors import OperatorParameterError
    from lorakit.ops.rank_rules import rank_rule
    from lorakit.verbs.extract import extract_file

    from .._options import run_options
    from .._output import emit

    rule = rank_rule(rank=rank, energy=energy, error=error)
    if rule is None:
        raise OperatorParameterError("give --rank, --energy or --error", parameter="rank")
    report = extract_file(base, finetuned, output, rule, include=include, exclude=exclude or None,
                          oversample=oversample, n_iter=n_iter, max_rank=max_rank, to_format=to_format,
                          run=run_options(device, dtype, seed), dry_run=dry_run)
    emit(report, as_json=as_json, quiet=quiet, max_rows=40)
