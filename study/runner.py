"""Run a launch's cells on Ray: keep enough of them running to fill the cluster, collect each
as it finishes, show progress, and stop gracefully on SIGINT/SIGTERM.

    rows, signum = run_cells(contexts, grid, storage_path=..., launch_run_id=..., client=...)

Each cell is one zero-CPU Ray task (study.search.run_cell_search) that runs its Tune
experiment; its trials hold the CPUs/GPUs. A cell task is a process of about 1 GB (torch,
Tune, MLflow), and a cell whose trials cannot get a CPU only waits, so at most `max_cells`
run at once (`cells_at_once`: enough to fill every trial slot, plus one whose closing work
overlaps the others' trials); the next starts when one finishes. Results are collected with
`ray.wait` as cells finish, so a crashed cell never hides the others' results. On the first SIGINT/SIGTERM every
running cell task gets SIGUSR1 (Ray Tune's own "stop and save" signal: it checkpoints the
experiment with its unfinished trials, which `--resume` continues); after GRACE_S the rest is
cancelled. A second signal skips the wait.

Cells that share one Tune run (study/shared_run.py) run first, as one zero-CPU task (`run_shared`, with the
same progress, heartbeat and stop); their cell tasks then only close them.
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Any

GRACE_S = 25.0  # Slurm and Kubernetes send SIGKILL 30 s after SIGTERM by default
POLL_S = 0.5


class SignalCatcher:
    """Records SIGINT/SIGTERM instead of raising, so the collect loop can stop gracefully."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.count = 0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> SignalCatcher:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = self.signum or signum
        self.count += 1

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _signal_cell(pid: int, node: str, here: str) -> None:
    """Send Tune's stop-and-save signal to a cell task, on whichever node it runs."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if node == here:
        try:
            os.kill(pid, signal.SIGUSR1)
        except OSError:
            pass
        return
    ray.remote(num_cpus=0, max_retries=0)(os.kill).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True)).remote(pid, signal.SIGUSR1)


def _collect(ref, ctx, client) -> dict[str, Any]:
    """A finished cell task's row; a task that crashed (worker died, OOM) becomes a failed row."""
    import ray

    try:
        return ray.get(ref)
    except Exception as exc:  # RayTaskError, WorkerCrashedError, TaskCancelledError, ...
        return _failed_row(ctx, client, f"failed: the cell task died ({_reason(exc)})")


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]


def _failed_row(ctx, client, status: str) -> dict[str, Any]:
    """A cell that failed outside its own task's handling: tagged and ended in MLflow, and its row."""
    from study import tracking

    try:
        client.set_tag(ctx.cell_run_id, "error", status[:5000])
        tracking.end_open_children(client, ctx.experiment_id, ctx.cell_run_id)
        client.set_terminated(ctx.cell_run_id, "FAILED")
    except Exception:
        pass
    return {"cell": ctx.cell.name, **ctx.cell.axes, "cell_run_id": ctx.cell_run_id, "status": status}


def _interrupted_row(ctx) -> dict[str, Any]:
    return {"cell": ctx.cell.name, **ctx.cell.axes, "cell_run_id": ctx.cell_run_id, "status": "interrupted"}


def run_shared(shared: list, grid, *, storage_path: str, max_concurrent: int, display, hub,
               heartbeat) -> tuple[dict[str, Any], int | None, int]:
    """Run the sharing cells' trials (study/shared_run.py) as one zero-CPU task, with the same progress,
    heartbeat and graceful stop as cells; (its outcome, the signal that stopped it or None, the
    progress hub's cursor after the events it showed)."""
    import ray

    from study import progress
    from study.shared_run import SHARED_RUN, remote_shared_runner

    ref = remote_shared_runner().remote(shared, grid, storage_path=storage_path, max_concurrent=max_concurrent)
    here = ray.get_runtime_context().get_node_id()
    where = None  # (pid, node) of the shared run's task, once it started
    cursor, last_beat = 0, time.monotonic()

    def wait() -> bool:
        nonlocal cursor, where
        ready, _ = ray.wait([ref], num_returns=1, timeout=POLL_S)
        cursor, events = progress.drain(hub, cursor)
        for e in events:
            if e.get("kind") == "cell_start" and e.get("cell") == SHARED_RUN:
                where = (int(e["pid"]), str(e["node"]))
        display.update([e for e in events if e.get("cell") != SHARED_RUN])
        return bool(ready)

    with SignalCatcher() as caught:
        while caught.signum is None:
            if wait():
                try:
                    return ray.get(ref), None, cursor
                except Exception as exc:
                    return {"status": f"failed: the shared Tune run's task died ({_reason(exc)})"}, None, cursor
            if time.monotonic() - last_beat >= heartbeat[1]:
                heartbeat[0]()
                last_beat = time.monotonic()
        display.close()
        name = signal.Signals(caught.signum).name
        print(f"\n{name} received: stopping the shared Tune run's trials of {len(shared)} cell(s) (they save "
              f"their state for --resume); up to {GRACE_S:.0f} s, send {name} again to stop at once", flush=True)
        progress.request_stop(hub)
        wait()
        if where is not None:
            _signal_cell(*where, here)
        deadline, done = time.monotonic() + GRACE_S, False
        while not done and time.monotonic() < deadline and caught.count < 2:
            done = wait()
        if not done:
            ray.cancel(ref, force=True)
        return {"status": "interrupted"}, caught.signum, cursor


