"""Options shared by every verb, defined once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

F = Callable[..., Any]

output_option = click.option(
    "-o", "--output", required=True, type=click.Path(), help="Output file or directory (written atomically)."
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON report.")
quiet_option = click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
dry_run_option = click.option("--dry-run", is_flag=True, help="Print the plan from the headers; compute nothing.")
device_option = click.option(
    "--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda or cuda:N."
)
dtype_option = click.option(
    "--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16", "float64"]), default="auto",
    show_default=True, help="Output dtype; auto keeps the input's.",
)
to_option = click.option(
    "--to", "to_format", type=click.Choice(["peft", "kohya", "diffusers"]), default=None,
    help="Output format (default: the first input's).",
)
allow_pickle_option = click.option(
    "--allow-pickle", is_flag=True, help="Read .bin/.pt pickles (weights_only=True). Only for files you trust."
)

arch_option = click.option(
    "--arch", type=click.Choice(["sd1", "sd2", "sdxl", "flux"]), default=None,
    help="Architecture of a kohya/LyCORIS file, to map its stems to module names (default: detected).",
)
base_option = click.option(
    "--base", "base", type=click.Path(exists=True), default=None,
    help="Base model config (diffusers unet/ or transformer/ config.json, a model directory, or a transformers "
         "config.json) whose module names kohya stems are mapped to.",
)

max_rank_option = click.option(
    "--max-rank", type=click.IntRange(min=1), default=None,
    help="LoHa/LoKr inputs: truncate their exact LoRA form to this rank (the error is reported).",
)


def keymap_options(f: F) -> F:
    """``--arch`` and ``--base``: how kohya/LyCORIS stems become module names."""
    return arch_option(base_option(f))


def common_output(f: F) -> F:
    """``-o``, ``--to``, ``--dtype``, ``--json``, ``--quiet``, ``--dry-run``: what every producing verb takes."""
    for opt in reversed([output_option, to_option, dtype_option, json_option, quiet_option, dry_run_option]):
        f = opt(f)
    return f


def torch_dtype(name: str) -> Any:
    """``--dtype`` value → torch dtype (``None`` for ``auto``)."""
    import torch

    return None if name == "auto" else getattr(torch, name)


def run_options(device: str = "auto", dtype: str = "auto", seed: int | None = None) -> Any:
    """The command's :class:`~lorakit.run.RunOptions`, resolved once here (``--device cuda`` without a GPU
    fails before any file is read) and passed down to the verb."""
    from lorakit.run import RunOptions

    return RunOptions.resolve(device, dtype=torch_dtype(dtype), seed=seed)
