"""Live progress of a launch: trials done / running / pending per cell, best so far, ETA.

Cells run their Tune experiments inside Ray tasks, so their events cannot reach the driver's
terminal directly. They travel through one named Ray actor per launch (`ProgressHub`):

    cell task: Tuner(..., callbacks=[TuneProgress(cell, hub_name)])   # trial start/result/end
    trial:     post(hub_name, {"kind": "cache", ...})                  # feature-cache pass
    driver:    hub = start_hub(launch_run_id); display = Display(...)
               while cells run: display.update(drain(hub))

The driver shows a bar per cell and one overall bar (tqdm) on a terminal; when stdout is not a
terminal it prints one line per event (trial finished, cell finished, cache progress every
10%), and nothing but errors with --quiet. Posting never blocks or fails a trial: progress is
best effort, results never depend on it.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

NAMESPACE = "thighmri"
_handles: dict[str, Any] = {}


def hub_name(launch_run_id: str) -> str:
    return f"thighmri-progress-{launch_run_id}"


class ProgressHub:
    """An append-only event list; the driver drains it by cursor. Also where the driver says
    that the launch is being stopped (cells ask after their Tune run returns)."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.stopping = False

    def request_stop(self) -> None:
        self.stopping = True

    def stop_requested(self) -> bool:
        return self.stopping

    def post(self, event: dict) -> None:
        self.events.append(event)

    def drain(self, cursor: int) -> tuple[int, list[dict]]:
        return len(self.events), self.events[cursor:]


def start_hub(launch_run_id: str):
    """The launch's hub actor (0 CPUs), created in the driver's job and namespace."""
    import ray

    actor = ray.remote(num_cpus=0)(ProgressHub)
    return actor.options(name=hub_name(launch_run_id), namespace=NAMESPACE, get_if_exists=True).remote()


def post(name: str | None, event: dict) -> None:
    """Send an event to the hub called ``name`` from any task or trial; never raises."""
    if not name:
        return
    try:
        import ray

        if not ray.is_initialized():  # never start a Ray instance just to report progress
            return
        handle = _handles.get(name)
        if handle is None:
            handle = _handles[name] = ray.get_actor(name, namespace=NAMESPACE)
        handle.post.remote({"t": time.time(), **event})
    except Exception:  # no hub (a test, a benchmark) or the driver is gone: progress is optional
        _handles.pop(name, None)


def _epochs_done(result: dict) -> int:
    """Epochs a trial has trained: its report's epoch (a compiled-head trial reports only its
    last), else Tune's iteration count (nested-CV trials report per fold)."""
    return int(result.get("epoch") or result.get("training_iteration") or 0)


