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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch

from lorakit.factors import LayerKind, LoraFactors


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
        from lorakit.ops.algebra import cat

        return cat([self, other])

    def __sub__(self, other: object) -> Adapter:
        if not isinstance(other, Adapter):
            return NotImplemented
        return self + (-other)
