"""Start-up stays light: ``--version``, ``--help`` and a verb's ``--help`` import no heavy package.

Functional, not timed: each check runs in a fresh interpreter and reads ``sys.modules`` after the work.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

HEAVY = ("torch", "numpy", "scipy", "safetensors", "rich", "huggingface_hub", "transformers", "peft",
         "diffusers", "lycoris")


def _loaded_after(code: str) -> list[str]:
    probe = (
        f"{code}\n"
        "import sys\n"
        f"print('LOADED:', *(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return out.rsplit("LOADED:", 1)[1].split()


def test_import_cli_main_imports_nothing_heavy():
    assert _loaded_after("import lorakit.cli.main") == []


def test_import_lorakit_is_lazy_and_its_names_still_work():
    assert _loaded_after("import lorakit; assert lorakit.__version__") == []
    code = ("import lorakit\n"
            "assert callable(lorakit.load) and callable(lorakit.save)\n"
            "assert lorakit.Adapter.__name__ == 'Adapter' and lorakit.LoraFactors.__name__ == 'LoraFactors'\n"
            "assert issubclass(lorakit.LorakitError, Exception)\n"
            "assert {'load', 'save', 'Adapter'} <= set(dir(lorakit))\n"
            "from lorakit import load, ModuleInfo, AdapterMeta\n")
    assert "torch" in _loaded_after(code)
    with pytest.raises(subprocess.CalledProcessError):
        _loaded_after("import lorakit; lorakit.no_such_name")


def _verbs() -> list[str]:
    from lorakit.cli import commands

    return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(commands.__path__)
                  if not m.name.startswith("_"))


@pytest.mark.parametrize("argv", [["--version"], ["--help"], *([v, "--help"] for v in _verbs())])
def test_cli_version_and_help_import_nothing_heavy(argv):
    code = (
        "import sys\n"
        "from lorakit.cli.main import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "sys.stdout.flush()\n"
    )
    loaded = _loaded_after(code)
    assert loaded == [], f"lorakit {' '.join(argv)} imported {loaded}"
