"""Format conversion: read any format, write another; exact (factors and scales unchanged)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit.io.atomic import check_output_path
from lorakit.report import Report
from lorakit.verbs.engine import Output, streamed, write_adapter
from lorakit.verbs.store import load


def convert(
    source: str | Path, output: str | Path, to_format: str, *, allow_pickle: bool = False, **load_options: Any
) -> Report:
    """Convert ``source`` to ``to_format`` at ``output``; returns what was written.

    ``load_options`` go to :func:`lorakit.load` (``arch=``, ``base=`` for kohya/LyCORIS files).
    Non-LoRA tensors (PEFT ``modules_to_save``...) survive only a same-format rewrite; a note says so.
    """
    check_output_path(output, [source])
    adapter = load(source, allow_pickle=allow_pickle, **load_options)
    params = {"to": to_format, **{k: str(v) if isinstance(v, Path) else v for k, v in load_options.items()
                                  if v is not None and k != "keymap"}}
    # the next module read (and decoded) in the background while the writer writes one
    write_adapter(streamed(adapter), Output(output, "convert", params, (source,), to_format))
    report = Report(title=f"converted {adapter.meta.source_format} → {to_format}: {output}")
    report.summary = {"module_count": len(adapter), "parameters": adapter.num_params}
    if adapter.meta.passthrough and adapter.meta.source_format != to_format:
        report.notes.append(
            f"{len(adapter.meta.passthrough)} non-LoRA tensor(s) (e.g. modules_to_save) have no place in "
            f"{to_format} and were left out"
        )
    return report.finish(output=output, format=to_format, inputs=[adapter])
