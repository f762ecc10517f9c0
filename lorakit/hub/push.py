"""``push``: publish an adapter file or folder to a Hub repo, in its own format, with a model card.

The adapter is read first (so a broken file is refused before anything is created on the Hub), its files are
staged in a temporary folder with absolute local paths removed from their metadata (§10: they leak the
uploader's file system), a ``README.md`` card is written beside them (:mod:`lorakit.card`), and the folder is
uploaded in one commit with ``HfApi.upload_folder`` after ``create_repo(exist_ok=True)`` (and
``create_branch(exist_ok=True)`` for another branch than ``main``).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import FormatError, HubError
from lorakit.hub._client import api, hf, hub_errors, settings
from lorakit.hub.spec import check_repo_id
from lorakit.io.files import loads_json, read_bytes
from lorakit.provenance import file_sha256, read_provenance
from lorakit.report import Report

CONFIG_NAME = "adapter_config.json"
# Metadata values that hold the uploader's paths in kohya and PEFT files.
PATH_KEYS = ("base_model_name_or_path", "ss_sd_model_name", "ss_vae_name", "ss_output_name")
_ABS_PATH_RE = re.compile(r"^(/|~|[A-Za-z]:[\\/]|\\\\)")


@dataclass
class PushResult:
    """What was published: the commit, its URL, and each uploaded file with its size and sha256."""

    repo_id: str
    revision: str
    commit: str | None
    url: str
    files: dict[str, tuple[int, str]] = field(default_factory=dict)
    sanitized: list[str] = field(default_factory=list)
    card: str = ""

    def report(self) -> Report:
        done = self.commit is not None
        r = Report(title=f"{'pushed to' if done else 'push to'} {self.repo_id}@{self.revision}",
                   columns=["file", "size", "sha256"])
        for name, (size, sha) in sorted(self.files.items()):
            r.add_row(name, size, sha[:16])
        r.add_row("README.md", len(self.card.encode()), "(model card)")
        r.summary = {"repo": self.repo_id, "revision": self.revision, "commit": self.commit,
                     "url": self.url or None}
        if self.sanitized:
            r.notes.append(f"local paths removed from: {', '.join(self.sanitized)}")
        return r.finish(dry_run=not done)


def is_local_path(value: Any) -> bool:
    return isinstance(value, str) and bool(_ABS_PATH_RE.match(value))


def _sanitize_value(key: str, value: str) -> str | None:
    """An absolute path becomes its last component (kohya keys, informational) or ``None`` (PEFT's base model,
    which loaders would otherwise try as a Hub id)."""
    if not is_local_path(value):
        return value
    return None if key == "base_model_name_or_path" else Path(value.replace("\\", "/")).name


def sanitize_config(config: dict[str, Any], base_model: str | None, changed: list[str]) -> dict[str, Any]:
    out = dict(config)
    old = out.get("base_model_name_or_path")
    new: str | None
    if base_model:
        new = base_model
    else:
        new = _sanitize_value("base_model_name_or_path", old) if isinstance(old, str) else old
    if new != old:
        out["base_model_name_or_path"] = new
        changed.append("base_model_name_or_path")
    return out


def _sanitize_metadata(meta: dict[str, str], base_model: str | None, changed: list[str]) -> dict[str, str]:
    out = dict(meta)
    for key in PATH_KEYS:
        if key in out and is_local_path(out[key]):
            out[key] = _sanitize_value(key, out[key]) or ""
            changed.append(key)
    if "lorakit.peft_config" in out:
        try:
            cfg = loads_json(out["lorakit.peft_config"])
        except ValueError:
            cfg = None
        if isinstance(cfg, dict):
            before = len(changed)
            cfg = sanitize_config(cfg, base_model, changed)
            if len(changed) != before:
                out["lorakit.peft_config"] = json.dumps(cfg, sort_keys=True)
    return out


def copy_sanitized_safetensors(src: Path, dst: Path, base_model: str | None = None) -> list[str]:
    """Copy a safetensors file, rewriting only its header's ``__metadata__`` when it holds local paths.

    The tensor bytes are copied unchanged; a file without local paths is copied byte for byte. Returns the
    metadata keys that were changed.
    """
    with open(src, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = loads_json(fh.read(n))
        changed: list[str] = []
        meta = header.get("__metadata__") or {}
        new_meta = _sanitize_metadata(meta, base_model, changed)
        if not changed:
            shutil.copyfile(src, dst)
            return []
        header["__metadata__"] = new_meta
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned, as the reference writer does
        with open(dst, "wb") as out:
            out.write(struct.pack("<Q", len(raw)) + raw)
            shutil.copyfileobj(fh, out, 1 << 22)
    return changed


def _adapter_files(path: Path) -> list[Path]:
    """The files that make up the adapter at ``path``: the file itself, or a folder's config and weights."""
    from lorakit.formats.base import Source

    if path.is_file():
        return [path]
    weights = Source.open(path).store.path
    config = path / CONFIG_NAME
    return [weights, *([config] if config.is_file() else [])]


