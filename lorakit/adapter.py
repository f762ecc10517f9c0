"""``Adapter``: an immutable mapping module-name → :class:`LoraFactors`, plus metadata.

An adapter read from a file is lazy: module names, shapes, ranks, dtypes and scales come from the header and
the config alone (:meth:`Adapter.info`), and each module's factors are read only when indexed. Operations
return new adapters and never mutate their inputs.

Python algebra is exact and stays in factor space::

    a + b          ΔW_a + ΔW_b   (rank concatenation)
    0.5 * a        0.5·ΔW_a      (only the scale changes)
    a - b, -a
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch

from lorakit.algebra import cat_factors
from lorakit.errors import IncompatibleAdaptersError
from lorakit.factors import LayerKind, LoraFactors, stored_shapes


@dataclass(frozen=True, slots=True)
class ModuleInfo:
    """What is known of a module without reading its tensors."""

    name: str
    out_features: int
    in_features: int
    rank: int
    scale: float
    dtype: torch.dtype
    kind: LayerKind = "linear"
    kernel: tuple[int, int] | None = None
    has_magnitude: bool = False
    has_bias: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def num_params(self) -> int:
        return self.rank * (self.out_features + self.in_features)

    @property
    def stored_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes a file stores the factors in (:func:`lorakit.factors.stored_shapes`)."""
        return stored_shapes(self.out_features, self.in_features, self.rank, self.kind, self.kernel)

    @classmethod
    def of(cls, name: str, f: LoraFactors) -> ModuleInfo:
        return cls(
            name, f.out_features, f.in_features, f.rank, f.scale, f.dtype, f.kind, f.kernel, f.magnitude is not None,
            f.bias is not None,
        )


