"""A trial's MLflow run and where its epochs go: created or found again, metrics batched.

study/trainable.py's run_trial uses these; they hold the MLflow side of a trial so that the
trainable reads as training. Every request here is one HTTP round trip to the tracking
server (10-40 ms each on the 2-core machine, benchmarks/README.md "per-trial overhead"), so
a trial sends few: its run with tags, one batch of params (+ the trainer tags), its epochs in
batches (at least every LOG_EVERY_S, and before each checkpoint), and one last batch with its
timings before the run ends.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from study import tracking

LOG_EVERY_S = 5.0  # a trial's epoch metrics reach MLflow at least this often (and at every checkpoint)


def node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:
        return "unknown"


def trial_run(client, ctx, train, saved: dict | None) -> tuple[str, set[int], bool]:
    """The trial's MLflow run: the checkpoint's, else one tagged with this Tune trial id
    (a restart before any checkpoint), else a new one.

    Returns:
        (run id, steps already logged, new): a new run has its tags but not yet its params;
        the caller sends them with its first batch (`params_of`).
    """
    from ray import tune

    tctx = tune.get_context()
    trial_id, trial_name = tctx.get_trial_id(), tctx.get_trial_name()
    run_id = (saved or {}).get("mlflow_run_id")
    if run_id is None:
        found = tracking.children(client, ctx.experiment_id, ctx.cell_run_id, f"tags.tune_trial_id = '{trial_id}'")
        run_id = found[0].info.run_id if found else None
    tags = {"worker_pid": str(os.getpid()), "node_id": node_id()}
    if run_id is None:
        fold = {} if ctx.outer_fold is None else {"outer_fold": str(ctx.outer_fold)}
        name = ctx.cell.name + ("" if ctx.outer_fold is None else f"/outer{ctx.outer_fold}")
        run_id = tracking.create_run(client, ctx.experiment_id, name=f"{name}/{trial_name}",
                                     run_type="trial", parent_run_id=ctx.cell_run_id,
                                     tags={"cell": ctx.cell.name, "trial": trial_name,
                                           "tune_trial_id": trial_id, "attempt": "1", **fold, **tags})
        return run_id, set(), True
    run = client.get_run(run_id)
    tracking.reopen(client, run_id)
    attempt = int(run.data.tags.get("attempt", "1")) + 1
    tracking.set_tags(client, run_id, {**tags, "resumed_from_epoch": str((saved or {}).get("epoch", 0)),
                                       "attempt": str(attempt)})
    if "store_hash" not in run.data.params:  # it died between its creation and its first batch
        return run_id, set(), True
    return run_id, {m.step for m in client.get_metric_history(run_id, "val_acc")}, False


def params_of(ctx, train) -> dict[str, Any]:
    """A trial run's params: its training settings, the cell's axes and the store's hash."""
    return {**dataclasses.asdict(train), **{f"axis.{k}": v for k, v in ctx.cell.axes.items()},
            "store_hash": ctx.store_hash}


def log_batch(client, run_id: str, *, params: dict[str, Any] | None = None, tags: dict[str, Any] | None = None,
              steps: dict[int, dict[str, float]] | None = None, metrics: dict[str, float] | None = None) -> None:
    """Params, tags, several steps' metrics and step-0 metrics in as few requests as MLflow allows
    (one for a trial's usual ~20 params, 2 tags, or 50 epochs x 10 metrics)."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    ps = [Param(k, "null" if v is None else str(v)[:6000]) for k, v in (params or {}).items()]
    ts = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    ms = [Metric(k, float(v), now, step) for step, m in sorted((steps or {}).items())
          for k, v in m.items() if v is not None]
    ms += [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items() if v is not None]
    while ps or ts or ms:  # MLflow's limits per request: 100 params, 1000 metrics, 100 tags
        client.log_batch(run_id, params=ps[:100], tags=ts[:100], metrics=ms[:1000])
        ps, ts, ms = ps[100:], ts[100:], ms[1000:]


class EpochLog:
    """A trial's epoch metrics not yet sent: flushed in one request every LOG_EVERY_S and
    before each checkpoint (a restart from it then finds every epoch up to it logged)."""

    def __init__(self, client, run_id: str, logged: set[int]) -> None:
        self.client, self.run_id, self.logged = client, run_id, logged
        self.pending: dict[int, dict[str, float]] = {}
        self.last_flush = time.monotonic()

    def add(self, epoch: int, report: dict[str, float]) -> None:
        if epoch not in self.logged:
            self.pending[epoch] = {k: v for k, v in report.items() if k != "epoch"}

    def due(self) -> bool:
        return time.monotonic() - self.last_flush >= LOG_EVERY_S

    def flush(self, metrics: dict[str, float] | None = None) -> None:
        """Send the pending epochs (and metrics at step 0, e.g. the trial's timings) at once."""
        if self.pending or metrics:
            log_batch(self.client, self.run_id, steps=self.pending, metrics=metrics)
            self.pending.clear()
        self.last_flush = time.monotonic()


def cache_progress(ctx, store):
    """Posts the feature-cache pass's progress to the launch's display."""
    from study import progress

    node = node_id()
    started = time.monotonic()

    def report(done: int, total: int, *, entry: str, block: str) -> None:
        elapsed = time.monotonic() - started
        progress.post(ctx.progress_hub, {"kind": "cache", "cell": ctx.cell.name, "entry": entry, "block": block,
                                         "node": node, "done": done, "total": total,
                                         "rate": done / elapsed if elapsed > 0 and done else None})

    return report
