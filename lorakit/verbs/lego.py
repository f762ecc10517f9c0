"""LoRA-LEGO over whole adapters: check the module sets from the headers, pool and cluster the modules a window at
a time (one batched k-means per group of same-sized modules), and return the merged adapter with its provenance.

The per-module math (units, gauges, k-means, centroids, reweighting) is :mod:`lorakit.ops.lego`; this verb owns
the walk over modules and what is recorded. ``lorakit merge --method lego`` runs the same operator through the
merge pipeline; this is the Python API that also returns every module's cluster assignment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from lorakit.adapter import Adapter, AdapterMeta
from lorakit.errors import IncompatibleAdaptersError, OperatorParameterError, RankError, ShapeMismatchError
from lorakit.factors import LoraFactors
from lorakit.ops.kmeans import kmeans_gram
from lorakit.ops.lego import Gauge, LegoAssignment, _check, _finish, _prepare, _Prepared
from lorakit.ops.rank_rules import RankRule
from lorakit.ops.rank_rules import rank_rule as make_rank_rule
from lorakit.provenance import make_provenance
from lorakit.verbs.engine import ModuleStream


def check_compatible(adapters: Sequence[Adapter]) -> list[str]:
    """The common module names, checked from headers only: same module sets and same shapes."""
    if not adapters:
        raise OperatorParameterError("LEGO needs at least one input adapter", operator="lego")
    names = list(adapters[0])
    for j, a in enumerate(adapters[1:], start=1):
        if set(a) != set(names):
            missing = sorted(set(names) - set(a))[:3]
            extra = sorted(set(a) - set(names))[:3]
            raise IncompatibleAdaptersError(
                f"module sets differ between input 0 and input {j} (missing {missing}, unexpected {extra})",
                file=a.meta.source_path, missing=missing, unexpected=extra,
            )
        for n in names:
            if a.info(n).shape != adapters[0].info(n).shape:
                raise ShapeMismatchError(
                    f"shapes differ: {adapters[0].info(n).shape} vs {a.info(n).shape} (different base models?)",
                    file=a.meta.source_path, module=n,
                )
    return names


def lego_merge(
    adapters: Sequence[Adapter],
    weights: Sequence[float] | None = None,
    *,
    k: int | Mapping[str, int] | None = None,
    rank_rule: RankRule | None = None,
    gauge: Gauge = "raw",
    param_reweight: bool = True,
    output_reweight: bool = True,
    output_scale: float | None = None,
    seed: int = 0,
    restarts: int = 8,
    max_iter: int = 100,
    device: str | torch.device | None = None,
    window_bytes: int = 256 << 20,
) -> tuple[Adapter, dict[str, LegoAssignment]]:
    """Merge ``adapters`` with LoRA-LEGO, module by module; returns the merged adapter and, per module, the
    :class:`LegoAssignment` (cluster of every unit, sizes, errors).

    Args:
        adapters: one or more adapters over the same module set (one adapter re-clusters its own units: with
            κ < r it is a rank reduction).
        weights: per-adapter weights folded into the units (default 1 each).
        k: clusters per module — one int for every module, or a mapping module → κ. Exclusive with ``rank_rule``
            (e.g. ``rank_rule(energy=0.9)``). Neither: κ = the largest input rank of the module.
        gauge, param_reweight, output_reweight, output_scale, seed, restarts, max_iter, device: see the module
            docstring and :func:`lego_module`; each module's result equals :func:`lego_module`'s.
        window_bytes: about how many bytes of pooled units are held at once; the modules of a window that have
            the same number of units and κ are clustered by one batched :func:`~lorakit.ops.kmeans.kmeans_gram`.

    Raises:
        IncompatibleAdaptersError / ShapeMismatchError: different module sets or shapes (checked before work).
        RankError: κ < 1 or κ above the number of units of a module.
    """
    names = check_compatible(adapters)
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise OperatorParameterError(f"{len(weights)} weights for {len(adapters)} adapters", operator="lego")
    if k is not None and rank_rule is not None:
        raise OperatorParameterError("give k or rank_rule, not both", parameter="k")
    if isinstance(k, Mapping) and set(k) != set(names):
        raise OperatorParameterError(
            f"k is given for {len(k)} modules, the adapters have {len(names)}", parameter="k"
        )
    for kv in (k.values() if isinstance(k, Mapping) else [k]):
        if kv is not None and (isinstance(kv, bool) or not isinstance(kv, int) or kv < 1):
            raise RankError(f"k must be a positive integer, got {kv!r}")
    dev = torch.device(device) if device is not None else None
    modules: dict[str, LoraFactors] = {}
    assignments: dict[str, LegoAssignment] = {}

    def unit_bytes(n: str) -> int:  # the pooled units of module n, in the compute dtype, from the headers
        infos = [a.info(n) for a in adapters]
        size = 8 if infos[0].dtype == torch.float64 else 4  # units are float32, or float64 for float64 inputs
        return sum(i.rank for i in infos) * (infos[0].out_features + infos[0].in_features) * size

    def prepared(window: list[str], inputs_of) -> dict[str, tuple[LoraFactors, LegoAssignment]]:
        pooled: dict[str, tuple[list[LoraFactors], _Prepared]] = {}
        for n in window:
            inputs = inputs_of(n)
            _check(inputs, weights, gauge, n)
            kn = k[n] if isinstance(k, Mapping) else k
            rule = make_rank_rule(rank=kn) if kn is not None else rank_rule
            p = _prepare(inputs, weights, rule, gauge, dev if dev is not None else inputs[0].A.device, n)
            pooled[n] = (inputs, p)
        groups: dict[tuple, list[str]] = {}
        for n, (_, p) in pooled.items():
            groups.setdefault((p.units.count, p.k, p.G.device), []).append(n)
        out: dict[str, tuple[LoraFactors, LegoAssignment]] = {}
        for (_, kk, _), group in groups.items():
            km = kmeans_gram(torch.stack([pooled[n][1].G for n in group]), kk, seed=seed, restarts=restarts,
                             max_iter=max_iter)
            for i, n in enumerate(group):
                inputs, p = pooled.pop(n)
                out[n] = _finish(
                    p, inputs, km.labels[i], km.mix[i], float(km.inertia[i]), param_reweight=param_reweight,
                    output_reweight=output_reweight, output_scale=output_scale,
                )
        return out

    # Modules are pooled a window at a time (about ``window_bytes`` of units held), and the modules of a window
    # with the same number of units and κ are clustered by one batched k-means.
    stream = ModuleStream(names, lambda n: [a[n] for a in adapters], prepared, nbytes=unit_bytes,
                          window_bytes=window_bytes)
    for n, (merged, assignment) in stream:
        modules[n], assignments[n] = merged, assignment
    params = {"k": k if not isinstance(k, Mapping) else "per-module",
              "rank_rule": str(rank_rule) if rank_rule else None, "gauge": gauge, "param_reweight": param_reweight,
              "output_reweight": output_reweight, "output_scale": output_scale, "seed": seed, "restarts": restarts,
              "weights": weights}
    src = [a.meta.source_path for a in adapters if a.meta.source_path]
    m0 = adapters[0].meta
    meta = AdapterMeta(base_model=m0.base_model, source_format=m0.source_format,
                       provenance=make_provenance("merge:lego", params, src))
    return Adapter(modules, meta), assignments


__all__ = ["check_compatible", "lego_merge"]
