"""The streaming merge pipeline: plan from headers, check compatibility, stream module by module, write, report.

1. **Plan** (:func:`plan_merge`): open every input lazily (headers and configs only), resolve the operator and
   validate its parameters, the weights and the rank rule, choose the module set (``exact``, ``union`` or
   ``intersection``) and check that every module has one shape across inputs. Nothing is computed, so a
   mismatch fails in milliseconds, and ``--dry-run`` prints this plan with a cost estimate.
2. **Run** (:func:`run_merge`): the merged adapter is lazy: each module is read from the inputs, checked for
   NaN/Inf, merged by the operator and cast to the output dtype when the writer asks for it, so peak memory is
   a few modules (plus, for delta-space methods, one dense ``out × in`` result). When the output ranks depend
   on the data (``--energy``/``--error``), modules are merged first and held (the output adapter's size).
3. **Report**: per module the input ranks, the output rank, the relative error against the method's exact
   target and the best error possible at that rank.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch

from lorakit.adapter import Adapter, ModuleInfo, merge_full_tensors
from lorakit.algebra import bias_sum
from lorakit.device import factors_to
from lorakit.errors import (
    IncompatibleAdaptersError,
    NumericalError,
    OperatorParameterError,
    ShapeMismatchError,
)
from lorakit.factors import LoraFactors
from lorakit.io.atomic import check_output_path
from lorakit.linalg import group_by_shape, widest_dtype
from lorakit.ops import _kernels
from lorakit.ops.rank_rules import RankRule, rank_rule
from lorakit.ops.registry import DEFAULT_MERGE, ENGINE_KEYWORDS, MergeResult, OperatorSpec, available, resolve
from lorakit.ops.scratch import Scratch
from lorakit.report import Report
from lorakit.run import RunOptions, run_options
from lorakit.threads import parallel_map, workers
from lorakit.verbs.engine import ModuleStream, Output, write_adapter
from lorakit.verbs.store import default_output_format, load

ModuleSet = Literal["exact", "union", "intersection"]


@dataclass
class MergePlan:
    """Everything decided before any tensor is read."""

    adapters: list[Adapter]
    labels: list[str]
    spec: OperatorSpec
    weights: list[float]
    params: dict[str, Any]
    rule: RankRule | None
    modules: list[str]
    present: dict[str, list[int]]  # module → indices of the inputs that have it
    infos: dict[str, ModuleInfo] | None  # output infos, when known before computing
    notes: list[str] = field(default_factory=list)

    def output_dtype(self, module: str, dtype: torch.dtype | None = None) -> torch.dtype:
        """The dtype a merged module is stored in: ``dtype`` if given, else its first input's."""
        return dtype or self.adapters[self.present[module][0]].info(module).dtype

    def compatibility(self) -> Report:
        """One row per input: format, base model, modules, ranks, scales, dtype, and module-set differences."""
        report = Report(title=f"merge {len(self.adapters)} adapters with {self.spec.name}, {len(self.modules)} modules",
                        columns=["input", "format", "base model", "modules", "ranks", "scales", "dtype", "weight",
                                 "missing", "extra"])
        wanted = set(self.modules)
        for label, a, w in zip(self.labels, self.adapters, self.weights):
            infos = a.infos().values()
            scales = sorted({round(i.scale, 6) for i in infos})
            report.add_row(Path(label).name, a.meta.source_format or "in-memory", a.meta.base_model, len(a), a.rank_summary(),
                           scales[0] if len(scales) == 1 else f"{scales[0]}..{scales[-1]}",
                           str(next(iter(infos)).dtype).replace("torch.", "") if len(a) else "-", w,
                           len(wanted - set(a)), len(set(a) - wanted))
        report.summary = {"method": self.spec.name, "parameters": _shown_params(self.params, self.rule),
                          **self.cost()}
        report.notes = list(self.notes)
        return report

    def cost(self) -> dict[str, Any]:
        """A rough cost estimate from the shapes: floating-point operations and peak working memory."""
        flops, peak = 0.0, 0
        n = len(self.adapters)
        for m in self.modules:
            i0 = self.adapters[self.present[m][0]].info(m)
            out, inn = i0.shape
            R = sum(self.adapters[i].info(m).rank for i in self.present[m])
            if not self.spec.factored:
                K = int(self.rule.value) if self.rule and self.rule.kind == "rank" else R
                # two passes form the task tiles (one counts for the thresholds, one merges), then four
                # products of the merged matrix with K + 10 columns (the first fused into the merge pass)
                flops += 2.0 * out * inn * (2 * R + 4 * (K + 10))
                # the merged M, and per tile: the formed stack, a float and two bool scratch stacks, 5 planes
                rows = _kernels.tile_rows(out, inn)
                peak = max(peak, 4 * out * inn + (8 * n + 2 * n + 20) * rows * inn)
            else:
                flops += 10.0 * (out + inn) * R * R + 20.0 * R**3
                peak = max(peak, 4 * 4 * (out + inn) * R)
        return {"estimated_gflop": flops / 1e9, "estimated_peak_working_mb": peak / 2**20}


