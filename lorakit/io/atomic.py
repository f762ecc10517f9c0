"""Atomic outputs: write to a temporary sibling, rename into place on success, remove it on failure.

A failed command therefore leaves no partial file, and an existing output is replaced only once the new one is
complete. Outputs that would overwrite an input are refused before any work starts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from lorakit.errors import NotAFileError, OutputError


def check_output_path(output: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """Validate an output path before any work: not an input, parent directory exists.

    Raises:
        OutputError: the output equals (or contains, or lies inside) one of the inputs, or its parent is missing.
    """
    out = Path(output)
    resolved = _resolved(out, OutputError)
    for inp in inputs:
        p = _resolved(Path(inp), NotAFileError)
        if resolved == p or p in resolved.parents or resolved in p.parents:
            raise OutputError(
                f"output {out} would overwrite the input {inp}", file=out, hint="choose another -o/--output path"
            )
    if not resolved.parent.is_dir():
        raise OutputError(f"directory {out.parent} does not exist", file=out, hint="create it first")
    return out


def _resolved(path: Path, error: type[OutputError | NotAFileError]) -> Path:
    """``path.resolve()``, with a symlink loop (``RuntimeError`` on Python 3.11) as a one-line lorakit error."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as e:
        raise error("symbolic link loop (too many levels of symbolic links)", file=path) from e


@contextlib.contextmanager
def atomic_output(path: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on failure delete it.

    Args:
        path: the final file or directory.
        directory: yield a temporary directory instead of a file path.
    """
    final = Path(path)
    parent = final.parent if str(final.parent) else Path(".")
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if directory and final.is_dir():
            # Swap directories: move the old one aside, move the new one in, then drop the old one.
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=parent))
            old.rmdir()
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException as e:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise OutputError(f"cannot write: {e.strerror or e}", file=final) from e
        raise
