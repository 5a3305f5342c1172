"""The runner keeps at most `max_cells` cell tasks running and still runs every cell (real Ray)."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest

from study import runner


@pytest.mark.parametrize("n_cells, slots, per_cell, expect", [
    (48, 2, 1, 3),          # a laptop: both CPUs busy, one cell closing
    (2, 2, 1, 2),           # never more than the cells there are
    (48, 16, 1, 17),
    (4, 16, 4, 4),
    (10, math.inf, 4, 10),  # trials that ask for nothing: no limit from slots
    (0, 2, 1, 0),
])
def test_cells_at_once(n_cells, slots, per_cell, expect):
    assert runner.cells_at_once(n_cells, slots, per_cell) == expect


def test_trial_slots_counts_the_scarcer_resource():
    grid = SimpleNamespace(resources_per_trial=SimpleNamespace(cpu=2.0, gpu=0.25))
    assert runner.trial_slots(grid, {"CPU": 16, "GPU": 1}) == 4
    grid.resources_per_trial.gpu = 0
    assert runner.trial_slots(grid, {"CPU": 16}) == 8


class _Display:
    def __init__(self):
        self.finished = []

    def update(self, events):
        pass

    def cell_finished(self, name, row):
        self.finished.append(name)

    def close(self):
        pass


def test_run_cells_keeps_at_most_max_cells_running_and_runs_them_all(monkeypatch):
    import ray

    def fake_cell(ctx, grid, *, storage_path, max_concurrent):
        start = time.time()
        time.sleep(3.0)  # long enough to overlap even while workers still start
        return {"cell": ctx.cell.name, "status": "ok", "start": start, "end": time.time()}

    monkeypatch.setattr("study.search.remote_cell_runner",
                        lambda: ray.remote(num_cpus=0, max_retries=0)(fake_cell))
    contexts = [SimpleNamespace(cell=SimpleNamespace(name=f"c{i}", axes={}), cell_run_id=f"r{i}")
                for i in range(5)]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        hub = ray.remote(num_cpus=0)(__import__("study.progress", fromlist=["ProgressHub"]).ProgressHub).remote()
        display = _Display()
        grid = SimpleNamespace(shared_tune_run=False)  # each cell a task of its own
        rows, signum = runner.run_cells(contexts, grid, storage_path="unused", max_concurrent=1, client=None,
                                        launch_run_id="x", display=display, hub=hub,
                                        heartbeat=(lambda: None, 3600), max_cells=2)
    finally:
        ray.shutdown()
    assert signum is None
    assert sorted(rows) == [f"c{i}" for i in range(5)] and sorted(display.finished) == sorted(rows)
    spans = [(r["start"], r["end"]) for r in rows.values()]
    most = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert most == 2, f"{most} cells ran at once with max_cells=2"
