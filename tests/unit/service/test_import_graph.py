"""The rooms' imports run one way (docs/ARCHITECTURE.md): no cycle anywhere in service/ or export/,
and no room reaches up into one above it. Read from the source (every import statement, those inside
functions and TYPE_CHECKING blocks too), so a lazy import cannot hide a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _modules() -> dict[str, Path]:
    found = {}
    for package in ("service", "export"):
        for path in (ROOT / package).rglob("*.py"):
            if "_proto" in path.parts:
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _imports(module: str) -> set[str]:
    """The service/export modules `module` imports (a `from package import name` counts the
    submodule when `name` is one)."""
    path = MODULES[module]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    return {t for t in targets if t in MODULES and t != module}


GRAPH = {module: _imports(module) for module in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    return found


def test_no_import_cycle() -> None:
    assert _cycles() == []


@pytest.mark.parametrize(
    ("room", "above"),
    [
        ("export", ("service",)),
        (
            "service.engine",
            ("service.frontend", "service.worker", "service.client", "service.cli", "service.multiprocess"),
        ),
        ("service.worker", ("service.frontend", "service.engine", "service.client", "service.cli")),
        ("service.catalog", ("service.frontend", "service.engine", "service.worker", "service.client")),
        (
            "service.observability",
            ("service.frontend", "service.engine", "service.worker", "service.catalog"),
        ),
        ("service.frontend", ("service.cli", "service.client", "service.multiprocess")),
    ],
)
def test_a_room_never_imports_a_room_above_it(room: str, above: tuple[str, ...]) -> None:
    reaching_up = sorted(
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        if module == room or module.startswith(room + ".")
        for target in targets
        if any(target == up or target.startswith(up + ".") for up in above)
    )
    assert reaching_up == []


def test_the_frontend_sees_the_engine_only_through_its_protocol() -> None:
    """The one exception is server.py building the in-process engine, inside a function: the
    frontend/engine process split replaces that line with a remote Engine."""
    allowed = {("service.frontend.server", "service.engine.engine")}
    seen = {
        (module, target)
        for module, targets in GRAPH.items()
        if module.startswith("service.frontend")
        for target in targets
        if target.startswith("service.engine") and target not in ("service.engine", "service.engine.protocol")
    }
    assert seen <= allowed, sorted(seen - allowed)
