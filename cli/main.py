"""``lorakit``: one console script, verbs discovered from ``lorakit.cli.commands`` and imported on use.

Errors: a :class:`LorakitError` prints ``error: <file>: <module>: <cause>`` and a hint on stderr, exit 1, no
traceback (``LORAKIT_DEBUG=1`` shows it); usage errors exit 2.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import warnings
from typing import Any

import click

from lorakit import __version__
from lorakit.errors import LorakitError, LorakitWarning

EPILOG = """\b
Examples:
  lorakit inspect examples/style.safetensors
  lorakit merge examples/style.safetensors examples/detail.safetensors -o merged.safetensors
  lorakit convert examples/style.safetensors --to peft -o style-peft/
"""


def _debug() -> bool:
    return os.environ.get("LORAKIT_DEBUG", "") not in ("", "0")


def fail(message: str, hint: str | None = None) -> None:
    click.echo(f"error: {message}", err=True)
    if hint:
        click.echo(f"hint: {hint}", err=True)


def _show_warnings(caught: list[warnings.WarningMessage]) -> None:
    """lorakit's own warnings (lossy steps...) as one ``warning:`` line each; others only under LORAKIT_DEBUG."""
    seen = set()
    for w in caught:
        text = str(w.message)
        if text in seen:
            continue
        seen.add(text)
        if issubclass(w.category, LorakitWarning):
            click.echo(f"warning: {text}", err=True)
        elif _debug():
            click.echo(f"warning ({w.category.__name__}): {text}", err=True)


class LazyGroup(click.Group):
    """Lists verbs from the ``commands`` package; imports a verb's module only when it runs or shows help."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        from . import commands

        return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(commands.__path__)
                      if not m.name.startswith("_"))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.list_commands(ctx):
            return None
        module = importlib.import_module(f"lorakit.cli.commands.{name.replace('-', '_')}")
        return module.command

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as e:
            import difflib

            close = difflib.get_close_matches(args[0], self.list_commands(ctx), n=1) if args else []
            if close:
                e.message += f" Did you mean {close[0]!r}?"  # type: ignore[misc]  # click sets it once; we extend it
            raise

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = super().invoke(ctx)
            _show_warnings(caught)
            return result
        except LorakitError as e:
            if _debug():
                raise
            fail(e.one_line(), e.hint)
            ctx.exit(1)
        except KeyboardInterrupt:
            fail("interrupted; no output was written")
            ctx.exit(130)
        except OSError as e:  # disk full, permissions: not our bug, but not worth a traceback either
            if _debug():
                raise
            fail(f"{e.filename + ': ' if getattr(e, 'filename', None) else ''}{e.strerror or e}")
            ctx.exit(1)


@click.group(cls=LazyGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lorakit")
def cli() -> None:
    """lorakit: LoRA adapters as data. Merge, resize, inspect, convert, quantize and sync them, exactly."""


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="lorakit")


if __name__ == "__main__":
    main(sys.argv[1:])
