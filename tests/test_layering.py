"""The package's import graph stays a one-way street.

Module-level imports (those that run when a module loads, including under a top-level ``if`` or
``try``) form no cycle between modules nor between subpackages, and ``mi_compile.kernels`` is a
leaf: it imports nothing else of the package. Imports inside functions are left out (they run
late, on purpose)."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "mi_compile"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _load_time_nodes(tree: ast.Module):
    for node in tree.body:
        yield node
        if isinstance(node, (ast.If, ast.Try)):
            for child in ast.walk(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    yield child


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports at load time."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        targets = set()
        for node in _load_time_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[:len(package) - node.level + 1] + ([node.module] if node.module else [])
                    name = ".".join(base)
                else:
                    name = node.module or ""
                for alias in node.names:
                    sub = f"{name}.{alias.name}"
                    targets.add(sub if sub in files else name)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[mod] = {t for t in targets if t in files and t != mod}
    return graph


def find_cycle(graph: dict[str, set[str]]):
    """One cycle of ``graph`` as a list of nodes, or None."""
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _subpackage(mod: str) -> str:
    return ".".join(mod.split(".")[:2])


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_module_import_cycle():
    assert find_cycle(import_graph()) is None


def test_no_subpackage_import_cycle():
    packages = {}
    for mod, targets in import_graph().items():
        packages.setdefault(_subpackage(mod), set()).update(
            _subpackage(t) for t in targets if _subpackage(t) != _subpackage(mod))
    assert find_cycle(packages) is None


@pytest.mark.parametrize("leaf", ["mi_compile.kernels"])
def test_kernels_are_a_leaf(leaf):
    outside = {(mod, t) for mod, targets in import_graph().items() if _subpackage(mod) == leaf
               for t in targets if _subpackage(t) != leaf}
    assert not outside, f"{leaf} imports from the rest of the package: {sorted(outside)}"
