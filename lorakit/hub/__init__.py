"""Sync with the Hugging Face Hub on top of ``huggingface_hub``: :func:`pull`, :func:`push`, :func:`search`.

``huggingface_hub`` is optional (the ``hub`` extra) and imported only when one of these runs. Every call reads
the endpoint (``LORAKIT_HUB_ENDPOINT`` > ``HF_ENDPOINT``), token (``HF_TOKEN``), cache (``HF_HUB_CACHE``) and
offline mode (``HF_HUB_OFFLINE``) at call time and passes them to the client explicitly.
"""

from lorakit.hub.pull import PulledFile, PullResult, hub_origin, pull, resolve_spec
from lorakit.hub.push import PushResult, push
from lorakit.hub.search import SearchHit, search, search_report
from lorakit.hub.spec import HubSpec, parse_spec, safe_repo_path

__all__ = [
    "HubSpec", "PullResult", "PulledFile", "PushResult", "SearchHit", "hub_origin", "parse_spec", "pull", "push",
    "resolve_spec", "safe_repo_path", "search", "search_report",
]
