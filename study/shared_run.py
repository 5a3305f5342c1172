"""Cells that share one Tune run, so that a trial worker serves cell after cell (`shared_tune_run`).

A cell is normally a Tune run of its own (study/search.py), and Tune reuses a trial's worker
process only within one run, so every cell starts a worker: ~4.5 CPU s of imports (torch,
MLflow, Ray Tune, zarr), Ray's actor start and a cold read of the cell's features. For a cell
whose whole search trains in about two seconds (fc heads on cached features, several
configurations per Tune trial: study/config_batches.py) that start costs more than its training
(benchmarks/README.md, "w5"). Such cells run their trials in one Tune run instead:

- `CellRouter`, a Tune searcher, holds each cell's own searcher, built as for a Tune run of its
  own (`search.cell_searcher`: the same Optuna study, journal and seed). It asks the cells in
  launch order, each up to its own concurrency (`max_concurrent`) and number of Tune trials,
  names the cell in the trial's config (`CELL_KEY`) and hands every result back to that cell's
  searcher. Each Optuna study so sees the same asks and tells in the same order as in a run of
  its own (tests/study/test_shared_run.py compares whole launches);
- the one trainable takes its cell's context from the config, and `reuse_actors=True` lets a
  finished trial's worker take the next trial, whichever cell it belongs to;
- when the run ends, each cell's results go to a cell task of its own, which closes the cell
  exactly as after a search of its own (`search.run_cell_search(..., searched=...)`).

`shared_tune_run: auto` shares when every cell batches configurations (its trials take seconds);
`true` shares it among every cell that is not nested CV (those keep runs of their own); `false` never.
The shared run lives in `<storage_path>/_shared_tune_run`; a resumed launch restores it like a
cell's run (finished trials kept, each Optuna study's state back, unfinished trials continued).
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

from ray.tune.search import Searcher

from study.config import GridConfig
from study.config_batches import CELL_KEY, shared_run_cells
from study.search import _interrupted, cell_searcher, experiment_path, run_search_trial, run_settings
from study.trainable import CellContext

SHARED_RUN = "_shared_tune_run"  # the shared Tune run's folder under the launch's storage path; not a cell name


def cells_to_share(grid: GridConfig, contexts: list[CellContext], *, storage_path: str) -> list[CellContext]:
    """The cells of this session that run in the shared Tune run: those `shared_run_cells` names,
    but not a cell that has a Tune run of its own from an earlier session (it continues there)."""
    from ray import tune

    return [c for c in shared_run_cells(grid, contexts)
            if not tune.Tuner.can_restore(experiment_path(storage_path, c.cell.name))]


class CellRouter(Searcher):
    """One Tune searcher over several cells' own searchers (see the module docstring).

    Args:
        searchers: cell name -> that cell's searcher, in launch order.
        budgets: cell name -> its number of Tune trials.
        limit: Tune trials one cell may run at once.
    """

    def __init__(self, searchers: dict[str, Searcher], budgets: dict[str, int], limit: int,
                 metric: str = "best_val_score", mode: str = "max"):
        super().__init__(metric=metric, mode=mode)
        self._cells = dict(searchers)
        self._budgets = dict(budgets)
        self._limit = max(1, int(limit))
        self._owner: dict[str, str] = {}  # Tune trial id -> cell
        self._asked = {name: 0 for name in self._cells}
        self._live: dict[str, set[str]] = {name: set() for name in self._cells}

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        self._metric, self._mode = metric or self._metric, mode or self._mode
        return True  # each cell's searcher already has its space

    def suggest(self, trial_id: str):
        if trial_id in self._owner:  # asked again for a trial it already placed
            name = self._owner[trial_id]
            return {**self._cells[name].suggest(trial_id), CELL_KEY: name}
        for name, searcher in self._cells.items():
            if self._asked[name] >= self._budgets[name] or len(self._live[name]) >= self._limit:
                continue
            config = searcher.suggest(trial_id)
            if config == Searcher.FINISHED:
                self._asked[name] = self._budgets[name]
                continue
            if config is None:  # that cell's searcher waits for results
                continue
            self._owner[trial_id] = name
            self._asked[name] += 1
            self._live[name].add(trial_id)
            return {**config, CELL_KEY: name}
        if all(self._asked[n] >= self._budgets[n] for n in self._cells):
            return Searcher.FINISHED
        return None  # every unfinished cell runs as many trials as it may

    def cell_of(self, trial_id: str) -> str | None:
        return self._owner.get(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._owner:
            self._cells[self._owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        name = self._owner.get(trial_id)
        if name is None:
            return
        self._live[name].discard(trial_id)
        self._cells[name].on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        """Tune's snapshot: the routing state and each cell's searcher snapshot (with its journal)."""
        cells = {}
        with tempfile.TemporaryDirectory() as tmp:
            for i, (name, searcher) in enumerate(self._cells.items()):
                path = Path(tmp) / str(i)
                searcher.save(str(path))
                cells[name] = path.read_bytes()
        state = {"owner": self._owner, "asked": self._asked, "live": self._live, "budgets": self._budgets,
                 "limit": self._limit, "cells": cells}
        tmp_file = f"{checkpoint_path}.tmp{os.getpid()}"
        with open(tmp_file, "wb") as fh:
            pickle.dump(state, fh)
        os.replace(tmp_file, checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            state = pickle.load(fh)
        missing = sorted(set(state["cells"]) - set(self._cells))
        if missing:
            raise RuntimeError(f"the shared Tune run's snapshot {checkpoint_path} has cells this searcher lacks: "
                               f"{', '.join(missing)}")
        with tempfile.TemporaryDirectory() as tmp:
            for i, (name, blob) in enumerate(state["cells"].items()):
                path = Path(tmp) / str(i)
                path.write_bytes(blob)
                self._cells[name].restore(str(path))
        self._owner, self._asked, self._live = state["owner"], state["asked"], state["live"]
        self._budgets, self._limit = state["budgets"], state["limit"]


def shared_trainable():
    """The shared run's trainable: the trial's cell from its config, then a cell's trial as usual."""

    def trainable(config, contexts):
        name = config.get(CELL_KEY)
        ctx = contexts.get(name)
        if ctx is None:
            raise RuntimeError(f"a shared run's trial names cell {name!r}, which this launch session does not run "
                               f"(cells: {', '.join(sorted(contexts))})")
        return run_search_trial({k: v for k, v in config.items() if k != CELL_KEY}, ctx)

    # tune.with_parameters files its parameters under the function's name (see search.cell_trainable)
    trainable.__name__ = trainable.__qualname__ = "trial__shared"  # trial names: trial__shared_<id>
    return trainable


