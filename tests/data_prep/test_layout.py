"""data_prep's layout: a package per stage, no import cycles, entry points where they were."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "data_prep"
STAGES = ("cohorts", "dicom", "ingest", "store", "synthetic")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(path: Path) -> set[str]:
    """data_prep modules that `path` imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("data_prep"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("data_prep"):
            for a in node.names:  # `from data_prep.store import shards` imports a module
                sub = f"{node.module}.{a.name}"
                found.add(sub if is_module(sub) else node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) - {module_name(p)} for p in PACKAGE.rglob("*.py")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert len(graph) > 25 and "data_prep.store.writer" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    # the checker itself finds a cycle when there is one
    assert find_cycle({**graph, "data_prep.store.schema": {"data_prep.store"}})


def test_a_package_per_stage_and_the_entry_points_on_top():
    top = sorted(p.name for p in PACKAGE.iterdir() if p.suffix == ".py")
    assert top == ["__init__.py", "build_store.py", "preprocess.py", "pseudonyms.py", "synth.py"]
    assert sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()) == list(
        STAGES)
    graph = import_graph()
    # the synthetic cohorts are not part of ingest, and ingest does not depend on them
    assert not any(m.startswith("data_prep.synthetic") for name, deps in graph.items()
                   if not name.startswith("data_prep.synth") for m in deps)
    assert not any(m.startswith("data_prep.ingest") for name, deps in graph.items()
                   if name.startswith(("data_prep.dicom", "data_prep.store",
                                       "data_prep.cohorts")) for m in deps)


@pytest.mark.parametrize("command", [
    ["data_prep/build_store.py", "--help"], ["data_prep/synth.py", "--help"],
    ["-m", "data_prep.build_store", "--help"], ["-m", "data_prep.synth", "--help"]])
def test_command_lines_still_work(command, tmp_path):
    proc = subprocess.run([sys.executable, *(str(REPO / c) if c.endswith(".py") else c
                                             for c in command)],
                          cwd=REPO if command[0] == "-m" else tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
