"""The shape of the code, checked: data flows one way through the layers, and no module
imports, however late, a module that imports it back (an import circle)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "bge_trio"

# Lower layers never import higher ones; a layer may import its own modules.
LAYERS = [
    {"__init__", "errors", "config", "logs", "cgroups", "metrics", "locks"},
    {"model"},
    {"memory", "process", "scoring"},
    {"scheduler"},
    {"engine"},
    {"api", "bulk", "hosting", "testing"},
    {"app", "probe_cli"},
    {"asgi", "cli"},
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(("bge_trio", *parts)).removesuffix(".__init__")
        found[name] = path
    return found


def _imports(name: str, path: Path) -> set[str]:
    """Every bge_trio module ``name`` imports: at the top, in functions, for types."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out |= {f"{base}.{alias.name}" for alias in node.names}
    return {module for module in out if module.startswith("bge_trio")}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {imported for imported in _imports(name, path) if imported in modules} - {name}
        for name, path in modules.items()
    }


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, layer in enumerate(LAYERS) if top in layer)


def test_every_import_goes_down_the_layers() -> None:
    upward = [
        f"{module} imports {imported}"
        for module, imports in _graph().items()
        for imported in imports
        if _layer(imported) > _layer(module)
    ]
    assert upward == []


def test_no_module_imports_itself_back() -> None:
    graph = _graph()
    circles = []
    # a module's import circle: a path from one of its imports back to it
    for start in graph:
        seen: set[str] = set()
        stack = list(graph[start])
        while stack:
            module = stack.pop()
            if module == start:
                circles.append(start)
                break
            if module not in seen:
                seen.add(module)
                stack.extend(graph[module])
    assert circles == []


def test_the_graph_sees_imports_inside_functions_and_for_types() -> None:
    """A guard on the guard: the late and the typing-only imports count."""
    graph = _graph()
    assert "bge_trio.engine.inputs" in graph["bge_trio.api.schemas"]  # at the top
    assert "bge_trio.bulk.command" in graph["bge_trio.cli"]  # inside a function
