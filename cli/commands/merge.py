"""``lorakit merge IN... -o OUT``: combine adapters exactly (``cat``), by the best rank-K approximation
(``svd``), or by a delta-space method (TIES, DARE, ...), with a per-module error report."""

from __future__ import annotations

from typing import Literal

import click

from .._options import (
    allow_pickle_option,
    device_option,
    dry_run_option,
    dtype_option,
    json_option,
    quiet_option,
    to_option,
)


def _weights(value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(x) for x in value.replace(",", " ").split()]
    except ValueError as e:
        raise click.BadParameter(f"weights must be numbers separated by commas, got {value!r}") from e


def _params(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for p in pairs:
        if "=" not in p:
            raise click.BadParameter(f"--param takes NAME=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        out[k.strip().replace("-", "_")] = v.strip()
    return out


@click.command(epilog="""\b
Examples:
  lorakit merge a.safetensors b.safetensors -o ab.safetensors            # exact: ΔW_a + ΔW_b, rank r_a + r_b
  lorakit merge a b --weights 0.7,0.3 --method svd --rank 16 -o m.safetensors
  lorakit merge a b c --method ties --density 0.3 --rank 32 --seed 0 -o m.safetensors
  lorakit merge a b --method knots --param inner=ties --density 0.5 -o m/ --to peft
  lorakit merge a b --dry-run                                            # plan, compatibility, cost
  lorakit merge --list-methods
""")
@click.argument("inputs", nargs=-1)
@click.option("-o", "--output", type=click.Path(), default=None, help="Output file or directory (atomic).")
@click.option("-m", "--method", default="cat", show_default=True, help="Merge method (see --list-methods).")
@click.option("-w", "--weights", default=None, help="One weight per input, comma-separated (default: 1 each).")
@click.option("--rank", type=int, default=None, help="Output rank K (svd and delta methods; default: max input rank).")
@click.option("--energy", type=float, default=None, help="Keep the smallest rank with this share of Σσ².")
@click.option("--error", type=float, default=None, help="Keep the smallest rank with relative error ≤ this.")
@click.option("--density", type=float, default=None, help="Fraction kept by TIES/DARE/DELLA/breadcrumbs, in (0, 1].")
@click.option("--lam", type=float, default=None, help="Global factor λ applied to the merged task vector.")
@click.option("--seed", type=int, default=None, help="Seed of random masks and the randomized SVD.")
@click.option("--param", "extra", multiple=True, metavar="NAME=VALUE",
              help="Any other method parameter (epsilon, gamma, inner...).")
@click.option("--union", "module_set", flag_value="union", help="Merge every module, from the inputs that have it.")
@click.option("--intersection", "module_set", flag_value="intersection", help="Merge only modules in every input.")
@click.option("--list-methods", is_flag=True, help="List the merge methods and exit.")
@to_option
@dtype_option
@device_option
@dry_run_option
@json_option
@quiet_option
@allow_pickle_option
def command(inputs: tuple[str, ...], output: str | None, method: str, weights: str | None, rank: int | None,
            energy: float | None, error: float | None, density: float | None, lam: float | None, seed: int | None,
            extra: tuple[str, ...], module_set: Literal["union", "intersection"] | None, list_methods: bool, to_format: str | None, dtype: str,
            device: str, dry_run: bool, as_json: bool, quiet: bool, allow_pickle: bool) -> None:
    """Merge adapters into one, exactly where the math allows, reporting every loss per module."""
    from .._options import run_options
    from .._output import emit

    if list_methods:
        from lorakit.ops.registry import available
        from lorakit.report import Report

        report = Report("merge methods", ["method", "exact", "space", "parameters", "description"])
        for s in available("merge"):
            shown = [p for p in s.params if p not in ("module", "rank_rule")]
            if "rank_rule" in s.params:
                shown.append("rank|energy|error")
            report.add_row(s.name, "yes" if s.exact else "no", s.space, ", ".join(shown) or "-", s.description)
        emit(report, as_json=as_json, quiet=quiet)
        return
    if not inputs:
        raise click.UsageError("give at least one adapter to merge (or --list-methods)")
    if output is None and not dry_run:
        raise click.UsageError("missing -o/--output (or use --dry-run)")
    from lorakit.pipeline import merge

    params = {"density": density, "lam": lam, "seed": seed, **_params(extra)}
    report = merge(list(inputs), output, weights=_weights(weights), method=method, params=params, rank=rank,
                   energy=energy, error=error, module_set=module_set or "exact", to_format=to_format,
                   run=run_options(device, dtype), dry_run=dry_run, allow_pickle=allow_pickle)
    emit(report, as_json=as_json, quiet=quiet, max_rows=40)
