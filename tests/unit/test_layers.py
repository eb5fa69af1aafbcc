"""The import graph of gateway/: layers run one way, no cycles, no reaching into another package's private names.

Layers, top to bottom (docs/architecture.md): the app factory and CLI; the protocol front ends (api/); the HTTP
front (front/); the routing chain (routing/); the request and stream core (core/); upstream clients, local
models and the state replicas share (upstream/, models/, state/); telemetry (telemetry/); settings and errors. A
module imports its own package and the layers below it, never one above.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GATEWAY = ROOT / "gateway"
LAYERS = [
    {"app", "cli", "__main__"},
    {"api"},
    {"front"},
    {"routing"},
    {"core"},
    {"upstream", "models", "state"},
    {"telemetry"},
    {"settings", "errors", "__init__"},
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in GATEWAY.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) for each `from gateway... import name` and `import gateway...` in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gateway":
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.append((submodule, None) if submodule in MODULES else (node.module, alias.name))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, None) for alias in node.names if alias.name.split(".")[0] == "gateway")
    return found


def _unit(module: str) -> str:
    """The layer unit a module belongs to: its package under gateway/, or its own name for a top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_has_a_layer():
    assert set(map(_unit, MODULES)) <= set(RANK), "a new package or top-level module needs a place in LAYERS"


def test_layers_run_one_way():
    upward = [
        f"{module} imports {imported}"
        for module, path in MODULES.items()
        for imported, _ in _imports(path)
        if _unit(imported) != _unit(module) and RANK[_unit(imported)] < RANK[_unit(module)]
    ]
    assert not upward


def test_no_private_names_across_packages():
    private = [
        f"{module} imports {imported}.{name}"
        for module, path in MODULES.items()
        for imported, name in _imports(path)
        if name and name.startswith("_") and _unit(imported) != _unit(module)
    ]
    assert not private


def test_no_import_cycles():
    graph = {module: {name for name, _ in _imports(path) if name in MODULES} for module, path in MODULES.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_the_checks_see_the_graph():
    """The walk above finds real imports (a parser that found none would pass every check)."""
    assert ("gateway.routing.chain", "dispatch") in _imports(MODULES["gateway.api.chat"])
    assert len(MODULES) > 30
