"""Rank surgery: shrink (or zero-pad) every module of an adapter, exactly optimal, without dense ΔW.

Per module, the exact spectrum of ``s·B @ A`` comes from the QR core (:func:`lorakit.linalg.adapter_cores`:
batched over same-shaped modules in windows of 512 MiB on CUDA, one module at a time on CPU), the
kept rank ``k`` is chosen by one rule (:func:`planned_ranks`, before any singular vector is formed, so the output
streams to disk one module at a time: :func:`lorakit.verbs.resize.resize_stream`), and only the ``k`` kept
singular vectors are formed (:func:`resize_modules`):

- a :class:`~lorakit.ops.rank_rules.RankRule` per module (``--rank``, ``--energy``, ``--sv-ratio``,
  ``--sv-cumulative``, ``--error``), or
- a global parameter ``budget``: every module starts at rank 1, then singular directions are added greedily in
  order of ``σ_j² / (out + in)`` (energy bought per parameter) while they fit. Within a module that ratio falls
  with ``j``, so each module keeps a prefix of its spectrum.

The result is the rank-``k`` Eckart–Young truncation in canonical form (``B = U√Σ``, ``A = √Σ Vᵀ``, scale 1),
whose relative error ``sqrt(Σ_{j>k} σ_j² / Σ σ_j²)`` is the optimum at rank ``k``; it is reported per module.
Cost: O((out + in)·r² + r³) per module; memory O((out + in)·r) per module in flight.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from lorakit.adapter import Adapter, ModuleInfo
from lorakit.errors import OperatorParameterError
from lorakit.factors import LoraFactors
from lorakit.linalg import SVD, adapter_cores, check_rank, group_by_shape
from lorakit.ops.rank_rules import RankRule
from lorakit.report import Report


@dataclass(frozen=True)
class ModuleResize:
    """What resizing did to one module."""

    name: str
    rank_in: int
    rank_out: int
    energy_kept: float  # Σ_{j≤k} σ_j² / Σ σ_j²
    rel_error: float  # ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F (optimal at rank k)
    params_in: int
    params_out: int
    norm: float  # ‖ΔW‖_F


def _check_rule(rule: RankRule | None, budget: int | None, infos: dict[str, ModuleInfo], expand: bool) -> None:
    """Header-only validation, before any tensor is read."""
    if (rule is None) == (budget is None):
        raise OperatorParameterError("give exactly one of a rank rule (--rank, --energy, ...) or --budget",
                                     parameter="rank")
    if budget is not None:
        floor = sum(i.out_features + i.in_features for i in infos.values())
        if budget < floor:
            raise OperatorParameterError(
                f"budget {budget:,} parameters is too small: rank 1 everywhere needs {floor:,}",
                parameter="budget", hint=f"use --budget {floor} or more",
            )
    if rule is not None and rule.kind == "rank":
        for name, i in infos.items():
            check_rank(int(rule.value), i.shape, module=name)
    if expand and (rule is None or rule.kind != "rank"):
        raise OperatorParameterError("--expand (zero padding) needs a fixed --rank", parameter="expand")


def allocate_budget(spectra: dict[str, torch.Tensor], costs: dict[str, int], budget: int) -> dict[str, int]:
    """Ranks under a global parameter budget, greedily on ``σ_j² / cost`` (every module gets at least 1).

    Args:
        spectra: module → singular values (descending).
        costs: module → parameters per rank (``out + in``).
        budget: total parameters allowed (≥ Σ costs).
    """
    ranks = {n: min(1, int(S.numel())) for n, S in spectra.items()}
    left = budget - sum(costs[n] * ranks[n] for n in spectra)
    if left < 0:
        raise OperatorParameterError(f"budget {budget:,} is too small for rank 1 everywhere", parameter="budget")
    cand: list[tuple[float, str, int]] = []
    for n, S in spectra.items():
        s2 = S.double() ** 2 / costs[n]
        cand.extend((float(v), n, j) for j, v in enumerate(s2.tolist()) if j >= 1 and v > 0)
    cand.sort(key=lambda t: -t[0])
    for _, n, j in cand:
        # Per module the ratio falls with j, so a direction that does not fit means no later one of it fits.
        if ranks[n] == j and costs[n] <= left:
            ranks[n] = j + 1
            left -= costs[n]
    return ranks


def truncated_factors(svd: SVD, k: int, like: LoraFactors, *, expand_to: int | None = None) -> LoraFactors:
    """Rank-``k`` canonical factors of ``svd`` in ``like``'s dtype and layer kind; zero-padded to ``expand_to``."""
    f = svd.truncate(k).to_factors()
    A, B = f.A, f.B
    if expand_to is not None and expand_to > A.shape[0]:
        pad = expand_to - A.shape[0]
        A = torch.cat([A, A.new_zeros(pad, A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1)
    # the input's device and dtype: results come back from the device
    home_A = A.to(device=like.A.device, dtype=like.dtype)
    home_B = B.to(device=like.A.device, dtype=like.dtype)
    return LoraFactors(home_A.contiguous(), home_B.contiguous(), 1.0, like.kernel, like.kind,
                       like.magnitude, like.extras)


def needs_spectra(rule: RankRule | None) -> bool:
    """Whether :func:`planned_ranks` needs the modules' spectra: for every rule but ``--rank K`` (headers
    suffice), and for a budget (``rule`` ``None``)."""
    return rule is None or rule.kind != "rank"


def planned_ranks(infos: Mapping[str, ModuleInfo], rule: RankRule | None, budget: int | None,
                  spectra: Mapping[str, torch.Tensor] | None = None) -> dict[str, int]:
    """The rank each module keeps, before any singular vector is formed.

    ``--rank K`` needs only the headers (``min(K, out, in, r)``); any other rule, or a ``budget``, needs
    ``spectra`` (module → singular values, descending: the QR R-factors and singular values, no singular
    vectors, about half the work of the resize itself; the resize verb streams them,
    :func:`lorakit.verbs.inspect.spectra`).
    """
    if not needs_spectra(rule):
        assert rule is not None
        return {n: min(int(rule.value), i.out_features, i.in_features, i.rank) for n, i in infos.items()}
    if spectra is None:
        raise ValueError(f"planned_ranks: {'a budget' if rule is None else rule} needs the modules' spectra")
    if budget is not None:
        # in shape-group order (the order the spectra were always computed in): the greedy allocation breaks
        # exact ties between modules by it
        order = [n for group in group_by_shape(infos).values() for n in group]
        return allocate_budget({n: spectra[n] for n in order},
                               {n: i.out_features + i.in_features for n, i in infos.items()}, budget)
    assert rule is not None
    return {n: rule.select(spectra[n]) for n in infos}


def resize_modules(adapter: Adapter, names: Sequence[str], ranks: Mapping[str, int], *, pad: int | None = None,
                   device: torch.device | str = "cpu") -> Iterator[tuple[str, LoraFactors, ModuleResize]]:
    """Each of ``names`` truncated to its rank in ``ranks`` (zero-padded to ``pad``), with what that did.

    One batched QR core per group of same-shaped modules (:func:`~lorakit.linalg.adapter_cores` on ``device``),
    then only the ``k`` kept singular vectors (:func:`truncated_factors`, in the input's dtype). Yielded grouped
    by shape, one module at a time. The loop over an adapter's modules (windows, read-ahead) is the verb's:
    :func:`lorakit.verbs.resize.resize_stream`.
    """
    infos = adapter.infos()
    for n, core, original in adapter_cores(adapter, names, device=device):
        k = ranks[n]
        out = truncated_factors(core.leading(k), k, original, expand_to=pad)
        info = infos[n]
        s2 = core.S.double() ** 2
        total, kept = float(s2.sum()), float(s2[:k].sum())
        yield n, out, ModuleResize(
            n, info.rank, out.rank, kept / total if total > 0 else 1.0,
            math.sqrt(max(total - kept, 0.0) / total) if total > 0 else 0.0,
            info.num_params, out.num_params, math.sqrt(total),
        )


def resize_report(rows: list[ModuleResize], title: str) -> Report:
    """Per-module rank in/out, energy kept and relative error; totals and parameter counts."""
    report = Report(title=title, columns=["module", "rank in", "rank out", "energy kept", "rel error"])
    for r in rows:
        report.add_row(r.name, r.rank_in, r.rank_out, r.energy_kept, r.rel_error)
    total = sum(r.norm**2 for r in rows)
    lost = sum((r.rel_error * r.norm) ** 2 for r in rows)
    p_in, p_out = sum(r.params_in for r in rows), sum(r.params_out for r in rows)
    report.summary = {
        "module_count": len(rows),
        "parameters_before": p_in,
        "parameters_after": p_out,
        "parameter_ratio": p_out / p_in if p_in else 1.0,
        "energy_kept": 1.0 - lost / total if total > 0 else 1.0,
        "rel_error_total": math.sqrt(lost / total) if total > 0 else 0.0,
        "rel_error_max": max((r.rel_error for r in rows), default=0.0),
        "ranks_out": f"{min(r.rank_out for r in rows)}..{max(r.rank_out for r in rows)}" if rows else "-",
    }
    return report


