"""No import cycles between the package's modules (counting imports inside functions too, which
only hide a cycle from the interpreter, not from a reader), and the benchmark's tables read an
evaluation run without importing the code that writes it."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO_ROOT

SRC = REPO_ROOT / "src"
#: Cycles known and left for their owners (each one named here so that any new one fails).
KNOWN_CYCLES: list[list[str]] = []


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``module → dreammix modules it imports`` (``from pkg import sub`` counts as ``pkg.sub``)."""
    modules = {_module_name(p): p for p in (SRC / "dreammix").rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                           for alias in node.names]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_sees_a_cycle_hidden_in_a_function():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_the_package():
    graph = import_graph()
    assert "dreammix.models.pretrained" in graph["dreammix.models.fooocus"]  # the scan sees imports
    assert [c for c in cycles(graph) if c not in KNOWN_CYCLES] == []


def test_fooocus_and_loading_share_pretrained_instead_of_importing_each_other():
    graph = import_graph()
    assert "dreammix.models.loading" not in graph["dreammix.models.fooocus"]
    assert {"dreammix.models.fooocus", "dreammix.models.pretrained"} <= graph["dreammix.models.loading"]


def test_benchmark_modules_other_than_the_chain_do_not_import_evaluate():
    """Tables and records are read by format (``benchmark.records``); only the chain that runs
    evaluations (``benchmark.run`` and its job runner ``benchmark.jobs``) sits above ``evaluate``."""
    graph = import_graph()
    chain = {"dreammix.benchmark.run", "dreammix.benchmark.jobs"}
    readers = [m for m in graph if m.startswith("dreammix.benchmark") and m not in chain]
    assert readers and not [m for m in readers if "dreammix.evaluate" in graph[m]]
