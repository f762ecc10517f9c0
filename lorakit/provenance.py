"""Provenance: what lorakit did to produce a file, stored in its metadata as ``lorakit.provenance`` (JSON)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PROVENANCE_KEY = "lorakit.provenance"


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, or of every file in a directory (sorted by name, names included)."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def make_provenance(
    operation: str, parameters: Mapping[str, Any] | None = None, inputs: Sequence[str | Path] = ()
) -> dict[str, Any]:
    """The provenance record of one operation: version, operation, parameters, inputs with their sha256."""
    from lorakit import __version__

    return {
        "lorakit_version": __version__,
        "operation": operation,
        "parameters": dict(parameters or {}),
        "inputs": [input_record(p) for p in inputs if Path(p).exists()],
    }


def input_record(path: str | Path) -> dict[str, Any]:
    """``{"path": name, "sha256": …}``, plus ``repo``/``revision``/``path_in_repo`` for files pulled from the Hub
    (recognised without importing ``huggingface_hub``)."""
    from lorakit.hub.pull import hub_origin

    return {"path": Path(path).name, "sha256": file_sha256(path), **(hub_origin(path) or {})}


def provenance_metadata(provenance: Mapping[str, Any] | None) -> dict[str, str]:
    return {PROVENANCE_KEY: json.dumps(provenance, sort_keys=True, default=str)} if provenance else {}


def read_provenance(metadata: Mapping[str, str]) -> dict[str, Any] | None:
    raw = metadata.get(PROVENANCE_KEY)
    if not raw:
        return None
    from lorakit.io.files import loads_json

    try:
        return loads_json(raw)
    except ValueError:  # unreadable provenance (or nested too deeply) is not an error: it is only shown
        return None
