"""Scripts run as files (`python study/launch.py`) put their own folder first on sys.path, so a
module there named like an installed top-level package hides it from every import, the
libraries' own included (study/packaging.py once broke `import mlflow` in study/launch.py)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT_DIRS = ("study", "data_prep", "mlflow_server")


def _modules() -> list[Path]:
    return sorted(p for d in SCRIPT_DIRS for p in (REPO / d).glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("path", _modules(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_module_hides_an_installed_package(path):
    spec = importlib.util.find_spec(path.stem) if path.stem not in sys.modules else None
    origin = getattr(spec, "origin", None) or getattr(sys.modules.get(path.stem), "__file__", None)
    assert origin is None or Path(origin).resolve() == path.resolve() or REPO in Path(origin).resolve().parents, (
        f"{path.relative_to(REPO)} has the name of the installed module {path.stem} ({origin}); "
        "a script in its folder would import this file instead: rename it")


@pytest.mark.parametrize("script", ["study/launch.py", "study/promote.py", "study/predict.py",
                                    "data_prep/build_store.py", "data_prep/synth.py"])
def test_scripts_start_as_files(script):
    out = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
