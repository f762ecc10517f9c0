"""``python -m benchmarks.quantize [--layers N] [--rank R]``: adapter quantization, size and ΔW error.

Part 1, 8B-shaped adapters (Llama-3-8B projection shapes, decaying spectra): the anchors' only option is a
16-bit cast (PEFT/kohya save in fp16/bf16; sd-mecha casts dtypes), measured here in the same run on the same
adapter, against lorakit at 8/4/3/2 bits and mixed precision. Part 2, trained tiny adapters from
``benchmarks.tiny_tasks`` (when importable): the same table plus task accuracy after quantization.
Writes ``docs/benchmarks/quantize.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._env import markdown_table, peak_rss_mb

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks" / "quantize.md"
CONFIGS = [
    ("int8 (--bits 8)", {"bits": 8}),
    ("NF4 (--bits 4)", {"bits": 4}),
    ("NF3 (--bits 3)", {"bits": 3}),
    ("NF2 (--bits 2)", {"bits": 2}),
    ("mixed --avg-bits 3", {"bits": None, "avg_bits": 3.0}),
    ("mixed --avg-bits 2.5", {"bits": None, "avg_bits": 2.5}),
    ("mixed --error 0.05", {"bits": None, "error": 0.05}),
]


def header() -> str:
    try:
        from benchmarks._env import header_markdown

        return header_markdown()
    except ImportError:
        return (
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared). Versions: "
            f"python {platform.python_version()}, torch {torch.__version__}."
        )




def cast_error(adapter, dtype: torch.dtype) -> float:
    """Relative ΔW error of storing the factors in ``dtype`` (the anchors' 16-bit save), factored form."""
    from lorakit.quant.module import factored_error

    err2 = norm2 = 0.0
    for n in adapter:
        f = adapter[n]
        err2 += factored_error(f, f.to(dtype=dtype)) ** 2
        norm2 += f.norm() ** 2
    return math.sqrt(err2 / norm2)


def table_for(adapter, src: Path, tmp: Path, accuracy=None, block: int = 64) -> list[list[str]]:
    """Rows: format, bits/param, file MB, ratio to fp16, rel ΔW error, seconds [, accuracy]."""
    import lorakit
    from lorakit.verbs.quantize import quantize_adapter

    rows = []
    n_params = adapter.num_params
    fp16_mb = 2 * n_params / 2**20
    for name, dt in (
        ("fp32 (input)", torch.float32),
        ("bf16 cast (anchors)", torch.bfloat16),
        ("fp16 cast (anchors)", torch.float16),
    ):
        t0 = time.perf_counter()
        cast = adapter.map(lambda _n, f, dt=dt: f.to(dtype=dt))
        path = tmp / f"cast-{dt}.safetensors"
        lorakit.save(cast, path, format="peft")
        secs = time.perf_counter() - t0
        err = 0.0 if dt == torch.float32 else cast_error(adapter, dt)
        row = [
            name,
            f"{torch.finfo(dt).bits}",
            f"{path.stat().st_size / 2**10:.1f}",
            f"{path.stat().st_size / 2**20 / fp16_mb:.3f}",
            f"{err:.2e}",
            f"{secs:.1f}",
        ]
        if accuracy is not None:
            row.append(accuracy(lorakit.load(path)))
        rows.append(row)
    for name, kw in CONFIGS:
        out = tmp / "q.safetensors"
        t0 = time.perf_counter()
        rep = quantize_adapter(adapter, out, block=block, **kw)
        secs = time.perf_counter() - t0
        mb = out.stat().st_size / 2**20
        row = [
            name,
            f"{rep.summary['bits_per_param']:.3f}",
            f"{mb * 1024:.1f}",
            f"{mb / fp16_mb:.3f}",
            f"{rep.summary['rel_error']:.2e}",
            f"{secs:.1f}",
        ]
        if accuracy is not None:
            row.append(accuracy(lorakit.load(out)))
        rows.append(row)
        print(" | ".join(row), flush=True)
    return rows




def eight_b(layers: int, rank: int, decay: float, tmp: Path) -> tuple[str, list[list[str]]]:
    import lorakit
    from lorakit.testing import llama_shapes, random_adapter

    adapter = random_adapter(llama_shapes(layers), rank=rank, decay=decay, scale=2.0, seed=0)
    src = tmp / "a.safetensors"
    lorakit.save(adapter, src, format="peft")
    desc = (
        f"{len(adapter)} modules ({layers} layers × 7 Llama-3-8B projections), rank {rank}, "
        f"σ_i ∝ {decay}^i, {adapter.num_params / 1e6:.1f} M parameters, fp32"
    )
    return desc, table_for(lorakit.load(src), src, tmp)


def trained(tmp: Path, rank: int) -> tuple[str, list[str], list[list[str]]] | None:
    try:
        from benchmarks import tiny_tasks  # type: ignore[attr-defined]
    except ImportError:
        return None
    import lorakit

    base, _vocab = tiny_tasks.build_base(0)
    tasks = tiny_tasks.make_tasks(0)
    blocks = []
    sizes: set[int] = set()
    rows_all: list[list[str]] = []
    for task in tasks:
        adapter = tiny_tasks.train_adapter(base, task, rank, 0)
        src = tmp / "t.safetensors"
        lorakit.save(adapter, src, format="peft")
        # Tiny layers may be narrower than 64: use the largest block that divides every row.
        dims = {d for i in adapter.infos().values() for d in (i.out_features, i.in_features)}
        block = max(b for b in (64, 32, 16, 8, 4, 2, 1) if all(d % b == 0 for d in dims))
        sizes.add(block)
        rows = table_for(
            lorakit.load(src),
            src,
            tmp,
            accuracy=lambda a, task=task: f"{tiny_tasks.evaluate(base, a, task):.3f}",
            block=block,
        )
        name = getattr(task, "name", str(task))
        rows_all += [[name, *r] for r in rows]
        blocks.append(name)
    desc = f"{len(tasks)} tasks ({', '.join(blocks)}), rank {rank}, block {'/'.join(map(str, sorted(sizes)))}"
    return desc, ["task"], rows_all


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--decay", type=float, default=0.85)
    p.add_argument("--tiny-rank", type=int, default=8)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cols = ["storage", "bits/param", "file KiB", "× fp16 size", "rel ΔW error", "seconds"]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        desc, rows = eight_b(args.layers, args.rank, args.decay, tmp)
        tiny = trained(tmp, args.tiny_rank)
    cmd = "python -m benchmarks.quantize " + " ".join(argv if argv is not None else sys.argv[1:])
    parts = [
        "## Adapter quantization",
        "",
        (f"Command: `{cmd.strip()}`. {header()} Load average at start: {load:.1f} (shared machine; seconds are "
        f"wall time and only indicative). Peak RSS of the run: {peak_rss_mb():.0f} MB."),
        "",
        ("bits/param counts codes and every stored constant (absmax, double-quantization scales and offsets) "
        "against the original rank·(out+in) parameters; rel ΔW error is ‖ΔW − ΔŴ‖_F/‖ΔW‖_F over the whole adapter, "
        "computed in factored form (no dense ΔW). No anchor quantizes adapters: their smallest option is a 16-bit "
        "cast, measured on the same adapter in the same run. Mixed rows choose 0/2/3/4/8 bits per singular "
        "direction per module (block 64, double quantization everywhere)."),
        "",
        f"### 8B-shaped adapter: {desc}",
        "",
        markdown_table(cols, rows),
        "",
    ]
    if tiny is None:
        parts += [
            "### Trained tiny adapters",
            "",
            "Skipped: `benchmarks.tiny_tasks` is not importable in this checkout; re-run after it lands.",
            "",
        ]
    else:
        tdesc, extra, trows = tiny
        parts += [
            f"### Trained tiny adapters: {tdesc}",
            "",
            markdown_table([*extra, *cols, "accuracy"], trows),
            "",
        ]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(parts))
    print("\n".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
