"""Helpers for tests that run `study/launch.py` as a real process and poll its MLflow runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def write_grid(path: Path, store: Path, **overrides) -> Path:
    """A small, fast grid (full training of tiny inputs, a checkpoint every epoch)."""
    grid = {"question": "Does the launch survive being stopped?", "name": path.stem, "store": str(store),
            "grid": {"cohort": ["oai"], "measure": ["leg_strength"]},
            "search": {"lr": {"loguniform": [1e-3, 1e-2]}}, "trials_per_cell": 2, "optuna_startup_trials": 1,
            "max_concurrent_per_cell": 1, "checkpoint_interval_s": 0,
            "min_test_per_class": 1,  # 7-15 test subjects: a check of the launch, not a result
            "train": {"epochs": 4, "batch_size": 16, "optimizer": "adamw", "weights": "none", "freeze": "none",
                      "slices_per_subject": 5},
            "split": {"val": 0.25, "test": 0.25, "seed": 0}}
    for key, value in overrides.items():
        grid[key] = {**grid[key], **value} if isinstance(value, dict) and isinstance(grid.get(key), dict) else value
    path.write_text(yaml.safe_dump(grid))
    return path


class Launch:
    """`study/launch.py` as a separate process in its own session (so it can be killed whole)."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._fh = open(log, "w")
        env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "study/launch.py", *args], cwd=REPO, env=env,
                                     stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = 900) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._fh.close()

    def kill_all(self) -> None:
        """SIGKILL the driver, then whatever its session left (as a batch scheduler's kill would)."""
        import signal

        self.proc.kill()
        self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._fh.close()

    def output(self) -> str:
        return self.log.read_text()


def wait_for(condition, *, timeout: float = 600, every: float = 0.3, what: str = "condition",
             too_late=None, log: Path | None = None):
    """Poll condition() until it returns something truthy; fail with `what` after timeout, or at
    once when too_late() says the moment has passed (with the launch's log when given)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        if too_late is not None and too_late():
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            pytest.fail(f"the moment for {what} passed unseen; the launch said:\n{tail}")
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
