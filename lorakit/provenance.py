"""Provenance: what lorakit did to produce a file, stored in its metadata as ``lorakit.provenance`` (JSON)."""

from __future__ import annotations

import hashlib
import json
import re
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


Origins = Mapping[str | Path, Mapping[str, Any]]  # local path → {"repo", "revision"[, "path_in_repo"]}


def make_provenance(
    operation: str, parameters: Mapping[str, Any] | None = None, inputs: Sequence[str | Path] = (),
    *, origins: Origins | None = None, background: bool = False,
) -> dict[str, Any]:
    """The provenance record of one operation: version, operation, parameters, inputs with their sha256.

    ``origins`` says where inputs came from when their path does not (files pulled from the Hub into a folder of
    the user's: :meth:`lorakit.hub.PullResult.origins`); files in the Hub cache layout are recognised by path.

    ``background``: the inputs are hashed on background threads while the caller goes on, and the record is a
    :class:`PendingProvenance` (its digests placeholders of their length until :meth:`PendingProvenance.final`),
    which :func:`provenance_metadata` turns into a :class:`lorakit.io.writer.DeferredText` that the safetensors writer settles
    when it closes: the hashing (0.07 s for two 8B adapters) overlaps the writing instead of preceding it.
    """
    from lorakit import __version__

    record = {"lorakit_version": __version__, "operation": operation, "parameters": dict(parameters or {})}
    pending = PendingProvenance(record, [(p, origins) for p in inputs if Path(p).exists()])
    return pending if background else pending.final()


_PLACEHOLDER = "0" * 64  # a sha256 hex digest's length


class PendingProvenance(dict):
    """A provenance record whose input digests are still being computed (``make_provenance(background=True)``).

    As a mapping it holds placeholders of the digests' length; :meth:`final` waits for the real record. The
    inputs are hashed at once on up to torch's thread count of threads (hashlib releases the GIL): two 8B
    adapters 0.13-0.19 → 0.07 s on two threads."""

    def __init__(self, record: Mapping[str, Any], inputs: Sequence[tuple[str | Path, Origins | None]]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from lorakit.threads import workers

        pool = ThreadPoolExecutor(max(1, min(workers(), len(inputs))), thread_name_prefix="lorakit-hash")
        self._futures = [pool.submit(input_record, p, o) for p, o in inputs]
        pool.shutdown(wait=False)  # the threads end with their hashes
        records = [{**input_record(p, o, digest=False), "sha256": _PLACEHOLDER} for p, o in inputs]
        super().__init__({**record, "inputs": records})

    def final(self) -> dict[str, Any]:
        """The record with the inputs' digests (waits for them; a file that could not be read raises here)."""
        return {**self, "inputs": [f.result() for f in self._futures]}


# A file in the standard Hub cache layout: ``models--org--name/snapshots/<commit>/<path in repo>``.
_CACHE_RE = re.compile(
    r"models--(?P<org>[\w.-]+?)--(?P<name>[\w.-]+)/snapshots/(?P<commit>[0-9a-f]{40})(?:/(?P<path>.+))?$"
)


def cache_origin(path: str | Path) -> dict[str, Any] | None:
    """``{"repo", "revision"[, "path_in_repo"]}`` read from a path in the Hub cache layout, else ``None``."""
    m = _CACHE_RE.search(Path(path).absolute().as_posix())
    if not m:
        return None
    origin: dict[str, Any] = {"repo": f"{m['org']}/{m['name']}", "revision": m["commit"]}
    if m["path"]:
        origin["path_in_repo"] = m["path"]
    return origin


def input_record(path: str | Path, origins: Origins | None = None, *, digest: bool = True) -> dict[str, Any]:
    """``{"path": name, "sha256": …}``, plus ``repo``/``revision``/``path_in_repo`` for files pulled from the Hub:
    from ``origins`` (keyed by path) when given, else from the Hub cache layout of the path itself
    (``digest=False``: without the sha256)."""
    known = {Path(k).absolute(): v for k, v in (origins or {}).items()}
    origin = known.get(Path(path).absolute()) or cache_origin(path)
    record: dict[str, Any] = {"path": Path(path).name}
    if digest:
        record["sha256"] = file_sha256(path)
    return {**record, **(dict(origin) if origin else {})}


def provenance_metadata(provenance: Mapping[str, Any] | None) -> dict[str, str]:
    """``{"lorakit.provenance": JSON}``; for a :class:`PendingProvenance`, a :class:`lorakit.io.writer.DeferredText`."""
    if not provenance:
        return {}
    text = json.dumps(provenance, sort_keys=True, default=str)
    if isinstance(provenance, PendingProvenance):
        from lorakit.io.writer import DeferredText

        final = provenance.final
        return {PROVENANCE_KEY: DeferredText(text, lambda: json.dumps(final(), sort_keys=True, default=str))}
    return {PROVENANCE_KEY: text}


def read_provenance(metadata: Mapping[str, str]) -> dict[str, Any] | None:
    raw = metadata.get(PROVENANCE_KEY)
    if not raw:
        return None
    from lorakit.io.files import loads_json

    try:
        return loads_json(raw)
    except ValueError:  # unreadable provenance (or nested too deeply) is not an error: it is only shown
        return None
