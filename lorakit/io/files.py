"""Opening what the user named as a file, safely: regular files only, JSON of bounded depth.

A FIFO, character device or socket where a file is expected would block a plain ``open``/``read`` forever (or
read without end from ``/dev/zero``), a directory fails with a confusing errno, and a symlink loop looks like a
missing file to :meth:`pathlib.Path.exists`. :func:`open_regular` opens with ``O_NONBLOCK`` (which never blocks,
even on a FIFO without a writer) and checks ``fstat`` on the opened descriptor, so the check and the read see
the same file. JSON nested deeper than :data:`MAX_JSON_DEPTH` (headers and configs are 2-4 levels deep) is
refused as a ``ValueError`` instead of surfacing as a ``RecursionError`` from the decoder or later consumers.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorakit.errors import NotAFileError

MAX_JSON_DEPTH = 64


def describe_mode(mode: int) -> str:
    """What kind of file ``st_mode`` is, in words."""
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def path_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be read as a file (symlink loop, dangling link, not a regular file), or ``None``.

    A missing path gives ``None`` too: callers say "no such file" in their own words."""
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop (too many levels of symbolic links)"
        if e.errno == errno.ENOENT and os.path.lexists(p):
            return "dangling symbolic link (its target does not exist)"
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        return e.strerror or str(e)
    if not stat.S_ISREG(st.st_mode):
        return f"{describe_mode(st.st_mode)}, not a regular file"
    return None


def open_regular(path: str | Path, *, what: str = "file") -> int:
    """An ``O_RDONLY`` descriptor of ``path``, which must be a regular file.

    Raises:
        NotAFileError: a directory, FIFO, device or socket, a symlink loop or dangling link, or unreadable.
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno == errno.ELOOP:
            cause = "symbolic link loop (too many levels of symbolic links)"
        elif e.errno == errno.EISDIR:
            cause = f"is a directory, not a {what}"
        elif e.errno == errno.ENOENT and os.path.lexists(p):
            cause = "dangling symbolic link (its target does not exist)"
        else:
            cause = f"cannot open: {e.strerror or e}"
        raise NotAFileError(cause, file=p) from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotAFileError(f"{describe_mode(st.st_mode)}, not a regular {what}", file=p)
    os.set_blocking(fd, True)
    return fd


def read_bytes(path: str | Path, *, limit: int, what: str = "file") -> bytes:
    """The whole content of a regular file of at most ``limit`` bytes (refused otherwise: a config that large is
    not a config)."""
    fd = open_regular(path, what=what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise NotAFileError(f"{size} bytes is too large for a {what} (limit {limit})", file=path)
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit + 1)
    finally:
        os.close(fd)


def json_depth_ok(obj: Any, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """True if ``obj`` (parsed JSON) nests at most ``max_depth`` containers deep; iterative, O(nodes)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node  # type: ignore[assignment]
        else:
            continue
        if depth > max_depth:
            return False
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return True


def loads_json(text: str | bytes, *, object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
               max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that raises ``ValueError`` (never ``RecursionError``) for JSON nested too deeply."""
    try:
        obj = json.loads(text, object_pairs_hook=object_pairs_hook)
    except RecursionError:
        raise ValueError(f"nested too deeply (more than {max_depth} levels)") from None
    if not json_depth_ok(obj, max_depth):
        raise ValueError(f"nested too deeply (more than {max_depth} levels)")
    return obj
