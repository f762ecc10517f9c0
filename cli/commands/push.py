"""``lorakit push FILE|DIR REPO``: publish an adapter to the Hub with a model card carrying its provenance."""

from __future__ import annotations

import click

from .._options import dry_run_option, json_option, quiet_option


@click.command(epilog="""\b
Examples:
  lorakit push merged.safetensors me/merged-lora
  lorakit push style-peft/ me/style --private --base-model meta-llama/Llama-3.1-8B
  lorakit push style-peft/ me/style --revision experiment --dry-run
\b
The repo is created if needed. Files are uploaded in their own format, with absolute local paths removed
from their metadata, and a README.md card with base_model, library_name, tags and lorakit's provenance
(operation, parameters, seed, and every input's repo, revision and sha256). Needs HF_TOKEN (or a login).
""")
@click.argument("adapter", type=click.Path(exists=True))
@click.argument("repo")
@click.option("--private", is_flag=True, help="Create the repo as private (only when it does not exist yet).")
@click.option("--revision", default=None, help="Branch to commit to (created from main if missing).")
@click.option("--base-model", default=None, help="Base model Hub id for the card and config.")
@click.option("-m", "--message", default=None, help="Commit message.")
@json_option
@quiet_option
@dry_run_option
def command(adapter: str, repo: str, private: bool, revision: str | None, base_model: str | None,
            message: str | None, as_json: bool, quiet: bool, dry_run: bool) -> None:
    """Publish an adapter file or folder to a Hugging Face Hub repo."""
    from lorakit.hub import push

    from .._output import emit

    result = push(adapter, repo, private=private, revision=revision, base_model=base_model,
                  commit_message=message, dry_run=dry_run)
    emit(result.report(), as_json=as_json, quiet=quiet)
