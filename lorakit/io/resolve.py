"""Turn what a user typed where a file is expected into a local path.

``hf://ORG/REPO[@REV][/path]`` and bare ``ORG/REPO[@REV]`` (when no such local path exists) are pulled from the
Hugging Face Hub on demand (see :mod:`lorakit.hub`); anything else is a local path.
"""

from __future__ import annotations

import re
from pathlib import Path

HUB_SCHEME = "hf://"
REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def is_hub_spec(spec: str) -> bool:
    """True for ``hf://…``, and for ``org/name[@rev]`` that does not exist as a local path."""
    if spec.startswith(HUB_SCHEME):
        return True
    return bool(REPO_RE.match(spec)) and not Path(spec).exists()


def resolve_input(spec: str | Path, *, allow_pickle: bool = False) -> Path:
    """A local path for ``spec``, downloading from the Hub when ``spec`` names a Hub repo."""
    s = str(spec)
    if is_hub_spec(s):
        from lorakit.hub import resolve_spec

        return resolve_spec(s, allow_pickle=allow_pickle)
    return Path(s)
