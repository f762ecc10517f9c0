"""``lorakit similarity``: load every input, compute the factored Gram matrices, report cosines and norms."""

from __future__ import annotations

from collections.abc import Sequence

from lorakit.errors import IncompatibleAdaptersError
from lorakit.ops.similarity import similarity
from lorakit.report import Report
from lorakit.run import RunOptions, run_options
from lorakit.verbs.store import load


def similarity_report(paths: Sequence[str], *, per_module: bool = False, allow_pickle: bool = False,
                      run: RunOptions | None = None) -> Report:
    """The ``lorakit similarity`` report: the cosine matrix, norms and norm ratios (and per module on request)."""
    if len(paths) < 2:
        raise IncompatibleAdaptersError("give at least two adapters to compare")
    sim = similarity([load(p, allow_pickle=allow_pickle) for p in paths], [str(p) for p in paths],
                     device=run_options(run).device)
    labels = [f"#{i}" for i in range(len(paths))]
    cos, norms = sim.cosine(), sim.norms()
    report = Report(f"cosine similarity over {len(sim.modules)} common modules",
                    ["adapter", "‖ΔW‖_F", *labels])
    for i, p in enumerate(paths):
        report.add_row(f"{labels[i]} {p}", float(norms[i]), *[round(float(c), 6) for c in cos[i]])
    ratio = sim.norm_ratio()
    report.summary = {"norm_ratio_to_first": [round(float(ratio[i, 0]), 6) for i in range(len(paths))]}
    if per_module:
        report.columns = ["module", "cosine #0·#1", *[f"‖{lb}‖" for lb in labels]]
        overall = report.rows
        report.rows = [[m, float(sim.cosine(m)[0, 1]), *[float(x) for x in sim.norms(m)]] for m in sim.modules]
        report.summary["overall_cosine"] = [[r[0], *r[2:]] for r in overall]
    return report
