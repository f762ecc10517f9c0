"""``search``: LoRA adapters on the Hub, optionally for one base model, most downloaded first.

One ``list_models`` call: the Hub's tags do the filtering (``base_model:adapter:<id>``, which the Hub derives
from a card's ``base_model`` + ``base_model_relation: adapter``; ``lora`` otherwise), ``search`` matches the
repo name, and the file names and tags of each hit give a cheap guess of its format.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lorakit.hub._client import api, hub_errors, settings
from lorakit.report import Report

EXPAND = ["downloads", "likes", "lastModified", "tags", "library_name", "siblings"]


@dataclass(frozen=True)
class SearchHit:
    """One adapter repo found on the Hub."""

    repo_id: str
    downloads: int | None
    likes: int | None
    updated: str | None
    format: str


def guess_format(files: Sequence[str], tags: Sequence[str]) -> str:
    """``peft`` (an ``adapter_config.json``), ``diffusers`` (``pytorch_lora_weights.*``), ``kohya``/``lycoris``
    (tagged so), ``single-file`` (other ``.safetensors``), ``pickle`` (only ``.bin``/``.pt``), or ``-``."""
    names = {f.rsplit("/", 1)[-1] for f in files}
    tagset = {t.lower() for t in tags}
    if "adapter_config.json" in names:
        return "peft"
    if any(n.startswith("pytorch_lora_weights.") for n in names):
        return "diffusers"
    if "lycoris" in tagset:
        return "lycoris"
    if tagset & {"kohya", "sd-scripts", "kohya-ss"}:
        return "kohya"
    if "peft" in tagset:
        return "peft"
    if any(n.endswith(".safetensors") for n in names):
        return "single-file"
    if any(n.endswith((".bin", ".pt", ".ckpt")) for n in names):
        return "pickle"
    return "-"


def search(
    *,
    base_model: str | None = None,
    query: str | None = None,
    tags: Sequence[str] = (),
    limit: int = 20,
    endpoint: str | None = None,
    token: str | None = None,
) -> list[SearchHit]:
    """Adapters on the Hub, most downloaded first.

    Args:
        base_model: only adapters of this base model (tag ``base_model:adapter:<id>``).
        query: a substring of the repo name.
        tags: further tags every hit must carry (e.g. ``peft``, ``diffusers``).
        limit: at most this many hits.
    """
    s = settings(endpoint=endpoint, token=token)
    filters = [f"base_model:adapter:{base_model}"] if base_model else ["lora"]
    filters += [t for t in tags if t not in filters]
    with hub_errors(s, base_model or "the Hub"):
        models = list(api(s).list_models(filter=filters, search=query or None, sort="downloads", limit=limit,
                                          expand=EXPAND))
    hits = []
    for m in models:
        updated = m.last_modified.strftime("%Y-%m-%d") if getattr(m, "last_modified", None) else None
        files = [x.rfilename for x in (m.siblings or [])]
        hits.append(SearchHit(m.id, m.downloads, m.likes, updated, guess_format(files, m.tags or [])))
    return hits


def search_report(
    hits: Sequence[SearchHit], *, base_model: str | None = None, query: str | None = None
) -> Report:
    """The hits as a table: repo, downloads, likes, updated, format."""
    parts = (f"for {base_model}" if base_model else "", f"matching {query!r}" if query else "")
    what = " ".join(x for x in parts if x)
    r = Report(title=f"{len(hits)} adapter(s) on the Hub {what}".rstrip(),
               columns=["repo", "downloads", "likes", "updated", "format"])
    for h in hits:
        r.add_row(h.repo_id, h.downloads, h.likes, h.updated, h.format)
    return r