def tune_callback(cell: str | None, name: str | None):
    """A ray.tune.Callback posting this cell's trial events (start, each report, end); cell None:
    the shared Tune run of several cells (study/shared_run.py), each trial's cell from its config."""
    from ray.tune import Callback

    def configs(trial) -> int:  # a batched Tune trial counts as its K configurations (study/config_batches.py)
        return len((trial.config or {}).get("configs") or [None])

    def cell_of(trial) -> str:
        return cell or (trial.config or {}).get("cell", "?")

    class TuneProgress(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            post(name, {"kind": "trial_start", "cell": cell_of(trial), "trial": trial.trial_id, "configs": configs(trial)})

        def on_trial_result(self, iteration, trials, trial, result, **info):
            post(name, {"kind": "trial_result", "cell": cell_of(trial), "trial": trial.trial_id,
                        "iteration": _epochs_done(result), "configs": configs(trial),
                        "best": result.get("best_val_score")})

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            post(name, {"kind": "trial_end", "cell": cell_of(trial), "trial": trial.trial_id, "error": False,
                        "iteration": _epochs_done(last), "configs": configs(trial),
                        "best": last.get("best_val_score")})

        def on_trial_error(self, iteration, trials, trial, **info):
            post(name, {"kind": "trial_end", "cell": cell_of(trial), "trial": trial.trial_id, "error": True,
                        "configs": configs(trial)})

    return TuneProgress()


@dataclass
class CellProgress:
    trials: int
    epochs: int
    done: int = 0
    errors: int = 0
    running: set = field(default_factory=set)
    iterations: dict = field(default_factory=dict)  # trial -> last reported epoch
    first_seen: dict = field(default_factory=dict)  # trial -> epochs it had done when first seen
    skipped_epochs: int = 0  # epochs a pruned trial will never run
    best: float = -math.inf
    status: str = "pending"

    def epochs_done(self) -> int:
        return sum(self.iterations.values())


class Display:
    """Renders the hub's events: bars on a terminal, lines otherwise, silence with quiet.

    Args:
        cells: names of the cells that run in this session (cells kept from an earlier
            session of a resumed launch are not counted).
        trials, epochs: per cell, for the totals and the ETA (trials: one number for every
            cell, or per cell name: a nested-CV cell runs a search per outer fold).
        done_before: trials of a resumed cell that finished in an earlier session.
        quiet: print nothing but what the caller prints itself.
        stream: where to write (default stdout); bars only when it is a terminal.
    """

    def __init__(self, cells: list[str], *, trials: int | dict[str, int], epochs: int, quiet: bool = False,
                 stream=None, done_before: dict[str, int] | None = None) -> None:
        self.stream = stream or sys.stdout
        self.quiet = quiet
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) and not quiet
        per_cell = trials if isinstance(trials, dict) else dict.fromkeys(cells, trials)
        self.cells = {c: CellProgress(trials=per_cell[c], epochs=epochs) for c in cells}
        for name, n in (done_before or {}).items():  # a resumed cell's trials finished earlier
            if name in self.cells:
                cell = self.cells[name]
                cell.done = n
                cell.iterations.update({f"earlier-{i}": epochs for i in range(n)})
                cell.first_seen.update({f"earlier-{i}": epochs for i in range(n)})
        self.start = time.time()
        self._bars: dict[str, Any] = {}
        self._cache_reported: dict[str, int] = {}
        if self.tty:
            from tqdm import tqdm

            total = max(1, sum(per_cell[c] for c in cells) * epochs)
            self._bars["__all__"] = tqdm(total=total, desc="all cells", unit="ep", file=self.stream,
                                         position=0, dynamic_ncols=True, leave=True)
            if len(cells) <= 30:  # beyond that the screen is all bars; the overall one suffices
                for i, c in enumerate(cells, start=1):
                    self._bars[c] = tqdm(total=per_cell[c] * epochs, desc=c[-40:], unit="ep", file=self.stream,
                                         position=i, dynamic_ncols=True, leave=True)

    # ------------------------------------------------------------------ events
    def update(self, events: list[dict]) -> None:
        for e in events:
            cell = self.cells.get(e.get("cell", ""))
            kind = e.get("kind")
            if kind == "cache":
                self._cache(e)
                continue
            if cell is None:
                continue
            trial = e.get("trial")
            if kind == "trial_start":
                cell.running.add(trial)
                cell.status = "running"
            elif kind in ("trial_result", "trial_end"):
                k = int(e.get("configs") or 1)  # a batch: K configurations' epochs at once
                it = int(e.get("iteration") or 0) * k or cell.iterations.get(trial, 0)
                # epochs done before this session (0 for a trial started in it: a batch reports only at its end)
                cell.first_seen.setdefault(trial, 0 if trial in cell.running else max(0, it - k))
                cell.iterations[trial] = max(it, cell.iterations.get(trial, 0))
                if e.get("best") is not None and math.isfinite(float(e["best"])):
                    cell.best = max(cell.best, float(e["best"]))
                if kind == "trial_end":
                    cell.running.discard(trial)
                    if e.get("error"):
                        cell.errors += k
                    else:
                        cell.done += k
                        cell.skipped_epochs += max(0, cell.epochs * k - cell.iterations[trial])
                        self._line(f"{e.get('cell')}: trial {cell.done + cell.errors}/{cell.trials} done "
                                   f"after {cell.iterations[trial]} epoch(s), best validation so far "
                                   f"{cell.best:.3f}{self._eta_text()}")
                    if e.get("error"):
                        self._line(f"{e.get('cell')}: a trial failed ({cell.errors} so far)")
        self._refresh()

    def cell_finished(self, name: str, row: dict) -> None:
        """One line per finished cell: test accuracy beside its baseline (or why it failed)."""
        cell = self.cells.get(name)
        if cell is not None:
            cell.status = "done"
            cell.running.clear()
            cell.skipped_epochs = cell.trials * cell.epochs - cell.epochs_done()
        if row.get("status") == "ok":
            acc = row.get("test_acc", row.get("val_acc", math.nan))
            base = row.get("test_baseline_acc", row.get("val_baseline_acc", math.nan))
            lo = row.get("test_acc_ci_low", row.get("val_acc_ci_low", math.nan))
            hi = row.get("test_acc_ci_high", row.get("val_acc_ci_high", math.nan))
            msg = f"cell {name} finished: accuracy {acc:.3f} [{lo:.2f}, {hi:.2f}] vs baseline {base:.3f}"
        else:
            msg = f"cell {name} {row.get('status', 'failed')}"
        self._line(msg, force=True)
        self._refresh()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()

    # ------------------------------------------------------------------ rendering
    def totals(self) -> dict[str, float]:
        total = sum(c.trials * c.epochs - c.skipped_epochs for c in self.cells.values())
        done = sum(c.epochs_done() for c in self.cells.values())
        this_session = sum(c.iterations[t] - c.first_seen.get(t, 0) for c in self.cells.values()
                           for t in c.iterations)
        elapsed = time.time() - self.start
        rate = this_session / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else math.nan
        return {"total": total, "done": done, "eta_s": eta,
                "trials_done": sum(c.done + c.errors for c in self.cells.values()),
                "trials_running": sum(len(c.running) for c in self.cells.values()),
                "trials": sum(c.trials for c in self.cells.values()),
                "best": max((c.best for c in self.cells.values()), default=-math.inf)}

    def _eta_text(self) -> str:
        t = self.totals()
        eta = "" if math.isnan(t["eta_s"]) else f", ETA {_hms(t['eta_s'])}"
        return f" | all: {t['trials_done']}/{t['trials']} trials, {t['trials_running']} running{eta}"

    def _refresh(self) -> None:
        if not self.tty:
            return
        t = self.totals()
        overall = self._bars.get("__all__")
        if overall is not None:
            overall.total = max(1, int(t["total"]))
            overall.n = int(t["done"])
            best = f"best val {t['best']:.3f}" if math.isfinite(t["best"]) else "best val -"
            overall.set_description_str(f"trials {t['trials_done']}/{t['trials']} done, "
                                        f"{t['trials_running']} running", refresh=False)
            overall.set_postfix_str(best + (f", ETA {_hms(t['eta_s'])}" if not math.isnan(t["eta_s"]) else ""),
                                    refresh=False)
            overall.refresh()
        for name, cell in self.cells.items():
            bar = self._bars.get(name)
            if bar is None:
                continue
            bar.total = max(1, cell.trials * cell.epochs - cell.skipped_epochs)
            bar.n = min(bar.total, cell.epochs_done())
            best = f"{cell.best:.3f}" if math.isfinite(cell.best) else "-"
            bar.set_postfix_str(f"{cell.done}/{cell.trials} done, {len(cell.running)} running, best {best}"
                                + (f", {cell.errors} failed" if cell.errors else "") + f" [{cell.status}]",
                                refresh=False)
            bar.refresh()

    def _cache(self, e: dict) -> None:
        done, total = int(e.get("done", 0)), max(1, int(e.get("total", 1)))
        key = f"{e.get('entry', '')}"
        label = f"feature cache ({e.get('block', '?')}, {e.get('node', 'node')[:8]})"
        if self.tty:
            from tqdm import tqdm

            bar = self._bars.get(key)
            if bar is None:
                bar = self._bars[key] = tqdm(total=total, desc=label, unit="slice", file=self.stream,
                                             position=len(self._bars), dynamic_ncols=True, leave=True)
            bar.n = done
            bar.refresh()
            return
        step = self._cache_reported.get(key, -1)
        tenth = int(10 * done / total)
        if tenth > step or done >= total:
            self._cache_reported[key] = tenth
            rate = e.get("rate")
            eta = f", ETA {_hms((total - done) / rate)}" if rate else ""
            self._line(f"{label}: {done}/{total} slices{eta}")

    def _line(self, text: str, force: bool = False) -> None:
        if self.quiet:
            return
        stamp = time.strftime("%H:%M:%S")
        if self.tty:
            from tqdm import tqdm

            if force:  # finished cells also show above the bars
                tqdm.write(f"[{stamp}] {text}", file=self.stream)
            return
        print(f"[{stamp}] {text}", file=self.stream, flush=True)


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def request_stop(hub, timeout: float = 5.0) -> None:
    """Record on the hub that the launch is stopping (before the cells get SIGUSR1)."""
    import ray

    try:
        ray.get(hub.request_stop.remote(), timeout=timeout)
    except Exception:  # a dead hub: cells fall back to Tune's trial states
        pass


def stop_requested(name: str | None, timeout: float = 10.0) -> bool:
    """Whether the launch's driver asked its cells to stop (False without a reachable hub).

    A cell cannot tell from Tune's results alone: when SIGUSR1 interrupts Tune, its cleanup
    marks the trials it stops TERMINATED in the returned results (the experiment state saved
    for --resume keeps them RUNNING), so an interrupted search can look complete.
    """
    if not name:
        return False
    try:
        import ray

        return bool(ray.get(ray.get_actor(name, namespace=NAMESPACE).stop_requested.remote(), timeout=timeout))
    except Exception:
        return False


def drain(hub, cursor: int, timeout: float = 5.0) -> tuple[int, list[dict]]:
    """New events since cursor (empty on a slow or dead hub)."""
    import ray

    try:
        return ray.get(hub.drain.remote(cursor), timeout=timeout)
    except Exception:
        return cursor, []
