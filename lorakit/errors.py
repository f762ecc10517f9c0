"""The whole exception and warning hierarchy of lorakit.

Every error lorakit raises derives from :class:`LorakitError`, so ``except LorakitError`` catches them all.
Errors carry structured fields (file, module, shapes, key) from which the CLI builds a one-line message with
a next step; :meth:`LorakitError.hint` supplies that next step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class LorakitError(Exception):
    """Root of every error lorakit raises.

    Args:
        message: the cause, one line.
        file: the file the error is about, if any.
        module: the adapter module the error is about, if any.
        hint: what the user can do next (shown after the cause by the CLI).
    """

    default_hint: str | None = None

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        module: str | None = None,
        hint: str | None = None,
        **fields: Any,
    ) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.module = module
        self._hint = hint
        self.fields = fields
        super().__init__(self.one_line())

    @property
    def hint(self) -> str | None:
        return self._hint or self.default_hint

    def one_line(self) -> str:
        """``file: module: message`` with whichever parts are known."""
        parts = [p for p in (self.file, f"module {self.module}" if self.module else None) if p]
        return ": ".join([*parts, self.message])


@contextlib.contextmanager
def naming_file(path: str | Path | None) -> Iterator[None]:
    """Inside the block, a :class:`LorakitError` that names no file is attributed to ``path`` (the input the
    operation was reading), so the CLI's one line says which file was at fault."""
    try:
        yield
    except LorakitError as e:
        if e.file is None and path is not None:
            e.file = str(path)
            e.args = (e.one_line(),)
        raise


class AdapterError(LorakitError, ValueError):
    """Invalid adapter content."""


class ShapeMismatchError(AdapterError):
    """Factor shapes that do not fit together, or adapters whose modules have different shapes."""


class IncompatibleAdaptersError(AdapterError):
    """Adapters that cannot be combined: different module sets or different base models."""

    default_hint = "pass --union or --intersection to combine adapters with different module sets"


class RankError(AdapterError):
    """A requested rank outside ``[1, min(out, in)]`` (or otherwise impossible)."""


class NonFiniteError(AdapterError):
    """NaN or Inf in a factor, or produced by an operation."""

    default_hint = "the file is damaged or the training diverged; re-export it from a good checkpoint"


class FormatError(LorakitError, ValueError):
    """A file that does not follow its format."""


class CorruptFileError(FormatError):
    """A safetensors file that is truncated, has a corrupt header, or lies about its offsets."""

    default_hint = "the file is damaged or incomplete; download or export it again"


class UnknownFormatError(FormatError):
    """Content-based detection found no format that fits."""

    default_hint = "is this a full model checkpoint rather than an adapter? `lorakit inspect` reads LoRA adapters"


class NotAFileError(FormatError):
    """Something that is not a regular file where one is expected: a directory, FIFO, device or socket, a symlink
    loop or a dangling link. Refused before any blocking read."""

    default_hint = "name a regular file (or the directory that holds it), not a pipe, device or link loop"


class ConfigValueError(FormatError):
    """A config value of the wrong type or out of range (``"r": "8"``, ``"lora_alpha": NaN``...); the message
    names the file and the key as written."""

    default_hint = "fix the value in the config (PEFT's save_pretrained writes a valid adapter_config.json)"


class KeyMappingError(FormatError):
    """A tensor or module name that the key map cannot place."""


class UnsafeFileError(FormatError):
    """A pickle (``.bin``/``.pt``/``.ckpt``) that is refused unless explicitly allowed."""

    default_hint = "pass --allow-pickle only if you trust the file's origin, or ask for a safetensors version"


class UnknownOperatorError(LorakitError, KeyError):
    """An operator (merge method, ...) name that is not registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.one_line()


class OperatorParameterError(LorakitError, TypeError):
    """An operator parameter that is missing, of the wrong type, or out of range."""


class NumericalError(LorakitError, ArithmeticError):
    """A numerical procedure that failed (did not converge, produced non-finite values)."""


class OutputError(LorakitError, OSError):
    """An output that cannot be written: it would overwrite an input, the directory is missing, disk full."""


class HubError(LorakitError, OSError):
    """A Hub operation that failed in a way we can explain (repo or revision not found, gated, offline...)."""


class MissingDependencyError(LorakitError, ImportError):
    """An optional dependency (extra) is not installed."""


class LorakitWarning(UserWarning):
    """Root of lorakit's warnings."""


class LossyOperationWarning(LorakitWarning):
    """An operation lost information (truncation, quantization); the report says how much."""
