"""What every benchmark records: the machine, the versions, wall time and peak memory of a command.

Peak memory of a child process is the kernel's high-water mark of its resident set (``wait4``'s
``ru_maxrss``, nothing polls it while it runs); in-process peaks use ``resource.getrusage`` high-water marks,
which never go down, so every measurement that needs its own peak runs in a fresh process.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
import threading
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


def run_measured(cmd: list[str], *, env: dict[str, str] | None = None) -> Measured:
    """Run ``cmd``; return its wall time and peak resident memory (the kernel's ``ru_maxrss`` of the child and the
    descendants it waited for, from ``wait4``, as ``/usr/bin/time`` reports it).

    Nothing polls the child while it runs: a sampler at 5 ms intervals (the earlier harness) took a quarter of
    a core, which on a 2-core machine slowed the two-thread runs it measured."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    streams: dict[str, str] = {}

    def drain(name: str, stream) -> None:  # type: ignore[no-untyped-def]
        streams[name] = stream.read()

    readers = [threading.Thread(target=drain, args=(n, s), daemon=True)
               for n, s in (("out", proc.stdout), ("err", proc.stderr))]
    for th in readers:
        th.start()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    for th in readers:
        th.join()
    return Measured(elapsed, usage.ru_maxrss / 1024, proc.returncode, streams.get("out", ""), streams.get("err", ""))


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
