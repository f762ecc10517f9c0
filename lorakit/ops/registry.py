"""The one operator registry: each operator is a plain function registered once under its name.

``@register(...)`` records an :class:`OperatorSpec` (name, kind, one-line description, exactness, the space it
works in, its typed keyword parameters) and returns the function unchanged. ``resolve(name)`` finds it, with a
suggestion for near misses; ``available(kind)`` lists them (``lorakit merge --list-methods``).

Merge operators (``kind="merge"``) work on one module at a time::

    fn(inputs: Sequence[LoraFactors], weights: Sequence[float], *, <typed keyword parameters>) -> MergeResult

and the merge pipeline streams them over an adapter set. Other kinds may define their own signature.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_type_hints

from lorakit.errors import OperatorParameterError, UnknownOperatorError
from lorakit.factors import LoraFactors

Space = Literal["factors", "delta"]
F = TypeVar("F", bound=Callable[..., Any])


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
    """What the registry knows of an operator."""

    name: str
    fn: Callable[..., Any]
    kind: str
    description: str
    exact: bool
    space: Space
    paper: str | None
    params: Mapping[str, inspect.Parameter]
    types: Mapping[str, Any]

    def validate(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Check names and coerce values of keyword parameters; raises :class:`OperatorParameterError`."""
        out: dict[str, Any] = {}
        for key, value in params.items():
            if key not in self.params:
                known = ", ".join(self.params) or "none"
                raise OperatorParameterError(
                    f"{self.name} takes no parameter {key!r} (its parameters: {known})", operator=self.name,
                    parameter=key,
                )
            out[key] = self._coerce(key, value)
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
) -> Callable[[F], F]:
    """Register ``fn`` under ``name`` (default: the function's name). Duplicates are errors."""

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
        _REGISTRY[key] = OperatorSpec(
            key[1], fn, kind, description, exact, space, paper, params, {k: hints.get(k) for k in params}
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


def available(kind: str | None = None) -> list[OperatorSpec]:
    """Every registered operator (of ``kind``), sorted by name."""
    _load_builtins()
    return sorted((s for (k, _), s in _REGISTRY.items() if kind is None or k == kind), key=lambda s: s.name)


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


__all__ = ["MergeResult", "OperatorSpec", "available", "register", "resolve"]
