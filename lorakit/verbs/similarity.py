"""``lorakit similarity``: open every input lazily, check the common modules' shapes from the headers, stream
the modules through the engine (each module's factors from all inputs read ahead, its Gram matrix computed by
:func:`lorakit.ops.similarity.module_gram`), report cosines and norms."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorakit.adapter import Adapter
from lorakit.errors import IncompatibleAdaptersError
from lorakit.factors import LoraFactors
from lorakit.ops.similarity import Similarity, module_gram
from lorakit.report import Report
from lorakit.run import RunOptions, run_options
from lorakit.verbs.engine import ModuleStream
from lorakit.verbs.store import load


def similarity(adapters: Sequence[Adapter], names: Sequence[str] | None = None, *,
               device: str | torch.device = "cpu") -> Similarity:
    """Cosines and norms of ``adapters`` (lazy or in memory) over their common modules, streamed module by module.

    Plan from the headers: the common modules (in the first adapter's order), each with one shape in every
    input. Then a :class:`~lorakit.verbs.engine.ModuleStream` over them, one module at a time (the Gram has no
    batched path): the background thread reads the next module's factors from every input while the current
    one's Gram (:func:`~lorakit.ops.similarity.module_gram`) is computed on ``device``. Memory: the factors of
    two modules from every input; cost: ``n(n+1)/2`` factored inner products per module.

    Raises:
        IncompatibleAdaptersError: no module in common, or a common module with different shapes (named; nothing
            is read before it is found).
    """
    from lorakit.device import factors_to

    names = list(names or [f"#{i}" for i in range(len(adapters))])
    common = [m for m in adapters[0] if all(m in a for a in adapters[1:])]
    if not common:
        raise IncompatibleAdaptersError("the adapters have no module in common",
                                        hint="compare adapters for the same base model and target modules")
    for m in common:
        shapes = {a.info(m).shape for a in adapters}
        if len(shapes) > 1:
            raise IncompatibleAdaptersError(f"shapes differ: {sorted(shapes)} (adapters for different base models?)",
                                            module=m, hint="compare adapters trained on the same base model")

    def read(m: str) -> list[LoraFactors]:
        return [a[m] for a in adapters]

    def work(window: list[str], inputs) -> dict[str, torch.Tensor]:
        m = window[0]  # one module at a time
        return {m: module_gram([factors_to(f, device) for f in inputs(m)])}

    stream = ModuleStream(common, read, work,
                          nbytes=lambda m: sum(a.info(m).num_params for a in adapters) * 4)
    n = len(adapters)
    gram = torch.zeros(n, n, dtype=torch.float64)
    per: dict[str, torch.Tensor] = {}
    for m, g in stream:
        per[m] = g
        gram += g
    return Similarity(names, common, gram, per)


def cosine(a: Adapter, b: Adapter) -> float:
    """Overall cosine similarity of two adapters (:func:`similarity` over their common modules)."""
    return float(similarity([a, b]).cosine()[0, 1])


def similarity_report(paths: Sequence[str], *, per_module: bool = False, allow_pickle: bool = False,
                      run: RunOptions | None = None) -> Report:
    """The ``lorakit similarity`` report: the cosine matrix, norms and norm ratios (and per module on request)."""
    if len(paths) < 2:
        raise IncompatibleAdaptersError("give at least two adapters to compare",
                                        hint="lorakit similarity A B [C ...]; `lorakit inspect` describes one adapter")
    adapters = [load(p, allow_pickle=allow_pickle) for p in paths]
    sim = similarity(adapters, [str(p) for p in paths], device=run_options(run).device)
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
    return report.finish(inputs=adapters)


__all__ = ["cosine", "similarity", "similarity_report"]
