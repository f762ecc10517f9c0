"""``python -m benchmarks [AREA ...] [--device D] [--assemble-only]``: run the suite, then assemble the record.

Each area is a module ``benchmarks/<area>.py`` with a ``main(argv)`` that writes ``docs/benchmarks/<area>.md``
(and may write JSON beside it). Every area runs in its own process so peak-memory readings do not leak between
them. ``--device`` (auto, cpu, cuda) goes to the areas that take it (``perf``); the others run on CPU.
Afterwards ``docs/benchmarks.md`` is rebuilt from every section in ``docs/benchmarks/``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from benchmarks._env import DOCS, ROOT, header_markdown

DEVICE_AREAS = {"perf"}  # areas whose main() takes --device
# Order of the record; each name is a module of this package with a main().
AREAS = ["perf", "merge", "resize", "extract", "inspect", "lego", "merge_quality", "quantize", "lq_lora", "transfer"]


def assemble() -> str:
    """docs/benchmarks.md: a header, then every section file, areas in AREAS order first."""
    sections = sorted(DOCS.glob("*.md"), key=lambda p: (AREAS.index(p.stem) if p.stem in AREAS else 99, p.stem))
    parts = [
        "# Benchmarks",
        "",
        "Every number here was measured by the scripts in `benchmarks/` (see each section for its command), on",
        "the machine named in the section. Regenerate with `python -m benchmarks` (all) or",
        "`python -m benchmarks AREA` (one), then `python -m benchmarks --assemble-only`.",
        "",
        f"Assembled on: {header_markdown()}",
        "",
    ]
    for p in sections:
        text = p.read_text().strip()
        parts += [text if text.startswith("#") else f"## {p.stem}\n\n{text}", ""]
    out = ROOT / "docs" / "benchmarks.md"
    out.write_text("\n".join(parts))
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description="Run lorakit's benchmark suite and assemble docs/benchmarks.md.")
    ap.add_argument("areas", nargs="*", help=f"areas to run (default: all of {', '.join(AREAS)})")
    ap.add_argument("--assemble-only", action="store_true", help="only rebuild docs/benchmarks.md")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda, for the perf area")
    args = ap.parse_args()
    if not args.assemble_only:
        for area in args.areas or AREAS:
            if not (ROOT / "benchmarks" / f"{area}.py").exists():
                print(f"skipping {area}: no benchmarks/{area}.py", file=sys.stderr)
                continue
            print(f"== {area}", flush=True)
            extra = ["--device", args.device] if area in DEVICE_AREAS else []
            subprocess.run([sys.executable, "-m", f"benchmarks.{area}", *extra], cwd=ROOT, check=True)
    print(f"wrote {assemble()}")


if __name__ == "__main__":
    main()