@dataclass(frozen=True, slots=True)
class FullTensor:
    """A tensor an adapter stores whole, replacing the base model's tensor of the same name (PEFT
    ``modules_to_save``, ``bias="all"``/``"lora_only"`` biases, embedding layers saved with the adapter).

    Its update to a base tensor ``W`` is ``T − W``: applying it at weight 1 gives ``T``; a weighted sum
    ``Σ w_i·(T_i − W)`` is free of ``W`` only when ``Σ w_i = 1`` (then the result is ``Σ w_i·T_i``).

    Args:
        shape: the tensor's shape, from the header.
        dtype: its stored dtype.
        load: reads the tensor (lazily, from the source file).
        key: the key it is stored under in the source file.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]
    key: str = ""


@dataclass(frozen=True)
class AdapterMeta:
    """Everything about an adapter that is not a module's factors.

    Args:
        base_model: the base model's id or path, if known.
        source_format: the format it was read from (``peft``, ``kohya``, ``diffusers``, ``lycoris``...).
        source_path: the file or directory it was read from.
        format_config: format-specific settings kept for a faithful round trip (PEFT config keys, kohya
            ``ss_*`` metadata...).
        metadata: the safetensors ``__metadata__`` of the source file.
        provenance: what lorakit did to produce it (operation, parameters, inputs with sha256).
        notes: facts a user should know (``no alpha stored: scale 1.0 applies``...), shown by ``inspect``.
        passthrough: other non-LoRA tensors of the source (PEFT trainable tokens...), by original key, loaded
            lazily; written back only in the source's format. ``apply`` refuses an adapter that has any (it
            cannot know what they do to the base model).
        full_tensors: base-model tensor name (``lm_head.weight``) → :class:`FullTensor` that replaces it whole
            (PEFT ``modules_to_save``...). ``apply`` writes them in place of the base's tensors, the PEFT writer
            writes them back, other formats refuse them (they have no place for them).
    """

    base_model: str | None = None
    source_format: str | None = None
    source_path: str | None = None
    format_config: Mapping[str, Any] = field(default_factory=dict)
    metadata: Mapping[str, str] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    passthrough: Mapping[str, Callable[[], torch.Tensor]] = field(default_factory=dict)
    full_tensors: Mapping[str, FullTensor] = field(default_factory=dict)

    def with_(self, **changes: Any) -> AdapterMeta:
        return replace(self, **changes)


class Adapter(Mapping[str, LoraFactors]):
    """An immutable, possibly lazy, mapping module-name → :class:`LoraFactors`.

    Args:
        modules: module name → factors, or → a zero-argument callable that produces them.
        meta: the adapter's metadata.
        infos: module name → :class:`ModuleInfo` for lazily loaded modules (required for callables).
    """

    __slots__ = ("_infos", "_modules", "meta")

    def __init__(
        self,
        modules: Mapping[str, LoraFactors | Callable[[], LoraFactors]],
        meta: AdapterMeta | None = None,
        infos: Mapping[str, ModuleInfo] | None = None,
    ) -> None:
        self._modules = dict(modules)
        infos = dict(infos or {})
        for name, m in self._modules.items():
            if isinstance(m, LoraFactors):
                infos.setdefault(name, ModuleInfo.of(name, m))
            elif name not in infos:
                raise ValueError(f"lazy module {name!r} needs a ModuleInfo")
        self._infos = infos
        self.meta = meta or AdapterMeta()

    # ---- mapping ------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> LoraFactors:
        m = self._modules[name]
        return m if isinstance(m, LoraFactors) else m()

    def __contains__(self, name: object) -> bool:
        # Mapping's default tries self[name], which would read a lazy module's tensors
        return name in self._modules

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)

    def __repr__(self) -> str:
        fmt = self.meta.source_format or "in-memory"
        return f"Adapter({len(self)} modules, {fmt}, ranks {self.rank_summary()})"

    # ---- header-level facts -------------------------------------------------------------------------
    def info(self, name: str) -> ModuleInfo:
        """Shapes, rank, scale and dtype of a module, without reading its tensors."""
        return self._infos[name]

    def infos(self) -> dict[str, ModuleInfo]:
        return dict(self._infos)

    @property
    def num_params(self) -> int:
        return sum(i.num_params for i in self._infos.values())

    def rank_summary(self) -> str:
        ranks = sorted({i.rank for i in self._infos.values()})
        if not ranks:
            return "-"
        return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"

    # ---- derived adapters ---------------------------------------------------------------------------
    def with_meta(self, **changes: Any) -> Adapter:
        return Adapter(self._modules, self.meta.with_(**changes), self._infos)

    def map(
        self, fn: Callable[[str, LoraFactors], LoraFactors], infos: Mapping[str, ModuleInfo] | None = None
    ) -> Adapter:
        """A lazy adapter whose module ``name`` is ``fn(name, self[name])``.

        ``infos`` describes the results; without it the result is evaluated eagerly (``fn`` may change ranks).
        """
        if infos is None:
            return Adapter({n: fn(n, self[n]) for n in self}, self.meta)
        def mapped(n: str) -> LoraFactors:
            return fn(n, self[n])

        return Adapter({n: partial(mapped, n) for n in self}, self.meta, infos)

    def select(self, names: list[str] | set[str]) -> Adapter:
        """The sub-adapter with only ``names`` (in this adapter's order)."""
        keep = [n for n in self if n in set(names)]
        return Adapter({n: self._modules[n] for n in keep}, self.meta, {n: self._infos[n] for n in keep})

    def materialize(self) -> Adapter:
        """An in-memory copy (reads every module now)."""
        return Adapter({n: self[n] for n in self}, self.meta)

    def delta(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense flattened ΔW of one module (see :meth:`LoraFactors.delta`)."""
        return self[name].delta(dtype)

    # ---- exact algebra ------------------------------------------------------------------------------
    def __mul__(self, weight: float) -> Adapter:
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
            return NotImplemented
        if self.meta.full_tensors and weight != 1:
            from lorakit.errors import AdapterError

            raise AdapterError(
                f"cannot scale an adapter with whole module tensors (modules_to_save, e.g. "
                f"{next(iter(self.meta.full_tensors))}) by {weight}: W + w·(T − W) needs the base weights",
                file=self.meta.source_path, hint="lorakit apply --scale does this with the base model at hand",
            )
        infos = {n: replace(i, scale=i.scale * weight) for n, i in self._infos.items()}
        return self.map(lambda _n, f: f.scaled(weight), infos)

    __rmul__ = __mul__

    def __truediv__(self, divisor: float) -> Adapter:
        return self * (1.0 / divisor)

    def __neg__(self) -> Adapter:
        return self * -1.0

    def __add__(self, other: object) -> Adapter:
        if not isinstance(other, Adapter):
            return NotImplemented
        return cat([self, other])

    def __sub__(self, other: object) -> Adapter:
        if not isinstance(other, Adapter):
            return NotImplemented
        return self + (-other)


# ---- exact adapter algebra (rank concatenation; the factor-level parts are lorakit.algebra) ----
def merge_full_tensors(adapters: Sequence[Adapter], weights: Sequence[float],
                       labels: Sequence[str] | None = None) -> dict[str, FullTensor]:
    """The whole module tensors (PEFT ``modules_to_save``) of a weighted sum of adapters.

    Each saved tensor ``T_i`` updates the base tensor ``W`` by ``T_i − W``, so the weighted sum is
    ``W + Σ w_i·(T_i − W)``, which does not depend on ``W`` exactly when ``Σ w_i = 1``: then it is ``Σ w_i·T_i``
    (``T`` itself when every input saved the same tensor). Any other case would need the base weights, and is
    refused rather than guessed. Lazy: tensors are read when the writer asks.

    Raises:
        IncompatibleAdaptersError: some inputs save a tensor that others do not, shapes differ, or the weights
            do not sum to 1.
    """
    labels = list(labels) if labels is not None else [a.meta.source_path or f"#{i}" for i, a in enumerate(adapters)]
    names = list(dict.fromkeys(n for a in adapters for n in a.meta.full_tensors))
    if not names:
        return {}
    for label, a in zip(labels, adapters):
        missing = [n for n in names if n not in a.meta.full_tensors]
        if missing:
            raise IncompatibleAdaptersError(
                f"saves no whole tensor for {missing[0]} (modules_to_save) while another input does: merging "
                "them would need the base model's weights", file=label,
                hint="merge adapters that save the same modules, or apply each to the base model in turn",
            )
    total = math.fsum(weights)
    if abs(total - 1.0) > 1e-9:
        raise IncompatibleAdaptersError(
            f"the inputs save whole module tensors (modules_to_save, e.g. {names[0]}) and the weights sum to "
            f"{total:g}: W + Σ w_i·(T_i − W) needs the base weights unless the weights sum to 1", file=labels[0],
            hint="give weights that sum to 1 (e.g. --weights 0.5 0.5), or apply each adapter to the base model",
        )
    out: dict[str, FullTensor] = {}
    for n in names:
        parts = [a.meta.full_tensors[n] for a in adapters]
        for label, t in zip(labels, parts):
            if t.shape != parts[0].shape:
                raise IncompatibleAdaptersError(
                    f"saved tensor {n} has shape {list(t.shape)} here but {list(parts[0].shape)} in {labels[0]}",
                    file=label)

        def load(parts: list[FullTensor] = parts) -> torch.Tensor:
            tensors = [t.load() for t in parts]
            if all(torch.equal(t, tensors[0]) for t in tensors[1:]):
                return tensors[0]
            dt = torch.promote_types(torch.float32, tensors[0].dtype)
            acc = torch.zeros(tensors[0].shape, dtype=dt)
            for t, w in zip(tensors, weights):
                acc += float(w) * t.to(dt)
            return acc.to(tensors[0].dtype)

        out[n] = FullTensor(parts[0].shape, parts[0].dtype, load, parts[0].key)
    return out


def cat(adapters: Sequence[Adapter], weights: Sequence[float] | None = None) -> Adapter:
    """Exact weighted sum of adapters over the same module set, lazily, by rank concatenation."""
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    names = list(adapters[0])
    for a in adapters[1:]:
        if set(a) != set(names):
            missing = sorted(set(names) - set(a))[:3]
            extra = sorted(set(a) - set(names))[:3]
            raise IncompatibleAdaptersError(
                f"module sets differ (missing {missing}, unexpected {extra})", missing=missing, unexpected=extra
            )
    dora = next(((a, n) for a in adapters for n in names if a.info(n).has_magnitude), None)
    if dora is not None and len(adapters) > 1:
        raise IncompatibleAdaptersError(
            "DoRA modules have no exact sum without the base weights: adding would drop the magnitude",
            file=dora[0].meta.source_path, module=dora[1], hint="fold DoRA adapters into the base (lorakit apply)",
        )
    full = merge_full_tensors(adapters, weights)
    infos = {}
    for n in names:
        i0 = adapters[0].info(n)
        infos[n] = ModuleInfo(
            n, i0.out_features, i0.in_features, sum(a.info(n).rank for a in adapters), 1.0,
            torch.float32, i0.kind, i0.kernel, has_bias=any(a.info(n).has_bias for a in adapters),
        )

    def one(n: str) -> LoraFactors:
        return cat_factors([a[n] for a in adapters], weights, module=n)

    meta = adapters[0].meta.with_(passthrough={}, full_tensors=full)
    return Adapter({n: partial(one, n) for n in names}, meta, infos)
