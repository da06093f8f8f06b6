"""The package's import structure: every module imports on its own, the graph of imports between
adamerge's modules (lazy ones inside functions included) has no cycle, and no module imports another
module's private name."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "adamerge"


def module_names() -> dict[str, Path]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        if f.is_relative_to(PKG / "data"):  # the benchmark recipe shipped as data (a file pools load), not a module
            continue
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported adamerge module, names taken from it) for every import statement of the module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name in modules]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target not in modules:
                continue
            names = [a.name for a in node.names]
            submodules = [n for n in names if f"{target}.{n}" in modules]
            out += [(f"{target}.{n}", []) for n in submodules]
            out.append((target, [n for n in names if n not in submodules]))
    return out


def test_every_module_imports_on_its_own():
    code = ("import importlib, sys\n"
            f"for name in {sorted(module_names())!r}:\n"
            "    for m in [m for m in sys.modules if m == 'adamerge' or m.startswith('adamerge.')]:\n"
            "        del sys.modules[m]\n"
            "    importlib.import_module(name)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=PKG.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_no_import_cycles_and_no_private_imports():
    modules = module_names()
    graph: dict[str, set[str]] = {}
    private = []
    for name, path in modules.items():
        graph[name] = set()
        for target, names in imports(name, path, modules):
            if target != name and not name.startswith(target + "."):  # a module's own package is imported first anyway
                graph[name].add(target)
            private += [f"{name} imports {target}.{n}" for n in names if n.startswith("_") and target != name]
    assert not private, private
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(path[path.index(nxt):] + [node, nxt])
            if nxt not in state:
                visit(nxt, path + [node] if nxt != node else path)
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert len(graph) > 40  # the walk saw the whole package
