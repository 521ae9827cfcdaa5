"""pipeline/engine imports in one direction: no module reaches itself through intra-package imports,
counting imports inside functions too (a deferred import is still a dependency); and importing the
modules with Triton kernels does not import Triton (triton_lazy.py builds them at first use)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "pipeline.engine"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (ROOT / "pipeline" / "engine").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _owner(name: str, mods: dict[str, Path]) -> str | None:
    """The module `name` lives in: itself, or the nearest enclosing module (a name imported from it)."""
    while name not in mods:
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]
    return name


def import_graph() -> dict[str, set[str]]:
    """Module -> the other pipeline.engine modules it imports, anywhere in its body."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                # `from pkg import submodule` depends on the submodule, `from mod import name` on mod
                targets = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods] or [base]
            else:
                continue
            for target in targets:
                owner = _owner(target, mods)
                if owner is not None and owner != mod:
                    graph[mod].add(owner)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_sees_a_deferred_import_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_reads_imports_inside_functions():
    graph = import_graph()
    # generate.py imports score inside DenseGenerator.score and load inside DenseGenerator.load
    assert {f"{PACKAGE}.score", f"{PACKAGE}.load", f"{PACKAGE}.prefill"} <= graph[f"{PACKAGE}.generate"]
    assert f"{PACKAGE}.attention" in graph[f"{PACKAGE}.backends"]


def test_engine_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_importing_the_triton_kernel_modules_does_not_import_triton():
    code = (
        "import sys\n"
        "from pipeline.engine import fused, gemv\n"
        "from pipeline.engine.backends import head_norms, paged_triton, sdpa, splitk\n"
        "import torch\n"
        "assert not splitk.is_available(torch.device('cpu'))\n"
        "assert not fused._runs_triton(torch.zeros(1))\n"
        "print('triton' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
