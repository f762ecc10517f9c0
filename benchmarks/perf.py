"""The performance record: lorakit end to end against the physical I/O floor, at several model sizes.

For each case (model shape × rank × number of adapters) the suite writes the input adapters (bf16, decaying
spectra) to ``bench-out/perf/``, then measures in fresh processes:

- ``lorakit merge … --method svd`` end to end (load, merge, save): wall time and peak resident memory;
- the physical floor: the time to read every input byte and write as many bytes as the output has, at the
  bandwidth measured on this machine right then (page cache warm, as for lorakit);
- ``lorakit resize`` of the first input to rank/4.

Results go to ``docs/benchmarks/perf.json`` (machine, device, versions, every number) and
``docs/benchmarks/perf.md``. Run: ``python -m benchmarks.perf [--quick] [--cases NAME,...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import zlib
from pathlib import Path

import torch

from benchmarks._env import DOCS, OUT, header_markdown, machine, run_measured, versions

SHAPES: dict[str, dict[str, object]] = {
    # name: hidden, intermediate, kv (k/v out), layers
    "tinyllama": {"hidden": 2048, "inter": 5632, "kv": 256, "layers": 22},
    "llama3-8b": {"hidden": 4096, "inter": 14336, "kv": 1024, "layers": 32},
    "llama3-70b": {"hidden": 8192, "inter": 28672, "kv": 1024, "layers": 80},
}
CASES = [
    # (shape, rank, adapters)
    ("tinyllama", 16, 2), ("tinyllama", 64, 2), ("tinyllama", 16, 8), ("tinyllama", 64, 8),
    ("llama3-8b", 16, 2), ("llama3-8b", 64, 2), ("llama3-8b", 16, 8),
    ("llama3-70b", 16, 2),
]
QUICK = [("tinyllama", 16, 2), ("llama3-8b", 16, 2)]


def module_shapes(name: str) -> dict[str, tuple[int, int]]:
    s = SHAPES[name]
    h, i, kv, layers = s["hidden"], s["inter"], s["kv"], s["layers"]
    per = {
        "self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i),
    }
    return {f"model.layers.{n}.{p}": shp for n in range(layers) for p, shp in per.items()}  # type: ignore[misc]


def make_adapters(shape: str, rank: int, n: int) -> list[Path]:
    """Write (or reuse) ``n`` PEFT-style single-file adapters; one module at a time, so memory stays small."""
    from lorakit.adapter import Adapter, AdapterMeta, ModuleInfo
    from lorakit.api import save
    from lorakit.testing import random_factors

    paths = []
    shapes = module_shapes(shape)
    for k in range(n):
        path = OUT / "perf" / f"{shape}-r{rank}-{k}.safetensors"
        paths.append(path)
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        infos = {m: ModuleInfo(m, o, i, rank, 2.0, torch.bfloat16) for m, (o, i) in shapes.items()}

        def one(m: str, k: int = k) -> object:
            o, i = shapes[m]
            g = torch.Generator().manual_seed(zlib.crc32(f"{m}/{k}".encode()))
            return random_factors(o, i, rank, scale=2.0, decay=0.85, generator=g, dtype=torch.bfloat16)

        adapter = Adapter({m: (lambda m=m: one(m)) for m in shapes}, AdapterMeta(source_format="peft"), infos)
        save(adapter, path, format="peft")
    return paths


def io_floor(inputs: list[Path], output_bytes: int) -> float:
    """Seconds to read every input byte and write ``output_bytes`` (page cache warm, no fsync, like lorakit)."""
    for p in inputs:  # warm the cache as lorakit's run found it
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    t0 = time.perf_counter()
    for p in inputs:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    scratch = OUT / "perf" / "floor.tmp"
    block = os.urandom(1 << 20) * 16
    with open(scratch, "wb") as f:
        left = output_bytes
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)
    elapsed = time.perf_counter() - t0
    scratch.unlink()
    return elapsed


def lorakit_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lorakit.cli.main", *args]


def run_case(shape: str, rank: int, n: int) -> dict[str, object]:
    inputs = make_adapters(shape, rank, n)
    out = OUT / "perf" / f"merged-{shape}-r{rank}-n{n}.safetensors"
    merged = run_measured(lorakit_cmd("merge", *map(str, inputs), "-o", str(out), "--method", "svd", "--quiet"),
                          env={"LORAKIT_DEBUG": "1"})
    if merged.returncode != 0:
        raise RuntimeError(f"lorakit merge failed: {merged.stderr[-2000:]}")
    floor = io_floor(inputs, out.stat().st_size)
    small = OUT / "perf" / f"resized-{shape}-r{rank}.safetensors"
    resized = run_measured(lorakit_cmd("resize", str(inputs[0]), "-o", str(small), "--rank", str(max(1, rank // 4)),
                                       "--quiet"), env={"LORAKIT_DEBUG": "1"})
    if resized.returncode != 0:
        raise RuntimeError(f"lorakit resize failed: {resized.stderr[-2000:]}")
    resize_floor = io_floor(inputs[:1], small.stat().st_size)
    in_bytes = sum(p.stat().st_size for p in inputs)
    result = {
        "shape": shape, "rank": rank, "adapters": n, "modules": len(module_shapes(shape)),
        "input_mb": round(in_bytes / 2**20, 1), "output_mb": round(out.stat().st_size / 2**20, 1),
        "merge_s": round(merged.seconds, 3), "merge_peak_rss_mb": round(merged.peak_rss_mb),
        "floor_s": round(floor, 3), "merge_over_floor": round(merged.seconds / floor, 1),
        "resize_s": round(resized.seconds, 3), "resize_peak_rss_mb": round(resized.peak_rss_mb),
        "resize_floor_s": round(resize_floor, 3),
    }
    out.unlink()
    small.unlink()
    return result


def baseline_rss_mb() -> float:
    """Peak RSS of a process that only imports lorakit and torch and parses the CLI: the fixed cost."""
    return run_measured(lorakit_cmd("--version")).peak_rss_mb


def markdown(results: list[dict[str, object]], base_rss: float, command: str) -> str:
    lines = [
        "## Performance record: end to end against the I/O floor",
        "",
        header_markdown(),
        "",
        f"Command: `{command}`. Each lorakit run is a fresh process (`python -m lorakit.cli.main`), so times include",
        "interpreter and torch start-up (about a second). The floor is the time to read the inputs and write the",
        "output's bytes at this machine's measured bandwidth in the same run, page cache warm.",
        f"A process that only starts lorakit peaks at {base_rss:.0f} MB resident.",
        "",
        "| shape | modules | rank | adapters | inputs MB | svd merge s | floor s | merge/floor | merge peak MB "
        "| resize→r/4 s | resize peak MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['shape']} | {r['modules']} | {r['rank']} | {r['adapters']} | {r['input_mb']} | {r['merge_s']} "
            f"| {r['floor_s']} | {r['merge_over_floor']} | {r['merge_peak_rss_mb']} | {r['resize_s']} "
            f"| {r['resize_peak_rss_mb']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the small cases")
    ap.add_argument("--cases", help="comma-separated shape names to run")
    ap.add_argument("--keep", action="store_true", help="keep the generated adapters in bench-out/perf")
    args = ap.parse_args(argv)
    cases = QUICK if args.quick else CASES
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = [c for c in cases if c[0] in wanted]
    base = baseline_rss_mb()
    results = []
    for case in cases:
        print(f"running {case} ...", flush=True)
        r = run_case(*case)
        print(r, flush=True)
        results.append(r)
    command = "python -m benchmarks.perf" + (" --quick" if args.quick else "") + (
        f" --cases {args.cases}" if args.cases else "")
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "perf.json").write_text(json.dumps(
        {"machine": machine(), "versions": versions(), "baseline_rss_mb": base, "command": command,
         "results": results}, indent=2) + "\n")
    (DOCS / "perf.md").write_text(markdown(results, base, command))
    if not args.keep:
        shutil.rmtree(OUT / "perf", ignore_errors=True)
    print((DOCS / "perf.md").read_text())


if __name__ == "__main__":
    main()
