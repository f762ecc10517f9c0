"""lorakit: LoRA adapters as data.

    >>> import lorakit
    >>> a = lorakit.load("examples/style.safetensors")          # doctest: +SKIP
    >>> lorakit.save(0.5 * a + b, "ab.safetensors")             # doctest: +SKIP
"""

from lorakit.adapter import Adapter, AdapterMeta, ModuleInfo
from lorakit.api import load, save
from lorakit.errors import LorakitError
from lorakit.factors import LoraFactors

__version__ = "0.1.0"

__all__ = ["Adapter", "AdapterMeta", "LoraFactors", "LorakitError", "ModuleInfo", "__version__", "load", "save"]
