"""``lorakit search``: LoRA adapters on the Hub, as a table."""

from __future__ import annotations

import click

from .._options import json_option


@click.command(epilog="""\b
Examples:
  lorakit search --base-model meta-llama/Llama-3.1-8B
  lorakit search --query anime --tag diffusers --limit 10
""")
@click.option("--base-model", default=None, help="Only adapters of this base model (Hub id).")
@click.option("--query", default=None, help="Text the repo name must contain.")
@click.option("--tag", "tags", multiple=True, help="A tag every hit must carry (repeatable).")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True, help="Most hits to show.")
@json_option
def command(base_model: str | None, query: str | None, tags: tuple[str, ...], limit: int, as_json: bool) -> None:
    """Find adapters on the Hugging Face Hub: repo, downloads, likes, last update, format."""
    from lorakit.hub import search, search_report

    from .._output import emit

    hits = search(base_model=base_model, query=query, tags=tags, limit=limit)
    emit(search_report(hits, base_model=base_model, query=query), as_json=as_json)
