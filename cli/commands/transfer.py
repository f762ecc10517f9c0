"""``lorakit transfer``: move an adapter to a new base model (Trans-LoRA distillation, or subspace projection)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import click

from .._options import device_option, dry_run_option, json_option, quiet_option, run_options


@click.group(epilog="""\b
Examples:
  lorakit transfer prepare my-lora/ --base ./llama-small --data task.jsonl --seeds 5 -o my-lora-kit/
  lorakit transfer run my-lora-kit/ --source-base ./llama-small --target-base ./gemma-small -o moved/
  lorakit transfer project my-lora/ --source-base ./llama-v1 --target-base ./llama-v1.1 -o projected/
""")
def command() -> None:
    """Move a LoRA to another base model: `prepare` a transfer kit while the task data exists, `run` the
    synthetic-data distillation later; or `project` it without training between same-shape bases."""


def _bars(quiet: bool) -> Any:
    """A ``progress(stage, done, total)`` callback drawing one rich bar per stage on stderr."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .._output import stderr

    if quiet or not stderr.is_terminal:
        return None, lambda stage, done, total: None
    bar = Progress(TextColumn("{task.description:>9}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=stderr)
    tasks: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    return bar, update


def _train_config(epochs: int, rank: int, lr: float, seed: int, targets: tuple[str, ...]) -> Any:
    from lorakit.transfer.train import TrainConfig

    return TrainConfig(rank=rank, alpha=2.0 * rank, epochs=epochs, lr=lr, seed=seed, target_modules=list(targets))


@command.command(epilog="""\b
Examples:
  lorakit transfer prepare my-lora/ --base ./src-model --data task.jsonl -o kit/
  lorakit transfer prepare my-lora/ --base org/model --data task.jsonl --seeds-file seeds.jsonl --task "math word problems" -o kit/
""")
@click.argument("adapter")
@click.option("--base", required=True, help="The source base model the adapter was trained on (path or Hub id).")
@click.option("--data", required=True, type=click.Path(), help='Task data, jsonl lines {"input": ..., "output": ...}.')
@click.option("--seeds", default=5, show_default=True, help="Number of seed examples kept in the kit.")
@click.option("--seeds-file", type=click.Path(), default=None, help="Take the seeds from this jsonl file.")
@click.option("--task", default=None, help="Short task descriptor for the discriminator (default: the data file name).")
@click.option("--negatives", default=128, show_default=True, help="Source-generated inputs the discriminator rejects.")
@click.option("--epochs", default=3, show_default=True, help="Discriminator training epochs.")
@click.option("--recall", default=0.9, show_default=True, type=click.FloatRange(0, 1),
              help="Lower the accept threshold until this share of held-out real inputs passes (0: p(yes) > p(no)).")
@click.option("--seed", default=0, show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(), help="The kit directory to write.")
@device_option
@json_option
@quiet_option
@dry_run_option
def prepare(adapter: str, base: str, data: str, seeds: int, seeds_file: str | None, task: str | None,
            negatives: int, epochs: int, recall: float, seed: int, output: str, device: str, as_json: bool,
            quiet: bool, dry_run: bool) -> None:
    """Build a transfer kit (seeds, task descriptor, discriminator LoRA) while the task data still exists."""
    from lorakit.report import Report
    from lorakit.transfer import pipeline
    from lorakit.transfer.kit import read_examples

    from .._output import emit

    if dry_run:
        n = len(read_examples(data))
        emit(Report(f"write a kit to {output}: {seeds} seeds of {n} examples, {negatives} negatives from "
                    f"{base}, {epochs} discriminator epochs").finish(output=output, dry_run=True),
             as_json=as_json, quiet=quiet)
        return
    bar, update = _bars(quiet)
    cfg = _train_config(epochs, 8, 2e-3, seed, ())
    with bar or nullcontext():
        rep = pipeline.prepare(adapter, base, data, output, seeds=seeds, seeds_file=seeds_file, task=task,
                               negatives=negatives, disc_config=cfg, run=run_options(device), seed=seed, recall=recall,
                               progress=update)
    emit(rep, as_json=as_json, quiet=quiet)


@command.command(epilog="""\b
Examples:
  lorakit transfer run kit/ --source-base ./src-model --target-base ./tgt-model -o out/ --samples 250
  lorakit transfer run kit/ --source-base ./src --target-base ./tgt -o out/ --target-modules q_proj --target-modules v_proj
""")
@click.argument("kit")
@click.option("--source-base", required=True, help="The base the kit was prepared with (checked by fingerprint).")
@click.option("--target-base", required=True, help="The new base model (path or Hub id).")
@click.option("--samples", default=250, show_default=True, help="N: accepted synthetic inputs to distil on.")
@click.option("--generator", multiple=True,
              help="Model writing the synthetic inputs: target, source or a path/Hub id; repeat to take turns by "
                   "round (default: target and source; Trans-LoRA's is target alone).")
@click.option("--no-filter", is_flag=True, help="Keep every generated input (ablation; not recommended).")
@click.option("--token-kl", is_flag=True, help="Token-level KL distillation (source and target share a tokenizer).")
@click.option("--target-modules", multiple=True, help="Module name suffixes on the target (default: all linear).")
@click.option("--rank", default=8, show_default=True, help="Rank of the new LoRA.")
@click.option("--epochs", default=5, show_default=True)
@click.option("--lr", default=2e-3, show_default=True)
@click.option("--max-rounds", default=200, show_default=True, help="Give up after this many generation rounds.")
@click.option("--seed", default=0, show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(), help="Run directory (resumable); adapter in OUT/adapter.")
@device_option
@json_option
@quiet_option
@dry_run_option
def run(kit: str, source_base: str, target_base: str, samples: int, generator: tuple[str, ...], no_filter: bool,
        token_kl: bool, target_modules: tuple[str, ...], rank: int, epochs: int, lr: float, max_rounds: int,
        seed: int, output: str, device: str, as_json: bool, quiet: bool, dry_run: bool) -> None:
    """Generate, filter, teach and distil: a new LoRA for the target base. Re-run the same command to resume."""
    from lorakit.report import Report
    from lorakit.transfer import pipeline
    from lorakit.transfer.kit import Kit

    from .._output import emit

    k = Kit.load(kit)
    if dry_run:
        emit(Report(f"transfer {k.task!r} ({len(k.seeds)} seeds) from {source_base} to {target_base}: "
                    f"{samples} {'unfiltered' if no_filter else 'filtered'} synthetic inputs, "
                    f"{'token-level KL' if token_kl else 'sequence-level'} distillation into {Path(output) / 'adapter'}")
             .finish(output=Path(output) / "adapter", dry_run=True), as_json=as_json, quiet=quiet)
        return
    bar, update = _bars(quiet)
    with bar or nullcontext():
        rep = pipeline.run(kit, source_base, target_base, output, samples=samples, generator=generator or None,
                           use_filter=not no_filter, token_kl=token_kl,
                           student_config=_train_config(epochs, rank, lr, seed, target_modules),
                           max_rounds=max_rounds, run=run_options(device), seed=seed, progress=update)
    emit(rep, as_json=as_json, quiet=quiet)


@command.command(epilog="""\b
Examples:
  lorakit transfer project my-lora/ --source-base ./base-v1 --target-base ./base-v1.1 -o moved/
  lorakit transfer project my-lora/ --source-base ./a --target-base ./b --q 0.25 --min-similarity 0.8 --dry-run
""")
@click.argument("adapter")
@click.option("--source-base", required=True)
@click.option("--target-base", required=True)
@click.option("--q", "q", default="0.5", show_default=True,
              help="Subspace rank: an integer, or a fraction of min(out, in) per module.")
@click.option("--no-null-space", is_flag=True, help="Keep only the principal-subspace part (drops ΔW's rest).")
@click.option("--min-similarity", default=0.0, show_default=True, help="Skip modules whose subspace similarity is lower.")
@click.option("-o", "--output", type=click.Path(), default=None, help="Output adapter (required unless --dry-run).")
@device_option
@json_option
@quiet_option
@dry_run_option
def project(adapter: str, source_base: str, target_base: str, q: str, no_null_space: bool, min_similarity: float,
            output: str | None, device: str, as_json: bool, quiet: bool, dry_run: bool) -> None:
    """Training-free transfer between same-shape bases by subspace projection, with a per-module report."""
    from lorakit.errors import LorakitError
    from lorakit.transfer import pipeline

    from .._output import emit

    try:
        qv: int | float = int(q) if q.isdigit() else float(q)
    except ValueError:
        raise click.BadParameter(f"{q!r} is neither an integer nor a fraction", param_hint="--q") from None
    if isinstance(qv, float) and not 0 < qv <= 1:
        raise click.BadParameter("a fractional q must lie in (0, 1]", param_hint="--q")
    if output is None and not dry_run:
        raise LorakitError("no output given", hint="pass -o OUTPUT, or --dry-run for the report only")
    rep = pipeline.project(adapter, source_base, target_base, None if dry_run else output, q=qv,
                           null_space=not no_null_space, min_similarity=min_similarity, run=run_options(device))
    emit(rep, as_json=as_json, quiet=quiet)
