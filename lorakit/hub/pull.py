"""``pull``: download an adapter's files (and nothing else) from the Hub, verify them, and say where they are.

Flow (online): ``model_info`` resolves the revision to a commit; the recursive tree listing at that commit gives
every file's size, git blob id and (for LFS files) sha256; lorakit picks the adapter files, refuses unsafe
names, hands exactly those names to ``snapshot_download`` as ``allow_patterns`` (it downloads, resumes
within the process after a dropped connection, and fills the standard cache), then hashes each file and
compares it with the listing. A mismatch deletes the bad file and raises. Offline, the same call is answered
from the cache (``local_files_only``), checked against the blob names that are sha256 ETags.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from lorakit.errors import HubError, UnsafeFileError
from lorakit.formats.base import PICKLE_SUFFIXES, WEIGHT_NAMES
from lorakit.hub._client import HubSettings, api, hf, hub_errors, settings
from lorakit.hub.spec import HubSpec, join_inside, parse_spec, safe_repo_path
from lorakit.provenance import cache_origin
from lorakit.report import Report

CONFIG_NAME = "adapter_config.json"
CARD_NAME = "README.md"
# Pickles that sit beside adapters in training repos and are never adapter weights.
NOT_WEIGHTS = {"training_args", "optimizer", "scheduler", "rng_state", "trainer_state", "scaler"}
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 22


@dataclass(frozen=True)
class RemoteFile:
    """One file of the tree listing: size, git blob id, and sha256 when stored in LFS."""

    path: str
    size: int
    blob_id: str | None
    sha256: str | None


@dataclass(frozen=True)
class PulledFile:
    """A file on disk after a pull, with how it was verified (``sha256``, ``git-sha1``, ``etag`` or ``none``)."""

    path_in_repo: str
    local: Path
    size: int
    sha256: str
    verified: str


@dataclass
class PullResult:
    """What a pull produced: the folder holding the files (snapshot or ``-o`` directory) and each file."""

    repo_id: str
    revision: str
    commit: str | None
    root: Path
    files: list[PulledFile] = field(default_factory=list)
    offline: bool = False

    def report(self) -> Report:
        """Per file: size, sha256 and how it was checked; the summary says where the adapter is."""
        where = f"{self.repo_id}@{self.revision}" + (f" ({self.commit[:12]})" if self.commit else "")
        planned = any(f.verified == "planned" for f in self.files)
        verb = "pull" if planned else "pulled"
        r = Report(title=f"{verb} {where}" + (" from the cache (offline)" if self.offline else ""),
                   columns=["file", "size", "sha256", "verified"])
        for f in self.files:
            r.add_row(f.path_in_repo, f.size, f.sha256[:16] or "-", f.verified)
        r.summary = {"repo": self.repo_id, "revision": self.revision, "commit": self.commit,
                     "folder": str(self.root)}
        with contextlib.suppress(HubError):
            r.summary["adapter"] = str(self.adapter_path)
        return r.finish(dry_run=planned)

    def origins(self) -> dict[Path, dict[str, Any]]:
        """Local path → ``{"repo", "revision"[, "path_in_repo"]}`` of every pulled file and of the folder: pass
        it as ``make_provenance(..., origins=...)`` when the files were pulled outside the Hub cache (``-o``)."""
        rev = self.commit or self.revision
        out: dict[Path, dict[str, Any]] = {
            f.local.absolute(): {"repo": self.repo_id, "revision": rev, "path_in_repo": f.path_in_repo}
            for f in self.files}
        out[self.root.absolute()] = {"repo": self.repo_id, "revision": rev}
        return out

    @property
    def adapter_path(self) -> Path:
        """The weights file that :func:`lorakit.load` reads (it finds ``adapter_config.json`` beside
        ``adapter_model.safetensors`` itself)."""
        weights = [f for f in self.files if f.path_in_repo.endswith((".safetensors", *PICKLE_SUFFIXES))]
        standard = [f for f in weights if PurePosixPath(f.path_in_repo).name in WEIGHT_NAMES]
        if len(weights) == 1 or len(standard) == 1:  # PEFT/diffusers names win, as in a local folder
            return (standard or weights)[0].local
        if not weights:
            raise HubError(f"no adapter weights were pulled from {self.repo_id}")
        names = ", ".join(sorted(f.path_in_repo for f in weights))
        raise HubError(f"{self.repo_id} holds several adapter files ({names})",
                       hint=f"name one: hf://{self.repo_id}@{self.revision}/FILE")


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file: sha1 of ``b"blob <size>\\0" + content`` (what the Hub lists as ``oid``)."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def select_files(listing: list[RemoteFile], spec: HubSpec, *, allow_pickle: bool) -> list[RemoteFile]:
    """The files an adapter needs: weights, ``adapter_config.json`` and the card, from the repo root (or from
    the folder or file that ``spec.path`` names). Pickles only when asked and no safetensors weights exist.

    Raises:
        HubError: ``spec.path`` is not in the repo, or no adapter weights are there.
        UnsafeFileError: only pickled weights exist and ``allow_pickle`` is off.
    """
    by_path = {f.path: f for f in listing}
    folder = ""
    if spec.path is not None:
        if spec.path in by_path:  # one file: it, plus its folder's config and the repo card
            if spec.path.endswith(PICKLE_SUFFIXES) and not allow_pickle:
                raise UnsafeFileError(f"{spec.path} in {spec.repo_id} is a pickle; not fetched")
            chosen = [by_path[spec.path]]
            folder_of = str(PurePosixPath(spec.path).parent)
            prefix = "" if folder_of == "." else folder_of + "/"
            beside = (prefix + CONFIG_NAME, CARD_NAME)
            chosen += [by_path[n] for n in beside if n in by_path and n != spec.path]
            return chosen
        folder = spec.path.rstrip("/") + "/"
        if not any(p.startswith(folder) for p in by_path):
            raise HubError(
                f"file {spec.path!r} is not in {spec.repo_id}@{spec.revision or 'main'}",
                hint=f"files there: {', '.join(sorted(by_path)[:8]) or 'none'}",
            )
    inside = {p[len(folder):]: f for p, f in by_path.items() if p.startswith(folder)}
    here = {n: f for n, f in inside.items() if "/" not in n}
    weights = [f for n, f in here.items() if fnmatch.fnmatchcase(n, "*.safetensors")]
    if not weights:
        pickles = [f for n, f in here.items()
                   if n.endswith(PICKLE_SUFFIXES) and PurePosixPath(n).stem not in NOT_WEIGHTS]
        if pickles and not allow_pickle:
            raise UnsafeFileError(
                f"{spec.repo_id} has only pickled weights ({', '.join(sorted(f.path for f in pickles))})",
            )
        weights = pickles
    if not weights:
        raise HubError(
            f"no adapter weights (*.safetensors) in {spec.repo_id}@{spec.revision or 'main'}"
            + (f" under {folder}" if folder else ""),
            hint="pass the file: hf://ORG/NAME/path/to/adapter.safetensors",
        )
    extras = [here[n] for n in (CONFIG_NAME,) if n in here]
    if CARD_NAME in by_path:
        extras.append(by_path[CARD_NAME])
    return [*weights, *extras]


def _listing(s: HubSettings, spec: HubSpec) -> tuple[str, list[RemoteFile]]:
    """The commit that ``spec.revision`` points to, and the recursive file listing at that commit."""
    client = api(s)
    with hub_errors(s, spec.repo_id, spec.revision):
        info = client.model_info(spec.repo_id, revision=spec.revision)
        commit = info.sha
        entries = client.list_repo_tree(spec.repo_id, revision=commit or spec.revision, recursive=True)
        files = [
            RemoteFile(e.path, e.size, e.blob_id, e.lfs.sha256 if e.lfs else None)
            for e in entries if isinstance(e, hf().RepoFile)  # folders carry no content
        ]
    for f in files:
        safe_repo_path(f.path)  # a hostile listing is refused before anything is downloaded
    return commit, files


def _remove(local: Path) -> None:
    """Delete a bad download: the snapshot pointer and the blob it points to (or the ``-o`` copy)."""
    blob = local.resolve()
    for p in {local, blob}:
        p.unlink(missing_ok=True)


def _verify(remote: RemoteFile, local: Path) -> PulledFile:
    actual = _sha256(local)
    size = local.stat().st_size
    if remote.sha256 is not None:
        ok, how = actual == remote.sha256, "sha256"
    elif remote.blob_id:
        ok, how = git_blob_sha1(local) == remote.blob_id, "git-sha1"
    else:
        ok, how = size == remote.size, "size"
    if not ok or size != remote.size:
        _remove(local)
        expected = remote.sha256 or remote.blob_id
        raise HubError(
            f"{remote.path}: downloaded content does not match the Hub's {how} ({expected}); the file was deleted",
            hint="pull again; if it persists the repo or a proxy serves corrupt data",
        )
    return PulledFile(remote.path, local, size, actual, how)


def _verify_cached(root: Path, name: str) -> PulledFile:
    """Offline check: a cache blob named by a sha256 ETag (LFS files) must hash to its name."""
    local = join_inside(root, name)
    actual = _sha256(local)
    blob = local.resolve().name
    how = "none"
    if _SHA256_RE.match(blob):
        if blob != actual:
            _remove(local)
            raise HubError(f"{name}: cached file does not match its sha256 ETag {blob}; it was deleted",
                           hint="pull it again with network access")
        how = "etag"
    return PulledFile(name, local, local.stat().st_size, actual, how)


def _download(s: HubSettings, spec: HubSpec, revision: str, names: list[str], output: Path | None,
              offline: bool) -> Path:
    with hub_errors(s, spec.repo_id, spec.revision, names[0] if len(names) == 1 else None):
        folder = hf().snapshot_download(
            spec.repo_id, revision=revision, allow_patterns=names, cache_dir=s.cache_dir,
            local_dir=output, endpoint=s.endpoint, token=s.token, local_files_only=offline,
        )
    return Path(folder)


def _offline_names(root: Path, spec: HubSpec, allow_pickle: bool) -> list[str]:
    """The adapter files present in a cached snapshot, chosen with the same rules as online."""
    listing = [RemoteFile(p.relative_to(root).as_posix(), p.stat().st_size, None, None)
               for p in root.rglob("*") if p.is_file() and ".cache" not in p.relative_to(root).parts]
    return [f.path for f in select_files(listing, spec, allow_pickle=allow_pickle)]


def pull(
    spec: str | HubSpec,
    *,
    output: str | Path | None = None,
    offline: bool | None = None,
    allow_pickle: bool = False,
    endpoint: str | None = None,
    token: str | None = None,
    cache_dir: str | Path | None = None,
    dry_run: bool = False,
) -> PullResult:
    """Download an adapter's files from the Hub into the cache (or ``output``), verified.

    Args:
        spec: ``hf://org/name[@rev][/file]`` or ``org/name[@rev]``, or a parsed :class:`HubSpec`.
        output: a folder to hold real copies instead of the shared cache.
        offline: use only the cache; default from ``HF_HUB_OFFLINE``.
        allow_pickle: fetch ``.bin``/``.pt`` weights when a repo has no safetensors.
        endpoint, token, cache_dir: override the environment (see :func:`lorakit.hub._client.settings`).
        dry_run: list and select the files, download nothing (``verified`` is ``planned``).

    Raises:
        HubError: repo, revision or file not found; gated or private; network down; hash mismatch; unsafe name.
        UnsafeFileError: only pickles are available and ``allow_pickle`` is off.
        OutputError: the disk filled up.
    """
    parsed = spec if isinstance(spec, HubSpec) else parse_spec(spec)
    s = settings(endpoint=endpoint, token=token, cache_dir=cache_dir, offline=offline)
    revision = parsed.revision or "main"
    out = Path(output) if output is not None else None
    if s.offline:
        # Exact names only: the client checks them against its cached listing; a whole-repo pull always
        # fetched the root config and card when they exist, so asking for them never reports a false gap.
        probe = [parsed.path] if parsed.path else [CONFIG_NAME, CARD_NAME]
        root = _download(s, parsed, revision, probe, out, offline=True)
        names = _offline_names(root, parsed, allow_pickle)
        files = [_verify_cached(root, n) for n in names]
        commit = root.name if out is None else None
        return PullResult(parsed.repo_id, revision, commit, root, files, offline=True)
    commit, listing = _listing(s, parsed)
    chosen = select_files(listing, parsed, allow_pickle=allow_pickle)
    if dry_run:  # the plan: what would be fetched and where, from the listing alone
        root = out or s.cache_dir / f"models--{parsed.repo_id.replace('/', '--')}" / "snapshots" / commit
        planned = [PulledFile(f.path, join_inside(root, f.path), f.size, f.sha256 or "", "planned")
                   for f in chosen]
        return PullResult(parsed.repo_id, revision, commit, root, planned)
    root = _download(s, parsed, revision, [f.path for f in chosen], out, offline=False)
    files = [_verify(f, join_inside(root, f.path)) for f in chosen]
    return PullResult(parsed.repo_id, revision, commit, root, files)


def hub_origin(path: str | Path) -> dict[str, Any] | None:
    """``{"repo", "revision", "path_in_repo"}`` for a file in the standard Hub cache layout
    (``models--org--name/snapshots/<commit>/…``); ``None`` for other paths (see :meth:`PullResult.origins`)."""
    return cache_origin(path)


def resolve_spec(spec: str, *, allow_pickle: bool = False) -> Path:
    """Pull ``spec`` (see :func:`pull`) and return what :func:`lorakit.load` reads: a file or a PEFT folder."""
    return pull(spec, allow_pickle=allow_pickle).adapter_path
