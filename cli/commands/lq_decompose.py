"""``lorakit lq-decompose BASE -o OUT --rank R --bits B`` (or ``--budget``): LQ-LoRA base decomposition."""

from __future__ import annotations

import click

from .._options import device_option, dry_run_option, json_option, output_option, quiet_option


@click.command(
    epilog="""\b
Examples:
  lorakit lq-decompose model.safetensors -o lq/ --rank 64 --bits 3
  lorakit lq-decompose model.safetensors -o lq/ --rank 64 --budget 2.75 --json
\b
OUT/residual.safetensors holds the quantized residual Q (other tensors unchanged);
OUT/adapter/ is a PEFT LoRA initialisation (lora_B = L1, lora_A = L2, scale 1).
"""
)
@click.argument("base")
@output_option
@click.option("--rank", type=int, required=True, help="Rank r of the low-rank part L1 @ L2.")
@click.option("--bits", type=int, default=None, help="Bits for every matrix: 2, 3, 4 or 8.")
@click.option(
    "--budget",
    type=float,
    default=None,
    help="Average bits per parameter of Q (constants included), allocated across matrices by an ILP.",
)
@click.option("--block", type=int, default=64, show_default=True, help="Block size with --bits.")
@click.option("--iters", type=int, default=20, show_default=True, help="Most alternations per matrix.")
@click.option(
    "--ilp-iters",
    type=int,
    default=2,
    show_default=True,
    help="Alternations per matrix and configuration when tabulating the ILP costs.",
)
@click.option("--include", default=None, help="Regex of tensors to decompose (default: 2-D *.weight).")
@click.option(
    "--exclude", default=r"(embed|lm_head|norm)", show_default=True, help="Regex of tensors to leave."
)
@click.option("--pad", is_flag=True, help="Pad rows that the block size does not divide (default: refuse).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVDs.")
@json_option
@quiet_option
@dry_run_option
@device_option
def command(
    base: str,
    output: str,
    rank: int,
    bits: int | None,
    budget: float | None,
    block: int,
    iters: int,
    ilp_iters: int,
    include: str | None,
    exclude: str,
    pad: bool,
    seed: int,
    as_json: bool,
    quiet: bool,
    dry_run: bool,
    device: str,
) -> None:
    """Decompose base weights into a quantized residual plus a rank-r LoRA initialisation (LQ-LoRA)."""
    from lorakit.verbs.lq_decompose import lq_decompose_file

    from .._options import run_options
    from .._output import emit, progress

    if bits is None and budget is None:
        bits = 4
    report = lq_decompose_file(
        base,
        output,
        rank=rank,
        bits=bits,
        budget=budget,
        block=block,
        iters=iters,
        ilp_iters=ilp_iters,
        include=include,
        exclude=exclude or None,
        pad=pad,
        dry_run=dry_run,
        run=run_options(device, seed=seed),
        progress=lambda items, total, desc: progress(items, total, desc, quiet=quiet or as_json),
    )
    emit(report, as_json=as_json, quiet=quiet, max_rows=40)
