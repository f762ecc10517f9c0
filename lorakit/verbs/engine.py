"""The steps the adapter-producing verbs share, written once: the write of the result, with its provenance.

A verb plans from headers and computes its output adapter (lazily, module by module); :func:`write_adapter`
then records what was done (:func:`lorakit.provenance.make_provenance`: operation, parameters, inputs with their
sha256) and writes the adapter atomically through :func:`lorakit.verbs.store.save`, which refuses an output that
is one of the inputs before anything is written. ``merge``, ``resize``, ``convert``, ``extract`` and
``dequantize`` write through it; the writers of other file kinds (quantized files, checkpoints, LQ-LoRA
residuals) keep their own ``io`` writer. The streaming of modules itself (windows, prefetch, NaN checks) is still
each verb's (issue 15).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.adapter import Adapter
from lorakit.provenance import make_provenance
from lorakit.verbs.store import save


@dataclass(frozen=True)
class Output:
    """Where and how a verb's adapter is written.

    Attributes:
        path: output file or directory.
        operation: the provenance's operation name (``"merge"``, ``"resize"``...).
        params: the provenance's parameters (JSON-able).
        inputs: input paths: refused as outputs, and (with ``hash_inputs``) hashed into the provenance.
        format: output format (``None``: the adapter's source format when writable, else PEFT).
        hash_inputs: record the inputs' sha256 in the provenance (``False`` for inputs named only by their
            parameters, such as extract's checkpoints).
    """

    path: str | Path
    operation: str
    params: Mapping[str, Any] = field(default_factory=dict)
    inputs: tuple[str | Path, ...] = ()
    format: str | None = None
    hash_inputs: bool = True


def write_adapter(adapter: Adapter, out: Output) -> Path:
    """Write ``adapter`` atomically to ``out.path`` with its provenance; returns the written path."""
    prov = make_provenance(out.operation, out.params, list(out.inputs) if out.hash_inputs else ())
    return save(adapter, out.path, format=out.format, provenance=prov, inputs=out.inputs)


__all__ = ["Output", "write_adapter"]
