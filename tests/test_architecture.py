"""Imports point down only: every module of lorakit/ and cli/ (installed as lorakit.cli) belongs to one layer, and
no module imports a higher layer or takes part in an import cycle between packages/modules.

Every ``import`` counts, at module top level and inside functions (a lazy import is still a dependency).
Run alone: ``python -m pytest tests/test_architecture.py -q``. See docs/architecture.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top. A module may import its own layer or any layer below. The longest matching prefix decides.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("lorakit.errors", "lorakit._deps", "lorakit.__version__")),
    ("core", ("lorakit.factors", "lorakit.adapter", "lorakit.device", "lorakit.threads", "lorakit.run", "lorakit.algebra", "lorakit.linalg", "lorakit.report",
              "lorakit.describe", "lorakit.card", "lorakit.testing")),
    ("io", ("lorakit.io", "lorakit.provenance")),
    # Quantization math and the quantized-module type: pure tensors, no files; the quantized format stores it.
    ("quant", ("lorakit.quant",)),
    ("formats", ("lorakit.formats",)),
    # Operators on Adapters / LoraFactors (and the transfer models and training loop).
    ("ops", ("lorakit.ops", "lorakit.transfer")),
    ("hub", ("lorakit.hub",)),
    # One module per command: load → plan → stream → save → report.
    ("verbs", ("lorakit.verbs", "lorakit.pipeline", "lorakit.transfer.pipeline")),
    ("api", ("lorakit.api", "lorakit")),  # `lorakit` itself: the package's __init__, the Python front door
    ("cli", ("lorakit.cli",)),
]
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}

# Upward edges that remain, each with why and how it goes. The test fails if one disappears: delete its line.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "cli":
        parts = ["lorakit", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    files = [*sorted((ROOT / "lorakit").rglob("*.py")), *sorted((ROOT / "cli").rglob("*.py"))]
    return {module_name(f): f for f in files}


def layer_of(module: str) -> str:
    best, best_len = None, -1
    for name, prefixes in LAYERS:
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = name, len(p)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return best


def imports(path: Path, module: str) -> list[tuple[str, int]]:
    """Every lorakit module ``path`` imports (top level and inside functions), with its line."""
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    out: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target == "lorakit" and all(a.name == "__version__" for a in node.names):
                target = "lorakit.__version__"  # the version constant, not the front door
            out.append((target, node.lineno))
    return [(t, line) for t, line in out if t == "lorakit" or t.startswith("lorakit.")]


def unit(module: str) -> str:
    """The node of the cycle check: a top-level package or module of lorakit (cli: its own units)."""
    parts = module.split(".")
    if parts[:2] == ["lorakit", "cli"]:
        return ".".join(parts[:3])
    if module == "lorakit.transfer.pipeline":
        return module  # a verb living in the transfer package
    return ".".join(parts[:2])


def edges() -> list[tuple[str, str, Path, int]]:
    return [(m, t, p, line) for m, p in modules().items() for t, line in imports(p, m)]


def where(p: Path, line: int) -> str:
    return f"{p.relative_to(ROOT)}:{line}"


def test_every_module_has_a_layer():
    for m in modules():
        layer_of(m)


def test_no_upward_imports():
    bad, seen = [], set()
    for m, t, p, line in edges():
        if RANK[layer_of(t)] > RANK[layer_of(m)]:
            seen.add((m, t))
            if (m, t) not in KNOWN_UPWARD:
                bad.append(f"{where(p, line)}: {m} ({layer_of(m)}) imports {t} ({layer_of(t)})")
    assert not bad, "imports of a higher layer:\n" + "\n".join(bad)
    gone = sorted(set(KNOWN_UPWARD) - seen)
    assert not gone, f"allowlisted upward edges no longer exist, remove them from KNOWN_UPWARD: {gone}"


def test_no_import_cycles_between_units():
    """Tarjan's strongly connected components over units (allowlisted edges left out: they are known)."""
    graph: dict[str, dict[str, str]] = {}
    for m, t, p, line in edges():
        a, b = unit(m), unit(t)
        if a != b and (m, t) not in KNOWN_UPWARD and b != "lorakit.__version__":
            graph.setdefault(a, {}).setdefault(b, where(p, line))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    lines = []
    for comp in cycles:
        for a in comp:
            lines += [f"{graph[a][b]}: {a} -> {b}" for b in graph.get(a, {}) if b in comp]
    assert not cycles, "import cycles:\n" + "\n".join(lines)


def test_the_checker_sees_function_level_imports(tmp_path):
    """The scan is not blind to lazy imports (the kind that hid the old upward edges)."""
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from lorakit.api import load\n    from .x import y\n")
    assert imports(f, "lorakit.ops.m") == [("lorakit.api", 2), ("lorakit.ops.x", 3)]
    assert RANK[layer_of("lorakit.api")] > RANK[layer_of("lorakit.ops.m")]
