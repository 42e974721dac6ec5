"""The package's import graph: no cycles, and the low layers import nothing above them.

Read from the source (every ``import`` statement, function-level ones included), not from what happens to be
imported at run time, so a cycle hidden inside a function is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mulan

ROOT = Path(mulan.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its source."""
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                # `from mulan import distributed` imports the module mulan.distributed
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_function_level_and_from_package_imports():
    graph = import_graph()
    assert "mulan.distributed" in graph["mulan.train"]  # `from mulan import distributed`
    assert "mulan.plots" in graph["mulan.cli"]  # imported inside a function


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_distributed_imports_nothing_above_it():
    """torchrun plumbing sits under training and evaluation: it may use errors and config only."""
    assert import_graph()["mulan.distributed"] <= {"mulan.errors", "mulan.config"}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every package module ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_reachable_follows_imports_through_other_modules():
    assert reachable({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a"}}, "a") == {"b", "c"}


def test_only_the_command_line_reaches_the_trainer():
    """Inference sits below training: the model is built where it is defined (mulan.diffusion.build_model), so
    loading, evaluating, comparing, sampling, exporting and compressing never import the training loop."""
    graph = import_graph()
    assert {m for m in graph if "mulan.train" in graph[m]} == {"mulan.cli"}
    for module in ("mulan.loading", "mulan.compare", "mulan.report", "mulan.sampling", "mulan.export", "mulan.plots",
                   *(m for m in graph if m.startswith("mulan.coding"))):
        assert not reachable(graph, module) & {"mulan.train", "mulan.cli"}, module