def _shown_params(params: Mapping[str, Any], rule: RankRule | None) -> str:
    shown = {k: v for k, v in params.items() if k not in ENGINE_KEYWORDS}
    if rule is not None:
        shown["rank rule"] = str(rule)
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or "-"


def _names(operators: Sequence[OperatorSpec]) -> str:
    """``a, b or c``: registered operators named in a message, in registration order."""
    names = [s.name for s in operators]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)


def _linear_operators() -> list[OperatorSpec]:
    return [s for s in available("merge", sort=False) if s.linear]


def plan_merge(
    inputs: Sequence[str | Path | Adapter],
    weights: Sequence[float] | None = None,
    method: str = DEFAULT_MERGE,
    *,
    params: Mapping[str, Any] | None = None,
    rank: int | None = None,
    energy: float | None = None,
    error: float | None = None,
    module_set: ModuleSet = "exact",
    allow_pickle: bool = False,
) -> MergePlan:
    """Open the inputs lazily and decide everything: operator, parameters, weights, modules, output ranks.

    Raises:
        UnknownOperatorError: ``method`` is not registered (with the nearest name).
        OperatorParameterError: weights count ≠ inputs, a parameter out of range, a rank rule for an exact method.
        IncompatibleAdaptersError: module sets differ (and ``module_set`` is ``exact``).
        ShapeMismatchError: a module's shape differs between inputs (adapters for different base models).
    """
    spec = resolve(method)
    if not inputs:
        raise OperatorParameterError("give at least one adapter to merge")
    weights = [1.0] * len(inputs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(inputs):
        raise OperatorParameterError(f"{len(weights)} weights for {len(inputs)} inputs; give one weight per input",
                                     parameter="weights")
    if not all(math.isfinite(w) for w in weights):
        raise OperatorParameterError(f"weights must be finite, got {weights}", parameter="weights")
    params = spec.validate({k: v for k, v in (params or {}).items() if v is not None})
    rule = rank_rule(rank=rank, energy=energy, error=error)
    if rule is not None and not spec.takes("rank_rule"):
        rankers = [s for s in _linear_operators() if s.takes("rank_rule") and not s.exact]
        raise OperatorParameterError(f"{spec.name} is exact and keeps rank Σr; use --method {_names(rankers)} to "
                                     "choose a rank", parameter="rank")
    labels = [str(x) if not isinstance(x, Adapter) else (x.meta.source_path or f"#{i}")
              for i, x in enumerate(inputs)]
    adapters = [x if isinstance(x, Adapter) else load(x, allow_pickle=allow_pickle) for x in inputs]
    modules, present, notes = _module_set(adapters, labels, module_set)
    _check_shapes(adapters, labels, modules, present)
    dora = next(((labels[i], m) for m in modules for i in present[m] if adapters[i].info(m).has_magnitude), None)
    if dora is not None:
        # Dropping the magnitudes would write a plain LoRA with another effect than any input: refuse instead.
        raise OperatorParameterError(
            "DoRA modules have no exact weighted sum without the base weights (W' = m·(W + ΔW)/‖W + ΔW‖ per row); "
            "merging would drop the magnitude", file=dora[0], module=dora[1], parameter="inputs",
            hint="fold it into the base model (lorakit apply) and merge there, or resize it (the magnitude is kept)",
        )
    linear = spec.linear_weights(weights, params)
    with_bias = next(((labels[i], m) for m in modules for i in present[m] if adapters[i].info(m).has_bias), None)
    if with_bias is not None and linear is None:
        raise OperatorParameterError(
            f"{spec.name} is not linear in ΔW, so it has no exact meaning for bias updates (PEFT lora_bias)",
            file=with_bias[0], module=with_bias[1], parameter="method",
            hint=f"merge adapters with bias updates with {_names(_linear_operators())}",
        )
    if any(a.meta.full_tensors for a in adapters):
        if linear is None:
            raise OperatorParameterError(
                f"{spec.name} is not linear in ΔW, so it has no exact meaning for whole module tensors "
                "(modules_to_save)", file=next(lb for lb, a in zip(labels, adapters) if a.meta.full_tensors),
                parameter="method",
                hint=f"merge them with {_names(_linear_operators())} and weights that sum to 1",
            )
        merge_full_tensors(adapters, linear, labels)  # refuses, from the headers, what it cannot merge
    bases = {a.meta.base_model for a in adapters if a.meta.base_model}
    if len(bases) > 1:
        notes.append(f"the inputs name different base models ({', '.join(sorted(bases))}); shapes match, "
                     "so the merge proceeds")
    plan = MergePlan(adapters, labels, spec, weights, params, rule, modules, present, None, notes)
    plan.infos = _predicted_infos(plan)
    return plan


def _module_set(adapters: list[Adapter], labels: list[str], mode: ModuleSet):
    order: list[str] = []
    seen: set[str] = set()
    for a in adapters:
        for m in a:
            if m not in seen:
                seen.add(m)
                order.append(m)
    in_all = [m for m in order if all(m in a for a in adapters)]
    notes: list[str] = []
    if mode == "exact" and len(in_all) != len(order):
        for label, a in zip(labels, adapters):
            missing = [m for m in order if m not in a]
            if missing:
                raise IncompatibleAdaptersError(
                    f"module sets differ: {len(missing)} module(s) missing here, e.g. {missing[0]}", file=label,
                    missing=missing[:5],
                )
    modules = in_all if mode == "intersection" else order
    if not modules:
        raise IncompatibleAdaptersError("the adapters have no module in common", hint="check that they target "
                                        "the same base model, or pass --union")
    if len(modules) != len(order):
        notes.append(f"--intersection: {len(order) - len(modules)} module(s) not in every input were left out")
    elif len(in_all) != len(order):
        notes.append(f"--union: {len(order) - len(in_all)} module(s) are merged from the inputs that have them")
    present = {m: [i for i, a in enumerate(adapters) if m in a] for m in modules}
    return modules, present, notes


def _check_shapes(adapters: list[Adapter], labels: list[str], modules: list[str], present) -> None:
    for m in modules:
        idx = present[m]
        first = adapters[idx[0]].info(m)
        for i in idx[1:]:
            info = adapters[i].info(m)
            if info.shape != first.shape or info.kind != first.kind:
                raise ShapeMismatchError(
                    f"shape {info.shape} here but {first.shape} in {labels[idx[0]]} "
                    "(adapters for different base models?)", file=labels[i], module=m,
                )


def _predicted_infos(plan: MergePlan) -> dict[str, ModuleInfo] | None:
    """Output module infos when the output ranks follow from the headers; ``None`` when they need the data."""
    out: dict[str, ModuleInfo] = {}
    for m in plan.modules:
        infos = [plan.adapters[i].info(m) for i in plan.present[m]]
        shape = infos[0].shape
        r = plan.spec.output_rank(plan.rule, [i.rank for i in infos], shape)  # the one place the rank is decided
        if r is None:
            return None
        out[m] = ModuleInfo(m, shape[0], shape[1], r, 1.0, infos[0].dtype, infos[0].kind, infos[0].kernel,
                            has_bias=any(i.has_bias for i in infos))
    return out


@dataclass
class MergeRun:
    """The lazy merged adapter and the per-module results, filled in as modules are computed.

    ``results[m]`` holds the error, best error and info; its ``factors`` are shape-only (``meta`` tensors: rank,
    shape and dtype, no data), so that streaming a merge keeps no module after it is written. The merged
    factors themselves are ``adapter[m]``.
    """

    plan: MergePlan
    adapter: Adapter
    results: dict[str, MergeResult]


# the dense float32 merges that modules merged at the same time may hold together (run_merge)
CONCURRENT_DENSE_BYTES = 1 << 30


def run_merge(plan: MergePlan, run: RunOptions | None = None) -> MergeRun:
    """The merged adapter, lazy where the output ranks are known (see the module docstring).

    ``run.dtype``: the output dtype (``None``: each module's first input's). ``run.device``: where the arithmetic runs (inputs are moved by :func:`lorakit.device.to_device`: pinned,
    non-blocking copies on CUDA); results come back to CPU in the output dtype. The modules stream through the
    engine's loop (:class:`~lorakit.verbs.engine.ModuleStream`): inputs are read ahead of the compute in a
    background thread, windows are cut there.

    ``run.window_bytes``: for an operator with a declared ``batched`` path (the ``svd`` merge), modules are taken in windows of about this many bytes of float32
    factors (default: one module at a time on CPU, where batching saves no measurable time and memory stays at
    a module's working set; 512 MiB on CUDA, where it saves launches; 0 turns batching off), and the same-shaped
    ones in a window go through one call of that path (grouped by :func:`~lorakit.linalg.group_by_shape`; for
    svd one batched :func:`~lorakit.linalg.core_svd`), so on CUDA a Llama-3-8B adapter takes a handful of batched QR/SVD
    calls instead of 224 per-module ones. Peak memory: one window of factors plus its results. On CPU each
    module's numbers equal the per-module operator's (batched LAPACK runs the same routine per matrix).

    Delta-space merges on a CPU with ``n > 1`` torch threads take windows of ``8n`` modules and merge ``n`` at a
    time, each on one torch thread (:func:`lorakit.threads.parallel_map`), so every module is the one-thread
    result whatever ``n``; memory: ``n`` modules' working sets, and only where ``n`` of their dense float32
    merges fit in :data:`CONCURRENT_DENSE_BYTES` (larger modules go one at a time, on every thread).
    """
    results: dict[str, MergeResult] = {}
    spec = plan.spec
    run = run_options(run)
    dev, dtype, batch_bytes = run.device, run.dtype, run.window_bytes
    batching = spec.batched is not None and batch_bytes > 0
    linear = spec.linear_weights(plan.weights, plan.params)
    bias_inputs = {m for m in plan.modules if any(plan.adapters[i].info(m).has_bias for i in plan.present[m])}
    scratch = Scratch()  # dense buffers the modules reuse (lorakit.ops.scratch); they go with the run

    def read_inputs(m: str) -> list[LoraFactors]:
        inputs = []
        for i in plan.present[m]:
            f = plan.adapters[i][m]
            if plan.adapters[i].meta.source_path is None:  # file readers check already, naming the file
                f.check_finite(file=plan.labels[i], module=m)
            inputs.append(f)
        return inputs

    def merge_one(m: str, inputs_of) -> MergeResult:
        inputs = [factors_to(f, dev) for f in inputs_of(m)]
        kwargs = dict(plan.params)
        # ENGINE_KEYWORDS, where the signature has them
        engine = {"rank_rule": plan.rule, "module": m, "stored_dtype": plan.output_dtype(m, dtype),
                  "scratch": scratch}
        kwargs.update({k: v for k, v in engine.items() if spec.takes(k)})
        try:
            return spec.fn(inputs, [plan.weights[i] for i in plan.present[m]], **kwargs)
        except (ShapeMismatchError, NumericalError) as e:
            raise type(e)(e.message, module=m, hint=e.hint) from e

    def work(window: list[str], inputs_of) -> dict[str, MergeResult]:
        if concurrent:  # inputs read here, in order (the read-ahead is one thread); each module on one core
            read = {m: inputs_of(m) for m in window}
            # each concurrent module holds its dense float32 merge: modules too large for n of them at once
            # (a 70B gate_proj is 940 MB) go one at a time, on every thread
            fits = [m for m in window if dense_bytes(m) * workers() <= CONCURRENT_DENSE_BYTES]
            out = dict(zip(fits, parallel_map(lambda m: merge_one(m, read.__getitem__), fits)))
            out.update({m: merge_one(m, read.__getitem__) for m in window if m not in out})
            return out
        # the declared batched path over the window; what it leaves (a non-finite batch) goes one by one
        out = _batched_window(plan, window, dev, inputs_of, dtype) if batching else {}
        if window[0] not in out:
            out[window[0]] = merge_one(window[0], inputs_of)
        return out

    def dense_bytes(m: str) -> int:
        out_f, in_f = plan.adapters[plan.present[m][0]].info(m).shape
        return out_f * in_f * 4

    def float32_bytes(m: str) -> int:
        return sum(plan.adapters[i].info(m).num_params for i in plan.present[m]) * 4

    stored = {m: sum(plan.adapters[i].info(m).num_params * plan.adapters[i].info(m).dtype.itemsize
                     for i in plan.present[m]) for m in plan.modules}
    # read ahead: one module on CPU (a second core's worth of overlap, little memory), a window on CUDA
    # delta-space merges on a multi-core CPU: as many modules at a time as torch has threads, each on one
    # (lorakit.threads: a module's small passes do not scale over threads, whole modules do)
    concurrent = spec.space == "delta" and dev.type == "cpu" and workers() > 1
    stream = ModuleStream(plan.modules, read_inputs, work, nbytes=float32_bytes,
                          window_bytes=batch_bytes if batching else 0,
                          window_modules=8 * workers() if concurrent else 0,
                          read_ahead_bytes=batch_bytes // 2 if dev.type == "cuda" else 0, stored_bytes=stored)

    def one(m: str) -> LoraFactors:
        res = stream.get(m)
        f = res.factors
        f.check_finite(module=m)
        out_dtype = plan.output_dtype(m, dtype)
        extras: dict[str, torch.Tensor] = {}
        if linear is not None:  # bias updates are linear: Σ w_i·Δb_i exactly (refused at planning otherwise)
            # read again for the biases only where an input has one (the factors went to the operator)
            bias = bias_sum([plan.adapters[i][m] for i in plan.present[m]] if m in bias_inputs else [],
                            [linear[i] for i in plan.present[m]])
            if bias is not None:
                extras["bias"] = bias.cpu()
        f = f.with_(A=f.A.to(device="cpu", dtype=out_dtype), B=f.B.to(device="cpu", dtype=out_dtype),
                    magnitude=None, extras=extras)
        # the report needs ranks and errors only: keeping every result's factors would hold the whole
        # output in float32 (1 GB for a 70B-shaped r=16 merge); the merged factors are the adapter's
        results[m] = replace(res, factors=f.with_(A=torch.empty(f.A.shape, dtype=f.dtype, device="meta"),
                                                  B=torch.empty(f.B.shape, dtype=f.dtype, device="meta")))
        if plan.infos is not None and f.rank != plan.infos[m].rank:
            raise NumericalError(f"{spec.name} produced rank {f.rank}, planned {plan.infos[m].rank}", module=m)
        return f

    full = merge_full_tensors(plan.adapters, linear, plan.labels) if linear is not None else {}
    meta = plan.adapters[0].meta.with_(passthrough={}, notes=(), full_tensors=full)
    if plan.infos is not None:
        infos = {m: replace(i, dtype=dtype or i.dtype) for m, i in plan.infos.items()}
        adapter = Adapter({m: partial(one, m) for m in plan.modules}, meta, infos)
    else:
        adapter = Adapter({m: one(m) for m in plan.modules}, meta)
    return MergeRun(plan, adapter, results)


def _batched_window(plan: MergePlan, window: list[str], device: torch.device, inputs_of,
                    out_dtype: torch.dtype | None) -> dict[str, MergeResult]:
    """The operator's declared ``batched`` path over the modules of ``window`` (cut by the module stream).

    Modules whose inputs have equal ``(out, in, rank)`` (and come from the same inputs, with one compute dtype)
    form one batch, merged by one call on ``device``. A batch the path refuses with a
    :class:`~lorakit.errors.NumericalError` (a non-finite value) is left to the per-module path, which names
    the module.
    """
    assert plan.spec.batched is not None
    keyed = {m: tuple(plan.adapters[i].info(m) for i in plan.present[m]) for m in window}
    groups: dict[tuple, list[str]] = {}
    for key, names in group_by_shape(keyed).items():
        for m in names:  # one compute dtype per batch, as the per-module operator would choose it
            wide = any(i.dtype == torch.float64 for i in keyed[m])
            groups.setdefault((key, tuple(plan.present[m]), wide), []).append(m)
    out: dict[str, MergeResult] = {}
    for (_, present, _), names in groups.items():
        per_module = [inputs_of(m) for m in names]
        storage = widest_dtype(plan.output_dtype(m, out_dtype) for m in names)
        try:
            merged = plan.spec.batched(per_module, [plan.weights[i] for i in present], rank_rule=plan.rule,
                                       device=device, storage_dtype=storage)
        except NumericalError:
            continue
        out.update(zip(names, merged))
    return out


def merge_adapters(
    adapters: Sequence[str | Path | Adapter], weights: Sequence[float] | None = None, method: str = DEFAULT_MERGE, *,
    rank: int | None = None, energy: float | None = None, error: float | None = None,
    module_set: ModuleSet = "exact", dtype: torch.dtype | None = None, device: str | torch.device = "auto",
    **params: Any,
) -> tuple[Adapter, dict[str, MergeResult]]:
    """Merge in memory (Python API): the merged adapter (fully computed) and the per-module results.

    >>> merged, results = merge_adapters([a, b], [0.5, 0.5], method, density=0.3, rank=16)   # doctest: +SKIP

    An entry of the Python API: ``device`` and ``dtype`` are resolved here, once (:meth:`RunOptions.resolve`).
    """
    run = RunOptions.resolve(device, dtype=dtype)  # first: --device cuda without a GPU fails before reading
    plan = plan_merge(adapters, weights, method, params=params, rank=rank, energy=energy, error=error,
                      module_set=module_set)
    merged_run = run_merge(plan, run)
    return merged_run.adapter.materialize(), merged_run.results


def merge(
    inputs: Sequence[str | Path],
    output: str | Path | None,
    *,
    weights: Sequence[float] | None = None,
    method: str = DEFAULT_MERGE,
    params: Mapping[str, Any] | None = None,
    rank: int | None = None,
    energy: float | None = None,
    error: float | None = None,
    module_set: ModuleSet = "exact",
    to_format: str | None = None,
    run: RunOptions | None = None,
    dry_run: bool = False,
    allow_pickle: bool = False,
) -> Report:
    """``lorakit merge``: plan, then (unless ``dry_run``) stream the merge into ``output``; returns the report.

    ``run``: device, output dtype, window (``None``: the defaults of :meth:`RunOptions.resolve`)."""
    run = run_options(run)
    if output is not None:
        check_output_path(output, list(inputs))
    plan = plan_merge(inputs, weights, method, params=params, rank=rank, energy=energy, error=error,
                      module_set=module_set, allow_pickle=allow_pickle)
    if dry_run:
        return plan.compatibility().finish(output=output, inputs=plan.adapters, dry_run=True)
    if output is None:
        raise OperatorParameterError("give an output path with -o")
    merged = run_merge(plan, run)
    # Where each input was read from (a Hub input's local snapshot), so provenance can hash it and name its repo.
    local = [a.meta.source_path or str(i) for a, i in zip(plan.adapters, inputs)]
    recorded = {"method": plan.spec.name, "weights": plan.weights, "parameters": _shown_params(plan.params, plan.rule)}
    fmt = to_format or default_output_format(plan.adapters[0])
    write_adapter(merged.adapter, Output(output, "merge", recorded, tuple(local), fmt))
    return merge_report(merged, output, fmt)


def merge_report(run: MergeRun, output: str | Path, fmt: str) -> Report:
    plan = run.plan
    report = Report(title=f"merged {len(plan.adapters)} adapters with {plan.spec.name} → {output} ({fmt})",
                    columns=["module", "ranks in", "rank out", "error", "best error"])
    errors = []
    for m in plan.modules:
        res = run.results[m]
        ranks_in = "+".join(str(plan.adapters[i].info(m).rank) for i in plan.present[m])
        report.add_row(m, ranks_in, res.factors.rank, res.error, res.best_error)
        errors.append(res.error)
    report.summary = {
        "method": plan.spec.name, "weights": plan.weights, "parameters": _shown_params(plan.params, plan.rule),
        "module_count": len(plan.modules), "max_error": max(errors) if errors else 0.0,
        "mean_error": sum(errors) / len(errors) if errors else 0.0,
    }
    report.notes = list(plan.notes)
    if not plan.spec.exact and plan.spec.space == "delta":
        report.notes.append("error is relative to the method's dense result; the best error at that rank needs a "
                            "dense SVD and is not computed")
    return report.finish(output=output, format=fmt, inputs=plan.adapters)


__all__ = ["MergePlan", "MergeRun", "merge", "merge_adapters", "plan_merge", "run_merge"]
