"""The service's layout: app.py only assembles, route modules are leaves of it, and the imports form no cycle."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

from tests.conftest import ROOT

SERVER = ROOT / "server"
ROUTE_MODULES = {"server.api", "server.v2", "server.feedback", "server.page"}


def imports(path: Path) -> tuple[set[str], list[str]]:
    """The server.* modules a file imports at module level, and any import written inside a function."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "server":
            if node.module == "server":
                found |= {f"server.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("server.")}
    nested = [
        f"{path.name}:{inner.lineno}"
        for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
        for inner in ast.walk(function)
        if isinstance(inner, ast.Import | ast.ImportFrom)
    ]
    return found, nested


def graph() -> dict[str, set[str]]:
    return {f"server.{path.stem}": imports(path)[0] for path in SERVER.glob("*.py") if path.stem != "__init__"}


def test_the_server_imports_form_no_cycle():
    try:
        order = list(TopologicalSorter(graph()).static_order())
    except CycleError as error:
        pytest.fail(f"import cycle: {' -> '.join(error.args[1])}")
    assert order.index("server.app") > order.index("server.api")


def test_nothing_imports_the_assembler_and_only_it_imports_the_routes():
    for module, imported in graph().items():
        assert "server.app" not in imported, f"{module} imports server.app"
        if module != "server.app":
            assert not imported & ROUTE_MODULES - {module}, f"{module} imports a route module"


def test_no_import_hides_inside_a_function():
    nested = [place for path in SERVER.glob("*.py") for place in imports(path)[1]]
    assert not nested, f"imports inside functions: {nested}"


def test_app_only_assembles():
    tree = ast.parse((SERVER / "app.py").read_text())
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}
    classes = [node.name for node in tree.body if isinstance(node, ast.ClassDef)]
    assert functions <= {"create_app", "lifespan", "load_model"} and not classes, (functions, classes)
