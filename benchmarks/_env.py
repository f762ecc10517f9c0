"""What every benchmark records: the machine, the versions, wall time and peak memory of a command.

Peak memory of a child process is the kernel's high-water mark of its resident set (``ru_maxrss``, taken by a small
launcher around it; nothing polls it while it runs); in-process peaks use ``resource.getrusage`` high-water marks,
which never go down, so every measurement that needs its own peak runs in a fresh process.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks"
OUT = ROOT / "bench-out"


def versions() -> dict[str, str]:
    """Versions of Python and of every package a benchmark compares against."""
    out = {"python": platform.python_version()}
    for pkg in ("torch", "safetensors", "numpy", "peft", "transformers", "huggingface_hub", "lorakit"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def machine() -> dict[str, str | int]:
    """CPU model, cores, memory and the accelerator (if any)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, str | int] = {"cpu": cpu, "cores": os.cpu_count() or 0, "os": platform.platform()}
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30)
    except ImportError:
        pass
    try:
        import torch

        info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu only"
    except ImportError:
        pass
    return info


def peak_rss_mb() -> float:
    """This process's peak resident set (MB): ``VmHWM``, which starts afresh at exec.

    ``ru_maxrss`` is only the fallback: Linux carries it over from the parent across fork and exec, so a child of a
    big parent would report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def markdown_table(columns: list[str], rows: list[list[object]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def header_markdown() -> str:
    m, v = machine(), versions()
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores, {m.get('memory_gb', '?')} GB, device: {m.get('device')}. "
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + "."
    )


@dataclass
class Measured:
    seconds: float
    peak_rss_mb: float
    returncode: int
    stdout: str
    stderr: str


# Runs argv[2:], then writes "wall_seconds maxrss_kb returncode" to argv[1]. It is small (~10 MB), and a child's
# ru_maxrss starts at its parent's resident set when forked, so a child of the benchmark process itself (hundreds
# of MB after loading PEFT) would report that instead of its own peak.
_LAUNCHER = """
import resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.call(sys.argv[2:])
dt = time.perf_counter() - t
with open(sys.argv[1], "w") as f:
    f.write(f"{dt} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss} {rc}")
"""


@functools.cache
def precompile_lorakit() -> None:
    """Byte-compile lorakit's sources once per benchmark process, as an installed lorakit has them (pip compiles
    a wheel's modules; a first import writes them). Where ``PYTHONDONTWRITEBYTECODE`` is set (this machine
    sets it) nothing writes them, so every measured process compiled the ~50 modules a merge imports: 0.12 s
    of a ``cat`` merge, against ``import torch``'s installed bytecode. Processes still may not write any."""
    import compileall
    import importlib.util

    for name in ("lorakit", "lorakit.cli"):
        spec = importlib.util.find_spec(name)
        for root in (spec.submodule_search_locations or []) if spec else []:
            compileall.compile_dir(root, quiet=1)


def run_measured(cmd: list[str], *, env: dict[str, str] | None = None) -> Measured:
    """Run ``cmd``; return its wall time and peak resident memory (the kernel's ``ru_maxrss`` of it and the
    descendants it waited for, as ``/usr/bin/time`` reports it), both taken by a small launcher process
    (:data:`_LAUNCHER`) around it, so neither includes the launcher's own start.

    Nothing polls the child while it runs: a sampler at 5 ms intervals (the earlier harness) took a quarter of
    a core, which on a 2-core machine slowed the two-thread runs it measured."""
    import tempfile

    precompile_lorakit()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "measured"
        proc = subprocess.run([sys.executable, "-c", _LAUNCHER, str(report), *cmd], capture_output=True, text=True,
                              env={**os.environ, **(env or {})})
        try:
            wall, maxrss_kb, rc = report.read_text().split()
        except (OSError, ValueError):  # the launcher itself failed
            return Measured(float("nan"), float("nan"), proc.returncode or 1, proc.stdout, proc.stderr)
    return Measured(float(wall), int(maxrss_kb) / 1024, int(rc), proc.stdout, proc.stderr)


def python_cmd(module_or_code: str, *args: str, code: bool = False) -> list[str]:
    return [sys.executable, "-c", module_or_code, *args] if code else [sys.executable, "-m", module_or_code, *args]


def timed(fn, *args, repeat: int = 1, **kwargs):  # type: ignore[no-untyped-def]
    """(best wall seconds over ``repeat`` calls, last result)."""
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - t0)
    return best, result