def build_shared_tuner(contexts: list[CellContext], grid: GridConfig, *, storage_path: str, max_concurrent: int):
    """The shared Tuner, restored from its folder when a resumed launch finds one; (tuner, restored)."""
    from ray import tune

    from study import progress

    first = contexts[0]
    by_name = {c.cell.name: c for c in contexts}
    trainable = tune.with_resources(tune.with_parameters(shared_trainable(), contexts=by_name),
                                    {"cpu": first.cpus_per_trial, "gpu": first.gpus_per_trial})
    path = experiment_path(storage_path, SHARED_RUN)
    if tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False), True
    searchers, budgets = {}, {}
    for ctx in contexts:
        searchers[ctx.cell.name], batches = cell_searcher(ctx, grid, storage_path=storage_path)
        budgets[ctx.cell.name] = len(batches)
    router = CellRouter(searchers, budgets, max_concurrent)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric="best_val_score", mode="max", search_alg=router,
                                    num_samples=sum(budgets.values()), reuse_actors=True),
        run_config=tune.RunConfig(name=SHARED_RUN, storage_path=storage_path, verbose=0,
                                  callbacks=[progress.tune_callback(None, first.progress_hub)],
                                  **run_settings(grid)),
    )
    return tuner, False


def run_shared_search(contexts: list[CellContext], grid: GridConfig, *, storage_path: str,
                    max_concurrent: int) -> dict[str, Any]:
    """Run (or continue) the sharing cells' trials; {"status": "ok", "results": {cell: [Result, ...]}},
    {"status": "interrupted"} when the launch was stopped, or {"status": "failed: ..."}."""
    from mlflow.tracking import MlflowClient

    from study import progress
    from study.trainable import _node_id

    hub = contexts[0].progress_hub
    progress.post(hub, {"kind": "cell_start", "cell": SHARED_RUN, "pid": os.getpid(), "node": _node_id()})
    try:
        tuner, restored = build_shared_tuner(contexts, grid, storage_path=storage_path, max_concurrent=max_concurrent)
        if restored:
            client = MlflowClient(contexts[0].tracking_uri)
            for ctx in contexts:
                client.set_tag(ctx.cell_run_id, "resumed", "true")
        results = tuner.fit()
        if _interrupted(results) or progress.stop_requested(hub):
            return {"status": "interrupted"}
        by_cell: dict[str, list] = {c.cell.name: [] for c in contexts}
        for result in results:
            name = (result.config or {}).get(CELL_KEY)
            if name in by_cell:
                by_cell[name].append(result)
        return {"status": "ok", "results": by_cell}
    except Exception as exc:
        return {"status": f"failed: the shared Tune run failed: {type(exc).__name__}: {exc}"[:5000]}


def remote_shared_runner():
    """The shared run as a Ray task that holds no CPU itself (its trials do); never retried."""
    import ray

    return ray.remote(num_cpus=0, max_retries=0)(run_shared_search)
