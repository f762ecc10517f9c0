"""``lorakit pull REPO[@REVISION] [-o DIR]``: download an adapter's files from the Hub, verified."""

from __future__ import annotations

import click

from .._options import allow_pickle_option, dry_run_option, json_option, quiet_option


@click.command(epilog="""\b
Examples:
  lorakit pull someorg/style-lora
  lorakit pull someorg/style-lora@v2 -o style/
  lorakit pull hf://someorg/loras/anime.safetensors
  lorakit pull someorg/style-lora --offline        # from the cache only (also: HF_HUB_OFFLINE=1)
\b
Only adapter files are fetched (weights, adapter_config.json, README.md); each is checked against the
sha256 (LFS files) or git blob id that the Hub lists. Pickled weights are refused without --allow-pickle.
Environment: HF_TOKEN, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_ENDPOINT (LORAKIT_HUB_ENDPOINT overrides it).
""")
@click.argument("repo")
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Put real copies in this folder instead of the shared Hugging Face cache.")
@click.option("--offline", is_flag=True, default=None, help="Use only the local cache; no network.")
@allow_pickle_option
@json_option
@quiet_option
@dry_run_option
def command(repo: str, output: str | None, offline: bool | None, allow_pickle: bool, as_json: bool, quiet: bool,
            dry_run: bool) -> None:
    """Download an adapter from the Hugging Face Hub and print where it is."""
    from lorakit.hub import pull
    from lorakit.hub._client import show_progress

    from .._output import emit

    show_progress(not (quiet or as_json))
    result = pull(repo, output=output, offline=offline or None, allow_pickle=allow_pickle, dry_run=dry_run)
    emit(result.report(), as_json=as_json, quiet=quiet)
