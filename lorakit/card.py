"""Model cards for published adapters: the Hub's front matter plus lorakit's provenance, and reading them back.

Front matter (what the Hub indexes, formats-and-hub.md §9.4): ``base_model``, ``base_model_relation: adapter``,
``library_name`` (``peft`` or ``diffusers``; none for kohya files) and ``tags`` (``lora``,
``base_model:adapter:<id>``, the format, ``lorakit``). lorakit's own record sits under the ``lorakit`` key:
the format, the operation that produced the adapter, its parameters (seed included) and every input with its
repo, revision and sha256. The same record is rendered as a table in the card's body for people.

Cards are built and parsed with ``huggingface_hub.ModelCard`` (safe YAML), so they need the ``hub`` extra.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lorakit._deps import require

LIBRARY_BY_FORMAT = {"peft": "peft", "diffusers": "diffusers"}
EXTRA_TAGS = {
    "peft": ["transformers"],
    "diffusers": ["text-to-image", "diffusers", "template:sd-lora"],
    "kohya": ["kohya", "sd-scripts"],
}

_BODY = """# {title}

A {fmt} LoRA adapter{for_base}, published with lorakit.

## Use it

```bash
lorakit pull {repo_id}
lorakit inspect hf://{repo_id}
```

## Files

| file | size (bytes) | sha256 |
| --- | ---: | --- |
{file_rows}

## Provenance

{provenance}
"""


def is_hub_id(name: str | None) -> bool:
    """True for ``org/name``-like ids (not local paths or checkpoint file names such as kohya's
    ``ss_sd_model_name``), which the Hub can link as ``base_model``."""
    if not name or name.startswith(("/", "~", ".", "\\")) or ":" in name or "\\" in name:
        return False
    if name.lower().endswith((".ckpt", ".safetensors", ".pt", ".pth", ".bin")):
        return False
    parts = name.split("/")
    return len(parts) in (1, 2) and all(parts)


def card_metadata(
    *, fmt: str, base_model: str | None, provenance: Mapping[str, Any] | None, extra_tags: Sequence[str] = ()
) -> dict[str, Any]:
    """The front matter as a plain dict (see the module docstring)."""
    tags = ["lora", *EXTRA_TAGS.get(fmt, []), "lorakit"]
    meta: dict[str, Any] = {}
    if is_hub_id(base_model):
        meta["base_model"] = base_model
        meta["base_model_relation"] = "adapter"
        tags.insert(1, f"base_model:adapter:{base_model}")
    if fmt in LIBRARY_BY_FORMAT:
        meta["library_name"] = LIBRARY_BY_FORMAT[fmt]
    meta["tags"] = list(dict.fromkeys([*tags, *extra_tags]))
    meta["lorakit"] = {"format": fmt, **({"provenance": dict(provenance)} if provenance else {})}
    return meta


def _provenance_text(provenance: Mapping[str, Any] | None) -> str:
    if not provenance:
        return "No lorakit operation recorded: the adapter was uploaded as it was given."
    params = provenance.get("parameters") or {}
    op, version = provenance.get("operation", "?"), provenance.get("lorakit_version", "?")
    lines = [f"- operation: `{op}` (lorakit {version})"]
    lines.append(f"- parameters: `{json.dumps(params, sort_keys=True, default=str)}`")
    if "seed" in params:
        lines.append(f"- seed: `{params['seed']}`")
    inputs = provenance.get("inputs") or []
    if inputs:
        lines += ["", "| input | repo | revision | sha256 |", "| --- | --- | --- | --- |"]
        for i in inputs:
            lines.append(f"| {i.get('path_in_repo') or i.get('path', '-')} | {i.get('repo', '(local file)')} "
                         f"| {i.get('revision', '-')} | `{i.get('sha256', '-')}` |")
    return "\n".join(lines)


def build_card(
    *, repo_id: str, fmt: str, base_model: str | None, provenance: Mapping[str, Any] | None,
    files: Mapping[str, tuple[int, str]], extra_tags: Sequence[str] = (),
) -> Any:
    """A ``huggingface_hub.ModelCard`` for an adapter.

    Args:
        repo_id: where it is published.
        fmt: lorakit format name (``peft``, ``kohya``, ``diffusers``).
        base_model: the base model id (omitted from the front matter if it is not a Hub id).
        provenance: ``lorakit.provenance`` of the adapter (operation, parameters, inputs).
        files: ``path_in_repo → (size, sha256)`` of the uploaded files.
    """
    hf = require("huggingface_hub", "hub")
    data = hf.ModelCardData(**card_metadata(fmt=fmt, base_model=base_model, provenance=provenance,
                                            extra_tags=extra_tags))
    rows = "\n".join(f"| `{n}` | {size} | `{sha}` |" for n, (size, sha) in sorted(files.items()))
    body = _BODY.format(
        title=repo_id.split("/")[-1], fmt=fmt, repo_id=repo_id, file_rows=rows,
        for_base=f" for `{base_model}`" if is_hub_id(base_model) else "",
        provenance=_provenance_text(provenance),
    )
    return hf.ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def read_card(path_or_text: str | Path) -> dict[str, Any]:
    """The front matter of a card (a :class:`~pathlib.Path` to read, or the card's text) as a dict, parsed with
    the safe YAML loader."""
    hf = require("huggingface_hub", "hub")
    text = path_or_text.read_text(encoding="utf-8") if isinstance(path_or_text, Path) else path_or_text
    return hf.ModelCard(text, ignore_metadata_errors=True).data.to_dict()
