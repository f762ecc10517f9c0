"""Where the Hub is and how to talk to it, read at call time; ``huggingface_hub`` errors → :class:`HubError`.

``huggingface_hub`` reads its environment variables once, when it is imported. lorakit reads them on every
call and passes ``endpoint=``, ``token=`` and ``cache_dir=`` explicitly, so a changed environment (or a test's
loopback server) takes effect without re-importing anything.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from lorakit._deps import require
from lorakit.errors import HubError, OutputError

DEFAULT_ENDPOINT = "https://huggingface.co"
OFFLINE_HINT = (
    "check your connection, or pass --offline (or set HF_HUB_OFFLINE=1) to use what is already cached"
)


def hf() -> ModuleType:
    """``huggingface_hub``, or :class:`MissingDependencyError` naming the ``hub`` extra."""
    return require("huggingface_hub", "hub")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class HubSettings:
    """Connection settings for one call.

    Args:
        endpoint: base URL; ``LORAKIT_HUB_ENDPOINT`` overrides ``HF_ENDPOINT``, default ``https://huggingface.co``.
        token: ``HF_TOKEN`` when set; ``None`` lets ``huggingface_hub`` use the stored login.
        cache_dir: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``.
        offline: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``): no HTTP at all, the cache only.
    """

    endpoint: str
    token: str | None
    cache_dir: Path
    offline: bool


def settings(
    *, endpoint: str | None = None, token: str | None = None, cache_dir: str | Path | None = None,
    offline: bool | None = None,
) -> HubSettings:
    """Explicit arguments first, then the environment as it is now."""
    env = os.environ
    url = endpoint or env.get("LORAKIT_HUB_ENDPOINT") or env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    if cache_dir is None:
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                                    "huggingface")
        cache_dir = env.get("HF_HUB_CACHE") or os.path.join(home, "hub")
    if offline is None:
        offline = _truthy(env.get("HF_HUB_OFFLINE")) or _truthy(env.get("TRANSFORMERS_OFFLINE"))
    return HubSettings(url.rstrip("/"), token or env.get("HF_TOKEN") or None, Path(cache_dir), offline)


def api(s: HubSettings):  # -> huggingface_hub.HfApi
    return hf().HfApi(endpoint=s.endpoint, token=s.token, library_name="lorakit")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP library's connection/timeout/protocol errors (``httpx2`` in huggingface_hub 2.x, ``httpx`` in 1.x)."""
    found: list[type[BaseException]] = []
    for name in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            found.append(importlib.import_module(name).TransportError)
    return tuple(found)


@contextlib.contextmanager
def hub_errors(
    s: HubSettings, repo_id: str, revision: str | None = None, filename: str | None = None
) -> Iterator[None]:
    """Translate ``huggingface_hub`` and network errors into one-line :class:`HubError` messages with a hint."""
    hf()  # the missing extra is named before anything else
    E = importlib.import_module("huggingface_hub.errors")
    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        yield
    except (HubError, OutputError):
        raise
    except E.GatedRepoError as e:
        raise HubError(
            f"{repo_id} is gated: its files need a token from an account that accepted its conditions",
            hint=f"accept the conditions at {s.endpoint}/{repo_id}, then set HF_TOKEN (or run `hf auth login`)",
        ) from e
    except E.RepositoryNotFoundError as e:
        raise HubError(
            f"repository {repo_id} not found on {s.endpoint} (or it is private and no valid token was sent)",
            hint="check the name; for a private repo set HF_TOKEN to a token that can read it",
        ) from e
    except E.RevisionNotFoundError as e:
        raise HubError(
            f"revision {revision!r} not found in {repo_id}",
            hint="use an existing branch, tag or commit, or leave out @REVISION for the default branch",
        ) from e
    except E.LocalEntryNotFoundError as e:
        if s.offline:
            raise HubError(
                f"{where}{'/' + filename if filename else ''} is not in the local cache {s.cache_dir} "
                "(offline mode)",
                hint="pull it once with network access (unset HF_HUB_OFFLINE, drop --offline)",
            ) from e
        raise HubError(f"cannot reach {s.endpoint} and {where} is not cached", hint=OFFLINE_HINT) from e
    except E.EntryNotFoundError as e:
        raise HubError(
            f"file {filename!r} is not in {where}" if filename else f"a file is missing from {where}",
            hint=f"list the repo's files at {s.endpoint}/{repo_id}/tree/{revision or 'main'}",
        ) from e
    except getattr(E, "OfflineModeIsEnabled", ConnectionError) as e:  # not in every release's errors module
        raise HubError(f"offline mode is enabled, so {s.endpoint} was not contacted", hint=OFFLINE_HINT) from e
    except _transport_errors() as e:
        raise HubError(f"cannot reach {s.endpoint}: {e}", hint=OFFLINE_HINT) from e
    except E.HfHubHTTPError as e:
        raise HubError(f"the Hub refused the request for {where}: {str(e).splitlines()[0]}") from e
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OutputError(
                f"disk full while writing {where} into {e.filename or s.cache_dir}",
                hint="free some space, or pull to another disk with -o DIR (or set HF_HUB_CACHE)",
            ) from e
        raise


def show_progress(enabled: bool) -> None:
    """Turn ``huggingface_hub``'s download bars on or off (process-wide; the CLI hides them for --quiet/--json)."""
    utils = importlib.import_module("huggingface_hub.utils")
    with warnings.catch_warnings():  # HF_HUB_DISABLE_PROGRESS_BARS=1 wins, and says so in a warning
        warnings.simplefilter("ignore")
        # Bars only on a terminal: in logs and captured output they are noise.
        on = enabled and sys.stderr.isatty()
        (utils.enable_progress_bars if on else utils.disable_progress_bars)()
