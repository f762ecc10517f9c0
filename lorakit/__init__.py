"""lorakit: LoRA adapters as data.

    >>> import lorakit
    >>> a = lorakit.load("examples/style.safetensors")          # doctest: +SKIP
    >>> lorakit.save(0.5 * a + b, "ab.safetensors")             # doctest: +SKIP

The public names are imported on first use (PEP 562 ``__getattr__``), so ``import lorakit`` and the CLI's
``--version``/``--help`` do not pay for torch; ``lorakit.load`` and the rest behave as plain attributes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name → the module that defines it
_LAZY = {
    "Adapter": "lorakit.adapter",
    "AdapterMeta": "lorakit.adapter",
    "ModuleInfo": "lorakit.adapter",
    "load": "lorakit.api",
    "save": "lorakit.api",
    "LorakitError": "lorakit.errors",
    "LoraFactors": "lorakit.factors",
}

if TYPE_CHECKING:
    from lorakit.adapter import Adapter, AdapterMeta, ModuleInfo
    from lorakit.api import load, save
    from lorakit.errors import LorakitError
    from lorakit.factors import LoraFactors


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["Adapter", "AdapterMeta", "LoraFactors", "LorakitError", "ModuleInfo", "__version__", "load", "save"]
