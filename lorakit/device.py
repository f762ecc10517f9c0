"""Device selection: ``auto`` picks CUDA when present; every numerical path runs on CPU with the same code."""

from __future__ import annotations

import torch

from lorakit.errors import LorakitError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto``/``None`` → ``cuda`` if available else ``cpu``; ``cuda`` without a GPU is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LorakitError("--device cuda was asked for but no CUDA device is available", hint="use --device cpu")
    return dev