def trial_slots(grid, resources: dict) -> float:
    """Trials the cluster can run at once under `grid.resources_per_trial` (`resources`: Ray's
    cluster_resources(); inf when a trial asks for nothing)."""
    res = grid.resources_per_trial
    slots = resources.get("CPU", 1) / res.cpu if res.cpu else math.inf
    if res.gpu:
        slots = min(slots, resources.get("GPU", 0) / res.gpu)
    return slots


def cells_at_once(n_cells: int, trial_slots: float, max_concurrent: int) -> int:
    """Cells to keep running: enough for every trial slot of the cluster (`trial_slots` trials
    fit at once; a cell runs up to `max_concurrent`), plus one, never more than there are cells.
    Measured: 12 cells of an OAI-size grid at once took 21 of 23 GiB on a 2-core machine where 3
    suffice to keep both CPUs busy; 48 at once did not fit."""
    if n_cells <= 0:
        return 0
    fill = math.ceil(trial_slots / max(1, max_concurrent)) if math.isfinite(trial_slots) else n_cells
    return max(1, min(n_cells, fill + 1))


def run_cells(contexts: list, grid, *, storage_path: str, max_concurrent: int, client, launch_run_id: str,
              display, hub, heartbeat, max_cells: int | None = None) -> tuple[dict[str, dict[str, Any]], int | None]:
    """Run the cells of `contexts` (CellContext each) until all finish or a signal arrives, at most
    `max_cells` at once (None: all), in order.

    Returns:
        ({cell name: results row}, the signal number that stopped the launch or None). Rows of
        cells stopped by the signal have status "interrupted".
    """
    import ray

    from study import progress
    from study.shared_run import cells_to_share
    from study.search import remote_cell_runner

    rows: dict[str, dict[str, Any]] = {}
    searched: dict[str, list] = {}  # cells sharing the run: their Tune results, for the cell tasks to close
    shared = cells_to_share(grid, contexts, storage_path=storage_path)
    cursor = 0  # the progress hub's events shown so far
    if shared:
        out, signum, cursor = run_shared(shared, grid, storage_path=storage_path, max_concurrent=max_concurrent,
                                 display=display, hub=hub, heartbeat=heartbeat)
        if signum is not None or out["status"] == "interrupted":
            return {c.cell.name: _interrupted_row(c) for c in contexts}, signum
        if out["status"] != "ok":
            for ctx in shared:
                rows[ctx.cell.name] = _failed_row(ctx, client, out["status"])
                display.cell_finished(ctx.cell.name, rows[ctx.cell.name])
            contexts = [c for c in contexts if c.cell.name not in rows]
        else:
            searched = out["results"]
    runner = remote_cell_runner()
    queued = list(contexts)
    limit = len(queued) if not max_cells else max(1, max_cells)
    pending: dict[Any, Any] = {}

    def submit() -> None:
        while queued and len(pending) < limit:
            ctx = queued.pop(0)
            done = {"searched": searched[ctx.cell.name]} if ctx.cell.name in searched else {}
            pending[runner.remote(ctx, grid, storage_path=storage_path, max_concurrent=max_concurrent, **done)] = ctx

    submit()
    tasks: dict[str, tuple[int, str]] = {}  # cell -> (pid, node) of its running task
    here = ray.get_runtime_context().get_node_id()
    last_beat = time.monotonic()

    def pump() -> None:
        nonlocal cursor
        cursor, events = progress.drain(hub, cursor)
        for e in events:
            if e.get("kind") == "cell_start":
                tasks[e["cell"]] = (int(e["pid"]), str(e["node"]))
        display.update(events)

    def take(ready) -> None:
        for ref in ready:
            ctx = pending.pop(ref)
            row = _collect(ref, ctx, client)
            rows[ctx.cell.name] = row
            tasks.pop(ctx.cell.name, None)
            if row.get("status") != "interrupted":
                display.cell_finished(ctx.cell.name, row)

    with SignalCatcher() as caught:
        while pending and caught.signum is None:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            pump()
            take(ready)
            if caught.signum is None:
                submit()
            if time.monotonic() - last_beat >= heartbeat[1]:
                heartbeat[0]()
                last_beat = time.monotonic()
        if caught.signum is None:
            return rows, None
        # graceful stop: Tune saves each cell's experiment with its unfinished trials
        display.close()
        for ctx in queued:  # never started: --resume runs them
            rows[ctx.cell.name] = _interrupted_row(ctx)
        queued.clear()
        name = signal.Signals(caught.signum).name
        print(f"\n{name} received: stopping {len(pending)} running cell(s) (they save their state for --resume); "
              f"up to {GRACE_S:.0f} s, send {name} again to stop at once", flush=True)
        pump()
        progress.request_stop(hub)  # first: a cell whose Tune run returns now must not finish as complete
        for ctx in pending.values():
            if ctx.cell.name in tasks:
                _signal_cell(*tasks[ctx.cell.name], here)
            else:  # not started yet: nothing to save
                ray.cancel(next(r for r, c in pending.items() if c is ctx), force=True)
        deadline = time.monotonic() + GRACE_S
        while pending and time.monotonic() < deadline and caught.count < 2:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            take(ready)
            pump()
        for ref, ctx in list(pending.items()):
            ray.cancel(ref, force=True)
            rows[ctx.cell.name] = _interrupted_row(ctx)
        pending.clear()
        return rows, caught.signum
