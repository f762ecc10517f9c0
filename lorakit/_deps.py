"""Optional dependencies: import them with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from lorakit.errors import MissingDependencyError


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming ``pip install lorakit[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"this feature needs the Python package {module.split('.')[0]!r}",
            hint=f"pip install 'lorakit[{extra}]'",
        ) from e