def push(
    path: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    base_model: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    dry_run: bool = False,
) -> PushResult:
    """Publish the adapter at ``path`` (file or PEFT folder) to ``repo_id`` with a model card.

    Args:
        path: a local adapter file or folder (read first: unreadable adapters are refused before any upload).
        repo_id: ``org/name``; created if missing (``private`` applies only then).
        revision: a branch to commit to (created from ``main`` if missing); default ``main``.
        base_model: the base model's Hub id, when the adapter's own record is missing or a local path.
        dry_run: stage the files and write the card, contact nothing; ``card`` holds the card's text.

    Raises:
        HubError: offline, no token/permission, or the Hub refused the upload.
        FormatError: ``path`` is not an adapter lorakit can read.
    """
    from lorakit.card import build_card
    from lorakit.formats import detect
    from lorakit.formats.base import MAX_CONFIG_BYTES, Source

    check_repo_id(repo_id)
    src = Path(path)
    if not src.exists():
        raise FormatError("no such file or directory", file=src)
    s = settings(endpoint=endpoint, token=token)
    if s.offline and not dry_run:
        raise HubError("cannot push in offline mode", hint="unset HF_HUB_OFFLINE (or drop --offline)")
    source = Source.open(src)  # a local path (checked above): read as lorakit.load would, without the Hub
    adapter = detect(source).read(source)
    fmt = adapter.meta.source_format or "peft"
    base = base_model or adapter.meta.base_model
    base = None if is_local_path(base) else base
    branch = revision or "main"
    sanitized: list[str] = []
    with tempfile.TemporaryDirectory(prefix="lorakit-push-") as tmp:
        stage = Path(tmp)
        for f in _adapter_files(src):
            if f.name == CONFIG_NAME:
                before = len(sanitized)
                raw = loads_json(read_bytes(f, limit=MAX_CONFIG_BYTES, what="JSON config"))
                cfg = sanitize_config(raw, base_model, sanitized)
                if len(sanitized) == before:
                    shutil.copyfile(f, stage / f.name)  # unchanged: publish the exact bytes
                else:
                    (stage / f.name).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            elif f.suffix == ".safetensors":
                sanitized += copy_sanitized_safetensors(f, stage / f.name, base_model)
            else:
                raise FormatError(f"refusing to publish {f.suffix} pickles; convert to safetensors first",
                                  file=f, hint="lorakit convert FILE --allow-pickle --to peft -o OUT/")
        files = {p.name: (p.stat().st_size, file_sha256(p)) for p in sorted(stage.iterdir())}
        # Readers leave `meta.provenance` empty; the record lives in the file's metadata.
        provenance = adapter.meta.provenance or read_provenance(adapter.meta.metadata)
        card = build_card(repo_id=repo_id, fmt=fmt, base_model=base, provenance=provenance, files=files)
        card.save(stage / "README.md")
        card_text = (stage / "README.md").read_text(encoding="utf-8")
        if dry_run:
            return PushResult(repo_id, branch, None, "", files, sorted(set(sanitized)), card_text)
        client = api(s)
        if not (s.token or hf().get_token()):
            raise HubError(f"publishing to {repo_id} needs a Hub token with write access",
                           hint="set HF_TOKEN (or run `hf auth login`)")
        with hub_errors(s, repo_id, branch):
            client.create_repo(repo_id, private=private, exist_ok=True)
            if branch != "main":
                client.create_branch(repo_id, branch=branch, exist_ok=True)
            info = client.upload_folder(
                folder_path=stage, repo_id=repo_id, revision=branch,
                commit_message=commit_message or f"Upload {fmt} LoRA adapter with lorakit",
            )
    return PushResult(repo_id, branch, getattr(info, "oid", None), str(getattr(info, "commit_url", "")), files,
                      sorted(set(sanitized)), card_text)


__all__ = ["PushResult", "copy_sanitized_safetensors", "push"]
