"""Continue a launch that was killed, interrupted or failed, under its own MLflow runs.

    python study/launch.py --grid ablations/bmi.yaml --resume            # latest launch of grid + store
    python study/launch.py --grid ablations/bmi.yaml --resume <run id>   # that launch

A launch is its MLflow launch run (tags: grid_name, heartbeat, driver_host/pid; params:
store_hash, storage_path; artifact resolved_grid.json) plus its storage folder
`<storage_path>/<cell name>/` holding each cell's Tune experiment (trial checkpoints and the
Optuna searcher's state). Resuming keeps finished cells as they are, restores every other
cell's Tune experiment (finished trials are not rerun; unfinished ones continue from their
last checkpoint in their own MLflow run) and marks runs left RUNNING by the dead driver KILLED
first. A launch whose driver still beats its heartbeat is never resumed or replaced.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from study import tracking

HEARTBEAT_S = 30.0  # the driver tags its launch run this often
DEAD_AFTER_S = 150.0  # a RUNNING launch without a heartbeat for this long has lost its driver


class ResumeError(ValueError):
    """The launch cannot be resumed (or a new one would collide with an unfinished one)."""


@dataclass
class PriorLaunch:
    run_id: str
    name: str
    status: str
    start_time: float  # seconds since the epoch
    heartbeat: float | None
    driver: str
    storage_path: str
    grid: dict[str, Any]
    n_cells: int = 0
    cells: dict[str, Any] = field(default_factory=dict)  # cell name -> its MLflow run

    def alive(self, now: float | None = None) -> bool:
        """The driver still runs: RUNNING with a recent heartbeat (or a live local pid)."""
        if self.status != "RUNNING":
            return False
        now = now or time.time()
        last = self.heartbeat or self.start_time
        if now - last < DEAD_AFTER_S:
            host, _, pid = self.driver.partition(":")
            if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
                return False  # same machine and the process is gone: no need to wait for the timeout
            return True
        return False

    def finished_cells(self) -> list[str]:
        return sorted(n for n, r in self.cells.items() if r.info.status == "FINISHED" and "model_uri" in r.data.tags)

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.start_time))
        return (f"launch {self.name} (run {self.run_id}, started {started}, status {self.status}, "
                f"{len(self.finished_cells())}/{self.n_cells or len(self.cells)} cell(s) finished)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def driver_tags() -> dict[str, str]:
    """Who runs the launch, for liveness checks: host:pid and a fresh heartbeat."""
    return {"driver": f"{socket.gethostname()}:{os.getpid()}", "heartbeat": f"{time.time():.0f}"}


def beat(client, run_id: str) -> None:
    client.set_tag(run_id, "heartbeat", f"{time.time():.0f}")


def launch_runs(client, experiment_id: str, store_hash: str) -> list:
    """Launch runs of this experiment on this store, newest first."""
    query = f"tags.run_type = 'launch' and params.store_hash = '{store_hash}'"
    return list(client.search_runs([experiment_id], query, max_results=200, order_by=["attributes.start_time DESC"]))


def load(client, experiment_id: str, run) -> PriorLaunch:
    """A launch run with its resolved grid and its cell runs."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            grid = json.loads(Path(client.download_artifacts(run.info.run_id, "resolved_grid.json", tmp)).read_text())
        except Exception:
            grid = {}
    cells = {r.data.tags.get("cell", r.info.run_name): r
             for r in tracking.children(client, experiment_id, run.info.run_id, "tags.run_type = 'cell'")}
    heartbeat = run.data.tags.get("heartbeat")
    return PriorLaunch(run_id=run.info.run_id, name=run.info.run_name, status=run.info.status,
                       start_time=run.info.start_time / 1000, heartbeat=float(heartbeat) if heartbeat else None,
                       driver=run.data.tags.get("driver", ""), storage_path=run.data.params.get("storage_path", ""),
                       grid=grid, n_cells=int(run.data.params.get("n_cells", 0) or 0), cells=cells)


def latest(client, experiment_id: str, store_hash: str) -> PriorLaunch | None:
    runs = launch_runs(client, experiment_id, store_hash)
    return load(client, experiment_id, runs[0]) if runs else None


def settings_diff(current: dict[str, Any], recorded: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved grids (the file path aside)."""
    out = []
    for key in sorted(set(current) | set(recorded)):
        if not prefix and key == "source":
            continue
        a, b = current.get(key, "<absent>"), recorded.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += settings_diff(a, b, f"{prefix}{key}.")
        elif json.dumps(a, default=str, sort_keys=True) != json.dumps(b, default=str, sort_keys=True):
            out.append(f"{prefix}{key}: now {json.dumps(a, default=str)}, the launch had {json.dumps(b, default=str)}")
    return out


def select(client, experiment_id: str, *, grid_dict: dict[str, Any], store_hash: str, which: str) -> PriorLaunch:
    """The launch --resume names ("latest" or a run id), checked resumable with these settings."""
    if which == "latest":
        prior = latest(client, experiment_id, store_hash)
        if prior is None:
            raise ResumeError(f"no launch of experiment {grid_dict.get('name')!r} on this store "
                              f"({store_hash[:19]}) to resume; run without --resume to start one")
    else:
        try:
            run = client.get_run(which)
        except Exception as exc:
            raise ResumeError(f"--resume {which}: no such MLflow run ({type(exc).__name__})") from exc
        if run.data.tags.get("run_type") != "launch" or run.info.experiment_id != experiment_id:
            raise ResumeError(f"--resume {which}: not a launch run of experiment {grid_dict.get('name')!r}")
        if run.data.params.get("store_hash") != store_hash:
            raise ResumeError(f"--resume {which}: that launch ran on store {run.data.params.get('store_hash')}, "
                              f"the grid's store now has {store_hash}; a resumed launch needs the same store")
        prior = load(client, experiment_id, run)
    if prior.status == "FINISHED":
        raise ResumeError(f"{prior.describe()} finished; nothing to resume. Run without --resume for a new launch")
    if prior.alive():
        raise ResumeError(f"{prior.describe()} is still running (driver {prior.driver}, heartbeat "
                          f"{time.time() - (prior.heartbeat or prior.start_time):.0f} s ago); stop it first")
    if not prior.grid:
        raise ResumeError(f"{prior.describe()} has no resolved_grid.json; it cannot be checked or resumed")
    diff = settings_diff(grid_dict, prior.grid)
    if diff:
        raise ResumeError(f"{prior.describe()} ran with other settings; resume with the same grid and --set "
                          "values:\n  - " + "\n  - ".join(diff))
    if not prior.storage_path:
        raise ResumeError(f"{prior.describe()} records no storage_path; it cannot be resumed")
    return prior


def reopen(client, experiment_id: str, prior: PriorLaunch) -> int:
    """Mark what the dead driver left RUNNING as KILLED, then set the launch RUNNING again."""
    n = tracking.end_open_tree(client, experiment_id, prior.run_id)
    tracking.reopen(client, prior.run_id)
    for key, value in {**driver_tags(), "resumed": str(int(client.get_run(prior.run_id).data.tags.get("resumed", "0")) + 1)}.items():
        client.set_tag(prior.run_id, key, value)
    return n


def retire(client, experiment_id: str, prior: PriorLaunch) -> int:
    """A dead, unfinished launch replaced by a new one (--new): its RUNNING runs become KILLED."""
    n = tracking.end_open_tree(client, experiment_id, prior.run_id)
    if prior.status == "RUNNING":
        client.set_terminated(prior.run_id, "KILLED")
        n += 1
    client.set_tag(prior.run_id, "replaced", "true")
    return n
