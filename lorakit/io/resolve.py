"""Turn what a user typed where a file is expected into a local path.

``hf://ORG/REPO[@REV][/path]`` and bare ``ORG/REPO[@REV]`` (when no such local path exists) name Hugging Face Hub
repos. This layer only recognises them: fetching is the caller's, passed in as ``hub`` (the verbs and
:func:`lorakit.load` pass :func:`lorakit.verbs.store.pull_spec`), so :mod:`lorakit.io` knows nothing of the Hub.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from lorakit.errors import FormatError

HUB_SCHEME = "hf://"
REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")

HubResolver = Callable[[str, bool], Path]  # (spec, allow_pickle) → local file or folder


def is_hub_spec(spec: str) -> bool:
    """True for ``hf://…``, and for ``org/name[@rev]`` that does not exist as a local path."""
    if spec.startswith(HUB_SCHEME):
        return True
    return bool(REPO_RE.match(spec)) and not Path(spec).exists()


def resolve_input(spec: str | Path, *, allow_pickle: bool = False, hub: HubResolver | None = None) -> Path:
    """A local path for ``spec``; a Hub spec is handed to ``hub`` (which downloads it).

    Raises:
        FormatError: ``spec`` names a Hub repo and no ``hub`` resolver was given.
    """
    s = str(spec)
    if is_hub_spec(s):
        if hub is None:
            raise FormatError("a Hub spec needs a Hub resolver here", file=s,
                              hint="read it with lorakit.load (or lorakit.verbs.store.resolve)")
        return hub(s, allow_pickle)
    return Path(s)
