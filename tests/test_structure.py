"""The architecture as tests: layers, no private names across modules, no stage importing another, no cycles.

Read from the source with ``ast`` (nothing is imported), so a violation fails here with the
file and line, before it breaks something at run time. Imports inside functions count too;
imports for type annotations only (``if TYPE_CHECKING:``) count everywhere but in the cycle
check, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("storage", "pipeline", "stages")
# errors -> storage -> pipeline -> stages -> cli: a module may import its own layer and those before it
LAYERS = {"distill": 0, "distill.errors": 0, "distill.storage": 1, "distill.pipeline": 2, "distill.stages": 3,
          "distill.cli": 4}
# the one cycle allowed: the backend registry imports its backends when asked for one, and they import its base class
LAZY_REGISTRY = {("distill.storage.backend", "distill.storage.zarr_backend"),
                 ("distill.storage.backend", "distill.storage.parquet_backend")}
COMPOSER = "distill.stages.demo"  # runs the other stages end to end: may call their public functions


def package_modules() -> dict[str, Path]:
    """{"distill.pipeline.losses": path, ...} for every module of the installed package."""
    modules = {"distill": ROOT / "__init__.py", "distill.errors": ROOT / "errors.py", "distill.cli": ROOT / "cli.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            name = f"distill.{package}" if path.stem == "__init__" else f"distill.{package}.{path.stem}"
            modules[name] = path
    return modules


MODULES = package_modules()
OTHER_CODE = sorted([*(ROOT / "benchmarks").glob("*.py"), *(ROOT / "tests").rglob("*.py")])


def imports(path: Path, typing_only: bool = True) -> list[tuple[str, str | None, ast.AST]]:
    """(module, imported name or None, node) for every `import distill...` / `from distill... import name` in a file.

    ``typing_only=False`` leaves out imports under ``if TYPE_CHECKING:``, which never run.
    """
    tree = ast.parse(path.read_text(), str(path))
    skipped = set() if typing_only else {id(n) for block in ast.walk(tree) if _is_type_checking(block)
                                         for n in ast.walk(block)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node) for alias in node.names if alias.name.split(".")[0] == "distill"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "distill":
            found += [(node.module, alias.name, node) for alias in node.names]
    return found


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def target(module: str, name: str | None) -> str:
    """The module an import loads: ``from distill.storage import fs`` loads distill.storage.fs."""
    return f"{module}.{name}" if name is not None and f"{module}.{name}" in MODULES else module


def layer(module: str) -> int:
    return max(level for prefix, level in LAYERS.items() if module == prefix or module.startswith(prefix + "."))


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{node.lineno}"


def module_aliases(path: Path) -> dict[str, str]:
    """Local names bound to distill modules in a file (``import distill.storage.fs as fs``, ``from distill import storage``)."""
    aliases = {}
    for module, name, node in imports(path):
        for alias in node.names:
            if name is None and alias.name == module:
                aliases[alias.asname or module.split(".")[0]] = module if alias.asname else "distill"
            elif alias.name == name and target(module, name) != module:
                aliases[alias.asname or name] = target(module, name)
    return aliases


def private_uses(path: Path) -> list[str]:
    """Underscore names of another module imported or reached through a module alias, with where."""
    bad = [f"{where(path, node)} imports {module}.{name}" for module, name, node in imports(path)
           if name is not None and name.startswith("_") and not name.startswith("__")]
    aliases = module_aliases(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                and node.attr.startswith("_") and not node.attr.startswith("__"):
            bad.append(f"{where(path, node)} uses {aliases[node.value.id]}.{node.attr}")
    return bad


@pytest.mark.parametrize("path", [*MODULES.values(), *OTHER_CODE], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_name_crosses_a_module_boundary(path):
    assert private_uses(path) == []


def test_no_stage_imports_another_stage():
    bad = [f"{where(path, node)}: {name} imports {target(module, imported)}"
           for name, path in MODULES.items() if name.startswith("distill.stages.") and name != COMPOSER
           for module, imported, node in imports(path)
           if target(module, imported).startswith("distill.stages.") and target(module, imported) != name]
    assert bad == []


def test_each_layer_imports_only_itself_and_the_layers_below():
    bad = [f"{where(path, node)}: {name} imports {target(module, imported)}"
           for name, path in MODULES.items() for module, imported, node in imports(path)
           if layer(target(module, imported)) > layer(name)]
    assert bad == []


def import_graph() -> dict[str, set[str]]:
    graph = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for module, imported, _ in imports(path, typing_only=False):
            dependency = target(module, imported)
            if dependency in MODULES and dependency != name and (name, dependency) not in LAZY_REGISTRY:
                graph[name].add(dependency)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle_but_the_backend_registry():
    assert cycles(import_graph()) == []


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The checks themselves: a private import, a private attribute through an alias, a cycle."""
    bad = tmp_path / "bad.py"
    bad.write_text("from distill.stages.train import _x\nfrom distill.storage import fs\nfs._y()\n")
    assert len(private_uses(bad)) == 2
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    typed = tmp_path / "typed.py"
    typed.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from distill.errors import DistillError\n")
    assert len(imports(typed)) == 1 and imports(typed, typing_only=False) == []
    assert layer("distill.pipeline.losses") == 2 and layer("distill.errors") == 0
