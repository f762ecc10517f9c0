"""Per-module spectra of an adapter, exactly, from the factors: what ``lorakit inspect --spectrum`` shows.

For each module the singular values of ``s·B @ A`` come from the batched QR-core SVD
(:func:`lorakit.linalg.adapter_spectra`: σ of the small core only), O((out + in)·r² + r³) per module and no dense ΔW. Alongside them: the
Roy–Vetterli effective rank ``exp(H(σ/Σσ))`` and the ranks that keep 90% and 99% of ``Σσ²``.
"""

from __future__ import annotations

import torch

from lorakit.adapter import Adapter
from lorakit.linalg import adapter_spectra, effective_rank
from lorakit.ops.rank_rules import RankRule
from lorakit.report import Report

SHOWN = 4  # leading singular values shown in the table (JSON has all)


def spectra(adapter: Adapter, *, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Module → singular values of its ΔW (descending, float64, on CPU), in the adapter's order."""
    found = dict(adapter_spectra(adapter, device=device))
    return {n: found[n] for n in adapter}


def spectrum_report(adapter: Adapter, *, device: torch.device | str = "cpu", full: bool = False) -> Report:
    """One row per module: rank, effective rank, ranks for 90%/99% energy, σ₁…σ_4, σ_min; with ``full``
    (the JSON report) a last column holds every singular value."""
    e90, e99 = RankRule("energy", 0.9), RankRule("energy", 0.99)
    report = Report(
        title=f"spectrum of {adapter.meta.source_path or 'adapter'}",
        columns=["module", "rank", "eff. rank", "rank 90%", "rank 99%", "σ (leading)", "σ min"] + (["singular_values"] if full else []),
    )
    total_params = kept90 = 0
    for name, S in spectra(adapter, device=device).items():
        info = adapter.info(name)
        r90, r99 = e90.select(S), e99.select(S)
        values = [float(v) for v in S]
        lead = ", ".join(f"{v:.4g}" for v in values[:SHOWN])
        report.add_row(name, info.rank, round(effective_rank(S), 3), r90, r99, lead,
                       values[-1] if values else 0.0, *([values] if full else []))
        total_params += info.num_params
        kept90 += r90 * (info.out_features + info.in_features)
    report.summary = {
        "module_count": len(report.rows),
        "parameters": total_params,
        "parameters_at_90pct_energy": kept90,
    }
    return report
