"""``lorakit resize IN -o OUT``: shrink (or zero-pad) an adapter's ranks, exactly optimal, from the factors."""

from __future__ import annotations

import click

from .._options import allow_pickle_option, common_output, device_option

SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


def parse_count(value: str | None) -> int | None:
    """``20M`` → 20_000_000, ``1.5k`` → 1500, ``12345`` → 12345."""
    if value is None:
        return None
    v = value.strip().lower().replace("_", "").replace(",", "")
    mult = SUFFIXES.get(v[-1:], 1)
    try:
        n = float(v[:-1] if v[-1:] in SUFFIXES else v) * mult
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a parameter count (e.g. 20M, 1.5k, 12345)") from None
    if n <= 0:
        raise click.BadParameter(f"{value!r} must be positive")
    return int(n)


@click.command(epilog="""\b
Examples:
  lorakit resize big.safetensors --rank 16 -o small.safetensors
  lorakit resize big/ --energy 0.99 -o small/            # keep 99% of Σσ² per module
  lorakit resize big/ --error 0.05 -o small/             # ≤ 5% relative Frobenius error per module
  lorakit resize big/ --budget 20M -o small/             # 20M parameters, allocated by the spectra
  lorakit resize big.safetensors --sv-ratio 20 --to kohya -o small.safetensors
  lorakit resize r8/ --rank 32 --expand -o r32/          # zero-pad to rank 32 (ΔW unchanged)
""")
@click.argument("adapter")
@click.option("--rank", type=int, default=None, help="Keep rank K in every module (K ≤ min(out, in)).")
@click.option("--energy", type=float, default=None, help="Keep the smallest rank with Σσ² ≥ E·total, E in (0, 1].")
@click.option("--sv-ratio", type=float, default=None, help="Keep σ ≥ σ₁/T (kohya's sv_ratio), T > 1.")
@click.option("--sv-cumulative", type=float, default=None, help="Keep the smallest rank with Σσ ≥ T·Σσ (kohya).")
@click.option("--error", type=float, default=None, help="Relative Frobenius error per module ≤ E, E in [0, 1).")
@click.option("--budget", default=None, help="Total parameters (e.g. 20M), allocated greedily by σ² per parameter.")
@click.option("--expand", is_flag=True, help="With --rank: zero-pad modules below K up to K (ΔW unchanged).")
@common_output
@device_option
@allow_pickle_option
def command(adapter: str, rank: int | None, energy: float | None, sv_ratio: float | None,
            sv_cumulative: float | None, error: float | None, budget: str | None, expand: bool, output: str,
            to_format: str | None, dtype: str, as_json: bool, quiet: bool, dry_run: bool, device: str,
            allow_pickle: bool) -> None:
    """Resize an adapter: exact SVD of each module from its factors (no dense ΔW), optimal truncation,
    per-module report of rank in/out, energy kept and relative error."""
    from lorakit.ops.rank_rules import rank_rule
    from lorakit.verbs.resize import resize_file
    from lorakit.verbs.store import resolve

    from .._options import run_options
    from .._output import emit

    rule = rank_rule(rank=rank, energy=energy, sv_ratio=sv_ratio, sv_cumulative=sv_cumulative, error=error)
    src = resolve(adapter, allow_pickle=allow_pickle)
    report = resize_file(src, output, rule, budget=parse_count(budget), expand=expand, to_format=to_format,
                         run=run_options(device, dtype), dry_run=dry_run, allow_pickle=allow_pickle)
    emit(report, as_json=as_json, quiet=quiet, max_rows=40)
