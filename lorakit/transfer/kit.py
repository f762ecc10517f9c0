"""The transfer kit (what ``prepare`` stores beside an adapter) and a run's resumable state.

Kit layout (a directory)::

    KIT/kit.json            task descriptor, source base (spec + fingerprint), settings, lorakit version
    KIT/seeds.jsonl         the seed examples {"input", "output"}
    KIT/adapter/            the task LoRA (PEFT layout, lorakit-written)
    KIT/discriminator/      the discriminator LoRA on the source base (PEFT layout)

Run layout (``OUT/``), each stage's artifact written atomically when the stage (or a round of it) ends::

    OUT/state.json          parameters of the run (a resume refuses different ones) and finished stages
    OUT/synthetic.jsonl     one line per generation round: {"round", "generator", "inputs", "accepted"}
    OUT/teacher.jsonl       {"input", "output"} for the N accepted inputs
    OUT/student.ckpt        student LoRA + optimizer state after the last finished epoch
    OUT/adapter/            the transferred LoRA on the target (PEFT layout)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import FormatError, LorakitError

KIT_VERSION = 1


def read_examples(path: str | Path) -> list[tuple[str, str]]:
    """Task examples from a jsonl file: one ``{"input": str, "output": str}`` object per line (blank lines
    skipped). Raises :class:`FormatError` with the line number on malformed lines."""
    path = Path(path)
    if not path.is_file():
        raise FormatError("no such file", file=path)
    out: list[tuple[str, str]] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FormatError(f"line {lineno} is not valid JSON ({e.msg})", file=path,
                                  hint='each line must be an object like {"input": "...", "output": "..."}') from e
            if not isinstance(row, dict) or not isinstance(row.get("input"), str) or not isinstance(
                    row.get("output"), str):
                raise FormatError(f'line {lineno} needs string fields "input" and "output"', file=path)
            if "\n" in row["input"] or "\n" in row["output"]:
                raise FormatError(f"line {lineno}: fields must be single-line text", file=path)
            out.append((row["input"], row["output"]))
    if not out:
        raise FormatError("no examples in the file", file=path)
    return out


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write rows atomically (temporary file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_json(path: Path, obj: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@dataclass(frozen=True)
class Kit:
    """A transfer kit on disk."""

    path: Path
    task: str
    source_base: str
    source_fingerprint: str
    seeds: list[tuple[str, str]]
    info: dict[str, Any]

    @property
    def threshold(self) -> float:
        """The discriminator's accept threshold on log p(yes) − log p(no) (0, the paper's rule, in older kits)."""
        return float(self.info.get("discriminator", {}).get("threshold", 0.0))

    @property
    def adapter_path(self) -> Path:
        return self.path / "adapter"

    @property
    def discriminator_path(self) -> Path:
        return self.path / "discriminator"

    @classmethod
    def load(cls, path: str | Path) -> Kit:
        path = Path(path)
        meta = path / "kit.json"
        if not meta.is_file():
            raise FormatError("not a transfer kit (no kit.json)", file=path,
                              hint="create one with `lorakit transfer prepare ADAPTER --base SRC --data task.jsonl`")
        try:
            info = json.loads(meta.read_text(encoding="utf-8"))
            task, base, fp = info["task"], info["source_base"], info["source_fingerprint"]
        except (ValueError, KeyError) as e:
            raise FormatError(f"kit.json is malformed ({e})", file=meta) from e
        for sub in ("adapter", "discriminator"):
            if not (path / sub).exists():
                raise FormatError(f"the kit lacks its {sub}/ directory", file=path)
        seeds = read_examples(path / "seeds.jsonl")
        if len(seeds) < int(info.get("num_seeds", 0)):
            raise FormatError(f"the seeds file has {len(seeds)} examples, fewer than the {info['num_seeds']} the kit "
                              "was made with", file=path / "seeds.jsonl", hint="restore the kit's seeds.jsonl")
        return cls(path, task, base, fp, seeds, info)


class RunState:
    """``OUT/state.json``: the run's parameters and finished stages; refuses to resume a different run."""

    def __init__(self, out: Path, params: Mapping[str, Any]) -> None:
        self.out = out
        self.file = out / "state.json"
        out.mkdir(parents=True, exist_ok=True)
        if self.file.exists():
            old = json.loads(self.file.read_text(encoding="utf-8"))
            if old.get("params") != json.loads(json.dumps(params)):
                changed = sorted(k for k in set(old.get("params", {})) | set(params)
                                 if old.get("params", {}).get(k) != json.loads(json.dumps(params)).get(k))
                raise LorakitError(f"the output directory holds a run with other parameters ({', '.join(changed)})",
                                   file=out, hint="use a new -o directory, or repeat the original parameters")
            self.state = old
        else:
            self.state = {"params": dict(params), "done": []}
            write_json(self.file, self.state)

    def done(self, stage: str) -> bool:
        return stage in self.state["done"]

    def finish(self, stage: str, **facts: Any) -> None:
        if stage not in self.state["done"]:
            self.state["done"].append(stage)
        self.state.setdefault("facts", {})[stage] = facts
        write_json(self.file, self.state)
