"""The one operator registry: each operator is a plain function registered once under its name.

``@register(...)`` records an :class:`OperatorSpec` and returns the function unchanged. ``resolve(name)`` finds
it, with a suggestion for near misses; ``available(kind)`` lists them (``lorakit merge --list-methods``).

Merge operators (``kind="merge"``) work on one module at a time::

    fn(inputs: Sequence[LoraFactors], weights: Sequence[float], *, <typed keyword parameters>) -> MergeResult

and the merge pipeline streams them over an adapter set. Other kinds may define their own signature.

The spec is the operator's contract with the engine, which knows no method by name:

- ``rank``, ``rank_requested``, ``rank_cap``: the output rank rule (:meth:`OperatorSpec.output_rank`);
- ``linear``: the target is ``λ·Σ w_i·ΔW_i`` (``λ`` its ``lam`` parameter, 1 without one), so bias updates and
  whole module tensors merge exactly with the weights :meth:`OperatorSpec.linear_weights`;
- ``homogeneous``: scaling every weight by ``c > 0`` scales the result by ``c``;
- ``space`` / ``factored``: whether it stays in factor space (nothing of size out×in is formed);
- ``ranges`` and ``check``: parameter ranges and cross-parameter checks, run by :meth:`OperatorSpec.validate`;
- ``batched``: an optional path that merges many same-shaped modules in one call;
- ``lossless`` and ``tolerance``: the parameters at which one adapter at weight 1 comes back (``None``: never,
  e.g. Iso-C flattens its spectrum), and to what relative accuracy in float64.

Keyword parameters named in :data:`ENGINE_KEYWORDS` are supplied by the engine (the rank rule, the module name, the stored dtype, the run's buffers),
not by the user; an operator receives them when its signature has them. The contract tests
(``tests/merge/test_contract.py``) are generated from this registry, so a new registration gets them.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_type_hints

from lorakit.errors import OperatorParameterError, UnknownOperatorError
from lorakit.factors import LoraFactors

Space = Literal["factors", "delta"]
RankDefault = Literal["sum", "max_input", "data"]
RankCap = Literal["sum", "shape"]
F = TypeVar("F", bound=Callable[..., Any])
# keyword parameters the engine passes itself (where the operator's signature has them): the rank rule from
# --rank/--energy/--error, the module's name (seeds of random masks), the dtype its result is stored in, and
# the run's reusable dense buffers (lorakit.ops.scratch.Scratch)
ENGINE_KEYWORDS = ("rank_rule", "module", "stored_dtype", "scratch")
DEFAULT_MERGE = "cat"  # the merge operator used when none is named (the exact one)


@dataclass(frozen=True)
class Interval:
    """A parameter range written as in mathematics: ``"(0, 1]"``, ``"[0, 1)"``, ``"[1, inf)"``."""

    text: str
    low: float
    high: float
    low_closed: bool
    high_closed: bool

    @classmethod
    def parse(cls, text: str) -> Interval:
        m = re.fullmatch(r"\s*([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])\s*", text)
        if m is None:
            raise ValueError(f"not an interval: {text!r} (write it as '(0, 1]')")
        return cls(text.strip(), float(m[2]), float(m[3]), m[1] == "[", m[4] == "]")

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            return False
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below


@dataclass(frozen=True)
class MergeResult:
    """One merged module.

    Args:
        factors: the merged factors.
        error: relative Frobenius error ‖result − target‖/‖target‖ against the method's exact target
            (the exact weighted sum, or the dense TIES/DARE/... result); 0.0 when exact.
        best_error: the error of the best possible result at the same rank (Eckart–Young), when known.
        info: method-specific facts (cluster assignments, kept density...).
    """

    factors: LoraFactors
    error: float = 0.0
    best_error: float | None = None
    info: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OperatorSpec:
    """What the registry knows of an operator: its declared contract (see the module docstring)."""

    name: str
    fn: Callable[..., Any]
    kind: str
    description: str
    exact: bool
    space: Space
    paper: str | None
    params: Mapping[str, inspect.Parameter]
    types: Mapping[str, Any]
    rank: RankDefault = "data"
    rank_requested: bool = False
    rank_cap: RankCap = "sum"
    linear: bool = False
    homogeneous: bool = False
    ranges: Mapping[str, Interval] = field(default_factory=dict)
    check: Callable[..., None] | None = None
    batched: Callable[..., list[MergeResult]] | None = None
    lossless: Mapping[str, Any] | None = None
    tolerance: float = 1e-9

    @property
    def factored(self) -> bool:
        """True when the operator stays in factor space: no tensor of size out×in is formed."""
        return self.space == "factors"

    def takes(self, keyword: str) -> bool:
        """Whether the operator's signature has the keyword parameter (the engine passes ``rank_rule`` and
        ``module`` only then)."""
        return keyword in self.params

    def output_rank(self, rule: Any, ranks: Sequence[int], shape: tuple[int, int]) -> int | None:
        """The output rank of one module, from its input ranks and shape, when the declaration fixes it before any
        data is read; ``None`` when the data decides (a ``data`` rank, an energy/error rule).

        No rule: ``sum`` → Σr_i; ``max_input`` → min(max r_i, out, in). ``--rank K`` (when ``rank_requested``):
        min(K, cap) with cap = min(Σr_i, out, in) for ``rank_cap="sum"`` (factor space cannot exceed Σr_i), or
        min(out, in) for ``"shape"``."""
        if rule is None:
            if self.rank == "sum":
                return sum(ranks)
            if self.rank == "max_input":
                return min(max(ranks), sum(ranks), *shape)
            return None
        if rule.kind != "rank" or not self.rank_requested:
            return None
        cap = min(sum(ranks), *shape) if self.rank_cap == "sum" else min(shape)
        return min(int(rule.value), cap)

    def linear_weights(self, weights: Sequence[float], params: Mapping[str, Any]) -> list[float] | None:
        """The effective weights ``λ·w_i`` of a linear operator (``λ`` its ``lam`` parameter, 1 without one), or
        ``None`` when it is not linear (TIES, DARE...)."""
        if not self.linear:
            return None
        lam = float(params.get("lam", 1.0)) if "lam" in self.params else 1.0
        return [lam * float(w) for w in weights]

    def defaults(self) -> dict[str, Any]:
        """The keyword parameters' defaults (engine keywords left out)."""
        return {k: p.default for k, p in self.params.items()
                if k not in ENGINE_KEYWORDS and p.default is not inspect.Parameter.empty}

    def validate(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Check names, coerce values and check the declared ranges of keyword parameters (then the operator's
        cross-parameter ``check`` over its defaults and the given values); raises :class:`OperatorParameterError`
        with a one-line message."""
        out: dict[str, Any] = {}
        for key, value in params.items():
            if key not in self.params:
                known = ", ".join(self.params) or "none"
                raise OperatorParameterError(
                    f"{self.name} takes no parameter {key!r} (its parameters: {known})", operator=self.name,
                    parameter=key,
                )
            out[key] = self._coerce(key, value)
            interval = self.ranges.get(key)
            if interval is not None and out[key] is not None and out[key] not in interval:
                raise OperatorParameterError(f"--{key} must be in {interval.text}, got {out[key]}",
                                             operator=self.name, parameter=key)
        if self.check is not None:
            self.check(**{**self.defaults(), **out})
        return out

    def _coerce(self, key: str, value: Any) -> Any:
        """``value`` as the parameter's declared type (``int``, ``float``, ``bool``, ``str``, or one of them or
        ``None``); strings from the command line are parsed by that type, other types pass unchanged."""
        typ = _plain_type(self.types.get(key))
        if value is None or typ is None:
            return value
        try:
            return parse_value(value, typ)
        except (TypeError, ValueError):
            raise OperatorParameterError(
                f"{self.name}: parameter {key} must be {_TYPE_WORDS[typ]}, got {value!r}", operator=self.name,
                parameter=key,
            ) from None


_TYPE_WORDS = {bool: "true or false (also 1/0, yes/no, on/off)", int: "an integer", float: "a number",
               str: "a string"}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _plain_type(hint: Any) -> type | None:
    """``int``/``float``/``bool``/``str`` for a hint that is one of them, alone or with ``None``; else ``None``."""
    if hint in _TYPE_WORDS:
        return hint  # type: ignore[no-any-return]
    args = [a for a in getattr(hint, "__args__", ()) if a is not type(None)]
    if len(args) == 1 and args[0] in _TYPE_WORDS and type(None) in getattr(hint, "__args__", ()):
        return args[0]  # type: ignore[no-any-return]
    return None


def parse_value(value: Any, typ: type) -> Any:
    """Parse ``value`` (a command-line string, or a Python value) as ``typ``; ``ValueError`` when it is not one.

    bool: ``true/false``, ``1/0``, ``yes/no``, ``on/off`` (any case), or a Python bool or 0/1 (never the
    truthiness of a non-empty string: ``"false"`` is False); int: an integer (``"3"``, ``3``, ``3.0``), not
    ``"3.5"`` or a bool; float: a number (``"0.2"``, ``"1e-3"``, an int), not a bool; str: the string."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(value)
    if typ is int:
        if isinstance(value, bool):
            raise ValueError(value)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            return int(value.strip())
        raise ValueError(value)
    if typ is float:
        if isinstance(value, bool):
            raise ValueError(value)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            out = float(value.strip())
            if math.isnan(out):  # no parameter means NaN
                raise ValueError(value)
            return out
        raise ValueError(value)
    if isinstance(value, str):
        return value
    raise ValueError(value)



