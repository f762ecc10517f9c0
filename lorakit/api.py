"""The front door: :func:`load` any adapter, :func:`save` it in any format.

The implementations live in :mod:`lorakit.verbs.store` (every verb reads and writes through them); this module is
the stable Python entry point, at the top of the layers (see ``docs/architecture.md``).
"""

from __future__ import annotations

from lorakit.verbs.store import (
    CARRIES_BIAS,
    CARRIES_EMBEDDING,
    CARRIES_FULL_TENSORS,
    check_carried,
    default_output_format,
    load,
    save,
)

__all__ = ["CARRIES_BIAS", "CARRIES_EMBEDDING", "CARRIES_FULL_TENSORS", "check_carried", "default_output_format",
           "load", "save"]
