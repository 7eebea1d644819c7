"""The package's import graph has no cycle, and every module imports on its own in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "frugaldiff"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))


def _imports(module: str) -> set[str]:
    """The package modules ``module`` imports, anywhere in it (inside functions too)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                names = [node.module] if node.module else [alias.name for alias in node.names]
            elif node.module and node.module.split(".")[0] == "frugaldiff":
                names = [".".join(node.module.split(".")[1:2]) or alias.name for alias in node.names]
            else:
                continue
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("frugaldiff.")]
        else:
            continue
        found |= {n.split(".")[0] for n in names if n.split(".")[0] in MODULES}
    return found - {module}


def test_the_import_graph_has_no_cycle():
    graph = {m: _imports(m) for m in MODULES}
    assert graph["trainer"] and "config" in graph["components"]  # the parser sees the imports
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            pytest.fail("import cycle: " + " -> ".join([*path[path.index(module):], module]))
        if module in done:
            return
        for dependency in sorted(graph[module]):
            visit(dependency, [*path, module])
        done.add(module)

    for module in MODULES:
        visit(module, [])


def test_every_module_imports_on_its_own():
    """Each in a fresh interpreter (the package's ``__init__`` loads its names lazily, so a module's own imports
    decide the order); four at a time, as most of each run is importing torch."""
    def start(module: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", f"import frugaldiff.{module}"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    pending, running = list(MODULES), []
    while pending or running:
        while pending and len(running) < 4:
            module = pending.pop()
            running.append((module, start(module)))
        module, process = running.pop(0)
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, f"frugaldiff.{module}: {err[-2000:]}"
