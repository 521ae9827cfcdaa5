"""workers/ and storage/ import in one direction: no module reaches itself through the package's own
imports, counting imports inside functions (a deferred import is still a dependency), and no body of
workers/ reaches a transport (the bodies are handed a Dispatcher, workers/dispatch.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRANSPORTS = {"celery_app", "celery_dispatch", "tasks", "embedded", "transport"}
BODIES = {"bodies", "document_jobs", "reaper", "lease"}


def import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the other modules of the (flat) package it imports, anywhere in its body."""
    mods = {p.stem: p for p in (ROOT / package).glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module == package:
                names = [f"{package}.{a.name}" for a in node.names]  # from workers import bodies
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == package and len(parts) > 1 and parts[1] in mods and parts[1] != mod:
                    graph[mod].add(parts[1])
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph[node])
    return seen


@pytest.mark.parametrize("package", ["workers", "storage"])
def test_no_import_circle(package: str) -> None:
    graph = import_graph(package)
    assert graph, f"no modules found under {package}/"
    circular = {m: sorted(graph[m]) for m in graph if m in reachable(graph, m)}
    assert not circular, f"{package}/ modules that import themselves through others: {circular}"


def test_bodies_never_reach_a_transport() -> None:
    graph = import_graph("workers")
    assert set(graph) >= BODIES | TRANSPORTS  # the names this test is about still exist
    for body in sorted(BODIES):
        assert not reachable(graph, body) & TRANSPORTS, (body, sorted(reachable(graph, body)))
