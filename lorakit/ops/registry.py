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
            typ = _plain_type(self.types.get(key))
            if value is not None and typ in (int, float, bool, str) and not isinstance(value, typ):
                try:
                    value = _coerce(typ, value)
                except (TypeError, ValueError) as e:
                    raise OperatorParameterError(
                        f"{self.name}: parameter {key} must be {typ.__name__}, got {value!r}", operator=self.name,
                        parameter=key,
                    ) from e
            out[key] = value
        return out


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _plain_type(hint: Any) -> Any:
    """``X`` for a hint ``X`` or ``X | None`` (the value ``None`` is passed through before coercion)."""
    args = [a for a in getattr(hint, "__args__", ()) if a is not type(None)]
    return args[0] if len(args) == 1 and getattr(hint, "__args__", None) else hint


def _coerce(typ: type, value: Any) -> Any:
    """``value`` as ``typ``; a string bool must be one of true/false, 1/0, yes/no, on/off (``bool("false")`` is
    True, so the plain constructor cannot be used for text from the command line)."""
    if typ is bool and isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise ValueError(value)
    if typ is bool and not (isinstance(value, int) and value in (0, 1)):
        raise ValueError(value)
    if typ is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    return typ(value)


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
        except Exception:  # unresolvable forward references: fall back to no coercion
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
    "lorakit.ops.lego",
]


def _load_builtins() -> None:
    import importlib

    for module in BUILTIN_MODULES:
        importlib.import_module(module)


__all__ = ["MergeResult", "OperatorSpec", "available", "register", "resolve"]
