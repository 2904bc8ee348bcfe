"""The package's layers are one-way: no module imports a higher layer, none imports efformer inside a
function, and the package-level import graph has no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "efformer"

# Lowest first; a module may import its own unit or any unit of a lower rank, never a higher one.
# Units at the same rank are independent of each other.
LAYERS: list[set[str]] = [
    {"errors", "version", "assets", "durable"},
    {"options", "results"},
    {"registry"},
    {"nn", "kernels"},
    {"mixers"},
    {"models"},
    {"data"},
    {"train", "bench"},
    {"arena", "interop"},
    {"compress", "reduce", "serve"},
    {"cli", "__init__"},
]
RANK = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    """The layer unit of a dotted module name: its first component below ``efformer``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1] if len(parts) > 1 else parts
    return ".".join(parts) if parts != ["efformer", "__init__"] else "efformer"


def imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int, bool]]:
    """(imported efformer module, line, inside a function) for every import in ``tree``."""
    out = []
    func_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            func_lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against this module's package
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            if name == "efformer" or name.startswith("efformer."):
                out.append((name, node.lineno, node.lineno in func_lines))
    return out


def all_modules():
    for path in sorted(SRC.rglob("*.py")):
        yield path, module_name(path), ast.parse(path.read_text(), filename=str(path))


def test_every_unit_has_a_layer():
    units = {unit_of(m) for _, m, _ in all_modules()}
    assert units - set(RANK) == set(), "add new packages to LAYERS in tests/test_layers.py"


def test_no_module_imports_a_higher_layer():
    bad = []
    for path, mod, tree in all_modules():
        src = unit_of(mod)
        for name, line, _ in imports(tree, mod, path.name == "__init__.py"):
            dst = unit_of(name)
            if dst == "__init__" and name == "efformer" and src != "__init__":
                bad.append(f"{mod}:{line} imports the top-level package efformer")
            elif dst != src and dst in RANK and RANK[dst] >= RANK[src]:
                bad.append(f"{mod}:{line} ({src}, layer {RANK[src]}) imports {name} ({dst}, layer {RANK[dst]})")
    assert bad == []


def test_no_efformer_import_inside_a_function():
    bad = [f"{mod}:{line} imports {name} inside a function"
           for path, mod, tree in all_modules()
           for name, line, inside in imports(tree, mod, path.name == "__init__.py") if inside]
    assert bad == []


def test_package_level_import_graph_is_acyclic():
    graph: dict[str, set[str]] = {}
    for path, mod, tree in all_modules():
        src = unit_of(mod)
        for name, _, _ in imports(tree, mod, path.name == "__init__.py"):
            dst = unit_of(name)
            if dst != src and not (dst == "__init__" and name != "efformer"):
                graph.setdefault(src, set()).add(dst)
    seen, stack = set(), []

    def visit(node):
        if node in stack:
            pytest.fail("import cycle: " + " -> ".join(stack[stack.index(node):] + [node]))
        if node in seen:
            return
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        stack.pop()
        seen.add(node)

    for node in sorted(graph):
        visit(node)


def test_checker_catches_an_upward_and_a_function_level_import():
    """The checks above can fail: an nn module importing models, inside a function, is caught."""
    tree = ast.parse("def f():\n    from efformer.models import create_model\n")
    found = imports(tree, "efformer.nn.fake", False)
    assert found == [("efformer.models", 2, True), ("efformer.models.create_model", 2, True)]
    assert RANK[unit_of(found[0][0])] > RANK[unit_of("efformer.nn.fake")]