_REGISTRY: dict[tuple[str, str], OperatorSpec] = {}


def register(
    name: str | None = None,
    *,
    kind: str = "merge",
    description: str,
    exact: bool,
    space: Space,
    paper: str | None = None,
    rank: RankDefault = "data",
    rank_requested: bool = False,
    rank_cap: RankCap = "sum",
    linear: bool = False,
    homogeneous: bool = False,
    ranges: Mapping[str, str] | None = None,
    check: Callable[..., None] | None = None,
    batched: Callable[..., list[MergeResult]] | None = None,
    lossless: Mapping[str, Any] | None = None,
    tolerance: float = 1e-9,
) -> Callable[[F], F]:
    """Register ``fn`` under ``name`` (default: the function's name) with its contract (the module docstring;
    ``ranges`` maps parameter names to intervals written as ``"(0, 1]"``). Duplicates, and ranges or lossless
    parameters the function does not take, are errors."""

    def deco(fn: F) -> F:
        key = (kind, name or fn.__name__)
        if key in _REGISTRY:
            raise ValueError(f"operator {key[1]!r} ({kind}) registered twice")
        sig = inspect.signature(fn)
        params = {p.name: p for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        try:
            hints = get_type_hints(fn)
        except (NameError, TypeError, AttributeError):  # unresolvable forward references: fall back to no coercion
            hints = {}
        unknown = [k for k in (*(ranges or {}), *(lossless or {})) if k not in params]
        if unknown:
            raise ValueError(f"operator {key[1]!r} declares parameters it does not take: {unknown}")
        if rank_requested and "rank_rule" not in params:
            raise ValueError(f"operator {key[1]!r} declares a requested rank but takes no rank_rule")
        _REGISTRY[key] = OperatorSpec(
            key[1], fn, kind, description, exact, space, paper, params, {k: hints.get(k) for k in params},
            rank=rank, rank_requested=rank_requested, rank_cap=rank_cap, linear=linear, homogeneous=homogeneous,
            ranges={k: Interval.parse(v) for k, v in (ranges or {}).items()}, check=check, batched=batched,
            lossless=lossless, tolerance=tolerance,
        )
        return fn

    return deco


def resolve(name: str, kind: str = "merge") -> OperatorSpec:
    """The operator registered as ``name``; :class:`UnknownOperatorError` suggests the nearest name."""
    _load_builtins()
    spec = _REGISTRY.get((kind, name))
    if spec is None:
        names = [n for k, n in _REGISTRY if k == kind]
        close = difflib.get_close_matches(name, names, n=1)
        raise UnknownOperatorError(
            f"unknown {kind} method {name!r}" + (f"; did you mean {close[0]!r}?" if close else ""),
            hint=f"known: {', '.join(sorted(names))}", name=name, suggestion=close[0] if close else None,
        )
    return spec


def available(kind: str | None = None, *, sort: bool = True) -> list[OperatorSpec]:
    """Every registered operator (of ``kind``), sorted by name (``sort=False``: in registration order)."""
    _load_builtins()
    specs = [s for (k, _), s in _REGISTRY.items() if kind is None or k == kind]
    return sorted(specs, key=lambda s: s.name) if sort else specs


# The one explicit list of modules that register built-in operators.
BUILTIN_MODULES: list[str] = [
    "lorakit.ops.merge_exact",
    "lorakit.ops.merge_delta",
    "lorakit.ops.knots",
    "lorakit.ops.tsv",
    "lorakit.ops.iso",
    "lorakit.ops.lego",
]


def _load_builtins() -> None:
    import importlib

    for module in BUILTIN_MODULES:
        importlib.import_module(module)


__all__ = ["DEFAULT_MERGE", "ENGINE_KEYWORDS", "Interval", "MergeResult", "OperatorSpec", "available", "register", "resolve"]
