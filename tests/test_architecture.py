"""The layering rules, checked on the source: runtime <- sdk; passes never reach for the CLI,
devices or the searches; no import cycles between the SDK's modules (lazy imports included)."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

SDK = ROOT / "sdk"


def module_name(path: Path) -> str:
    rel = path.relative_to(SDK).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(["edgesmith", *parts])


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (function bodies too), as absolute names."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else \
        module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            mod = node.module or ""
            full = (f"{base}.{mod}" if mod else base) if node.level else mod
            found.add(full)
            found |= {f"{full}.{a.name}" for a in node.names}
    return found


def sdk_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in SDK.rglob("*.py")}
    return {name: {i for i in imports_of(path) if i in files and i != name}
            for name, path in files.items()}


def test_device_runtime_imports_neither_the_sdk_nor_onnx_nor_torch():
    for path in (ROOT / "device_runtime").rglob("*.py"):
        bad = {i for i in imports_of_runtime(path)
               if i.split(".")[0] in ("edgesmith", "sdk", "onnx", "torch", "click", "rich")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def imports_of_runtime(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
        {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}


def test_passes_never_import_the_cli_devices_or_searches():
    forbidden = ("edgesmith.cli", "edgesmith.devices", "edgesmith.optimize.pipeline", "edgesmith.measure",
                 "edgesmith.search.tune", "edgesmith.search.int8", "edgesmith.report.text")
    for path in (SDK / "passes").glob("*.py"):
        bad = {i for i in imports_of(path) if i.startswith(forbidden)}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_no_import_cycles_in_the_sdk():
    graph = sdk_graph()
    # a package's __init__ importing its own submodules is how registries load: not a cycle
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
