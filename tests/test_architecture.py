"""The layering rules, checked on the source: runtime <- sdk; passes/ holds only passes, which
never reach for the CLI, devices, runs or searches; the searches sit side by side (none imports
another); the run object is the only place a device name becomes a device; no private name
crosses a module; no import cycles between the SDK's modules (lazy imports included)."""
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


def test_passes_never_import_the_cli_devices_runs_or_searches():
    forbidden = ("edgesmith.cli", "edgesmith.devices", "edgesmith.pipeline", "edgesmith.measure",
                 "edgesmith.run", "edgesmith.search", "edgesmith.report")
    for path in (SDK / "passes").glob("*.py"):
        bad = {i for i in imports_of(path) if i.startswith(forbidden)}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_passes_holds_only_passes():
    """Every module in passes/ registers at least one pass; helpers live elsewhere
    (onnx_utils, torch_interp)."""
    for path in (SDK / "passes").glob("*.py"):
        if path.name != "__init__.py":
            assert "@register(" in path.read_text(), \
                f"{path.relative_to(ROOT)} registers no pass: move it out of passes/"


def test_every_pass_takes_a_dataclass_config():
    """`apply(model, cfg)`: cfg is a dataclass (its fields validated where it is made), or
    None for a pass without options; never an int, a dict or a list."""
    import dataclasses
    import inspect
    import typing

    from edgesmith.passes import load_all

    for name, fn in load_all().items():
        cfg = list(inspect.signature(fn).parameters.values())[1]
        hint = typing.get_type_hints(fn).get(cfg.name)
        if hint is None:
            assert cfg.default is None, f"pass {name}: an unannotated config must default to None"
            continue
        kinds = [k for k in typing.get_args(hint) or (hint,) if k is not type(None)]
        assert len(kinds) == 1 and dataclasses.is_dataclass(kinds[0]), \
            f"pass {name} takes {hint}: give it a dataclass config"


SEARCHES = ("edgesmith.search.int8", "edgesmith.search.tune", "edgesmith.search.nas",
            "edgesmith.search.select")


def test_searches_sit_side_by_side():
    graph = sdk_graph()
    for search in SEARCHES:
        others = {d for d in graph[search] if d.startswith(SEARCHES) and
                  not d.startswith(search)}
        assert not others, f"{search} imports the search(es) {sorted(others)}"


def test_only_the_run_object_resolves_devices():
    """A device name becomes a device in edgesmith.run alone (its `resolve` and `Run.open`)."""
    for path in SDK.rglob("*.py"):
        name = module_name(path)
        if name.startswith(("edgesmith.run", "edgesmith.devices")):
            continue
        assert "edgesmith.devices.get_device" not in imports_of(path), \
            f"{path.relative_to(ROOT)} resolves devices itself: use edgesmith.run"


def test_no_module_shadows_the_public_api():
    """`edgesmith.optimize(...)` and `device_runtime.serve(...)` are functions: a submodule of
    that name would replace one on its package as soon as anything imported the submodule
    (the second call then fails: 'module' object is not callable)."""
    import inspect

    import device_runtime
    import edgesmith

    for package, folder in ((edgesmith, SDK), (device_runtime, ROOT / "device_runtime")):
        functions = [n for n, v in vars(package).items()
                     if inspect.isfunction(v) and not n.startswith("_")]
        assert functions, package
        for name in functions:
            assert not (folder / name).exists() and not (folder / f"{name}.py").exists(), \
                f"{folder.name}/{name} would shadow {package.__name__}.{name}()"


def test_no_private_name_crosses_a_module():
    for path in SDK.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                private = [a.name for a in node.names
                           if a.name.startswith("_") and not a.name.startswith("__")]
                assert not private, f"{path.relative_to(ROOT)} imports {private} from " \
                    f"{node.module}: make it public where it lives, or move it"


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


def test_host_side_model_runs_go_through_host_runs():
    """A run on the host is one C call that neither a timeout nor Ctrl-C reaches unless it goes
    through edgesmith.host_runs; the only other InferenceSession (model.py's load check)
    creates a session and never runs it."""
    for path in SDK.rglob("*.py"):
        if path.name == "host_runs.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr == "InferenceSession":
                assert path.name == "model.py", \
                    f"{path.relative_to(ROOT)}:{node.lineno} makes its own InferenceSession: " \
                    "use edgesmith.host_runs.host_session"
