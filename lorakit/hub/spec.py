"""Hub references as users type them, and the repo file names lorakit accepts (untrusted input, §10).

``hf://org/name[@rev][/path/in/repo]`` and ``org/name[@rev]`` name a repo, a revision (branch, tag or commit;
default ``main``) and optionally one file. File names come from the Hub's listing, i.e. from whoever made the
repo, so :func:`safe_repo_path` refuses anything that could escape the download directory.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lorakit.errors import HubError
from lorakit.io.resolve import HUB_SCHEME

# The Hub's own rule (huggingface_hub validate_repo_id): `ns/name`, word characters, `-` and `.`, no `--`/`..`.
_REPO_PART = r"[\w.-]{1,96}"
_REPO_RE = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$")
_DRIVE_RE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class HubSpec:
    """A parsed Hub reference.

    Args:
        repo_id: ``org/name``.
        revision: branch, tag or 40-hex commit; ``None`` means the default branch.
        path: one file inside the repo, or ``None`` for the adapter files of the whole repo.
    """

    repo_id: str
    revision: str | None = None
    path: str | None = None

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{HUB_SCHEME}{self.repo_id}{rev}{'/' + self.path if self.path else ''}"


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is a valid ``org/name``; :class:`HubError` otherwise."""
    if not _REPO_RE.match(repo_id) or "--" in repo_id or ".." in repo_id or repo_id.endswith(".git"):
        raise HubError(f"{repo_id!r} is not a Hub repo id", hint="write it as ORG/NAME, e.g. someorg/style-lora")
    return repo_id


def parse_spec(spec: str) -> HubSpec:
    """Parse ``hf://org/name[@rev][/path]`` or ``org/name[@rev]``.

    The revision may itself contain ``/`` (``refs/pr/1``) only in the bare form without a file path; with a
    file path, the revision ends at the first ``/``.
    """
    body = spec.removeprefix(HUB_SCHEME)
    parts = body.split("/", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise HubError(f"{spec!r} does not name a Hub repo", hint="write hf://ORG/NAME[@REVISION][/FILE]")
    org, name_rev = parts[0], parts[1]
    rest = parts[2] if len(parts) == 3 else None
    name, _, revision = name_rev.partition("@")
    if revision and rest is not None and not spec.startswith(HUB_SCHEME):
        revision, rest = f"{revision}/{rest}", None  # bare `org/name@refs/pr/1`
    path = safe_repo_path(rest) if rest else None
    return HubSpec(check_repo_id(f"{org}/{name}"), revision or None, path)


def safe_repo_path(name: str) -> str:
    """``name`` if it is a safe relative POSIX path inside a repo; :class:`HubError` otherwise.

    Refused: empty names, NUL, backslashes, absolute paths, Windows drives, ``.``/``..`` segments.
    """
    bad = (
        not name
        or "\0" in name
        or "\\" in name
        or name.startswith("/")
        or _DRIVE_RE.match(name) is not None
        or any(seg in ("", ".", "..") for seg in name.split("/"))
    )
    if bad:
        raise HubError(
            f"refusing unsafe file name {name!r} from the Hub (it could write outside the download folder)",
            hint="the repo is malformed or malicious; report it to its owner",
        )
    return name


def join_inside(root: Path, name: str) -> Path:
    """``root / name`` after :func:`safe_repo_path`, checked again lexically (cache entries are symlinks into
    ``blobs/``, so resolving them would leave ``root`` legitimately)."""
    base = Path(os.path.abspath(root))
    target = Path(os.path.normpath(base / PurePosixPath(safe_repo_path(name))))
    if base not in target.parents:
        raise HubError(f"refusing {name!r}: it resolves outside {root}", hint="the repo is malformed or malicious")
    return target
