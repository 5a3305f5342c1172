"""Cells → Optuna studies → Ray Tune trials, all cells at once on one Ray cluster.

Ray Tune cannot mix `grid_search` with OptunaSearch, so the grid is the outer level: each cell
gets its own `Tuner` with its own Optuna study (seeded from the cell's name), run inside a
`@ray.remote(num_cpus=0)` task so that every cell's trials share the cluster concurrently.
When a cell's search ends, the task evaluates the trial chosen on validation subjects once
on the cell's held-out test subjects (study/evaluation.py). A resumed launch restores each
unfinished cell's Tune experiment from the launch's storage folder (`build_tuner`).

Each search's Optuna study lives in a journal file (Optuna's JournalStorage on a
JournalFileBackend, study name = the experiment's name): `<storage_path>/<name>/optuna_journal.log`
when the storage is a local or shared folder, else a local folder of the cell task's node
(`journal_path`). The searcher's Tune snapshot carries the journal's bytes as well, so a resume
on a node without the file starts from the snapshot's journal. After the search the journal is
logged on the cell run under `optuna/` (`optuna-dashboard <file>` opens it).
"""

from __future__ import annotations

import hashlib
import math
import tempfile
import zlib
from pathlib import Path
from typing import Any

from study.config import GridConfig, SearchParam
from study.batch_trial import run_batch_trial
from study.config_batches import BATCH_KEY, NUMBERS_KEY, batch_sizes, configs_per_trial
from study.optuna_journal import close_journal, journal_storage, log_journals
from study.trainable import CellContext, run_trial


def optuna_space(params: tuple[SearchParam, ...]) -> dict[str, Any]:
    import optuna.distributions as od

    space = {}
    for p in params:
        if p.kind == "loguniform":
            space[p.name] = od.FloatDistribution(float(p.values[0]), float(p.values[1]), log=True)
        elif p.kind == "uniform":
            space[p.name] = od.FloatDistribution(float(p.values[0]), float(p.values[1]))
        elif p.kind == "int":
            space[p.name] = od.IntDistribution(int(p.values[0]), int(p.values[1]))
        else:
            space[p.name] = od.CategoricalDistribution(list(p.values))
    return space


def cell_seed(cell_name: str, split_seed: int) -> int:
    """Stable per-cell sampler seed; Python's hash() is salted per process, crc32 is not."""
    return (zlib.crc32(cell_name.encode()) + split_seed) % (2**31)


JOURNAL_FILE = "optuna_journal.log"


def journal_path(storage_path: str, name: str) -> Path:
    """Where the search `name`'s Optuna journal lives while it runs: beside its Tune experiment
    when the storage is a folder; for object storage (s3://...), which cannot hold a locked,
    appended file, in a local folder of the node (the Tune snapshot carries a copy)."""
    if storage_path.startswith("file://"):
        storage_path = storage_path[len("file://"):]
    if "://" in storage_path:
        key = hashlib.sha256(storage_path.encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / "thighmri-optuna" / key / name / JOURNAL_FILE
    return Path(experiment_path(storage_path, name)) / JOURNAL_FILE


def _pruned_aware_searcher(space, *, seed: int, startup: int, max_epochs: int, journal: Path, study_name: str,
                           batches: list[int] | None = None):
    """OptunaSearch on a journal-file study that tells Optuna about scheduler-stopped trials as
    PRUNED, not COMPLETE.

    Ray reports an early-stopped trial's last (truncated) value as a completed result, which
    biases TPE towards configurations that look good early; Optuna's own pruned state excludes them.
    The journal is written as trials are told, so after a driver is killed it may be ahead of
    Tune's snapshot: a restored trial that the journal already has as finished is not told twice
    (Optuna refuses values for it), and `close_journal` fails the trials asked but lost with the driver.

    batches: configurations per Tune trial (study/config_batches.py), one entry per Tune trial;
    None: one each. A batched Tune trial's config is {"configs": [...], "optuna_trials": [...]};
    its K Optuna trials are told the scores it reports as config_score_<i> (FAIL when missing).
    """
    import pickle

    import optuna
    from optuna.trial import TrialState
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch
    from ray.tune.utils.util import unflatten_dict

    class PrunedAwareOptunaSearch(OptunaSearch):
        _batch_sizes: list[int] | None = None
        _batches: dict | None = None  # Tune trial id -> its Optuna trials

        def suggest(self, trial_id):
            if not self._batch_sizes:
                return super().suggest(trial_id)
            if trial_id not in self._batches:
                if len(self._batches) >= len(self._batch_sizes):
                    return Searcher.FINISHED
                k = self._batch_sizes[len(self._batches)]
                self._batches[trial_id] = [self._ot_study.ask(fixed_distributions=self._space) for _ in range(k)]
            asked = self._batches[trial_id]
            return {BATCH_KEY: [unflatten_dict(t.params) for t in asked], NUMBERS_KEY: [t.number for t in asked]}

        def _tell_batch(self, trial_id, result, error) -> None:
            storage = self._ot_study._storage
            for i, ot_trial in enumerate(self._batches[trial_id]):
                if storage.get_trial(ot_trial._trial_id).state.is_finished():
                    continue  # told before the driver was killed (see above)
                value = None if error or not result else result.get(f"config_score_{i}")
                if value is None:
                    self._ot_study.tell(ot_trial, state=TrialState.FAIL)
                else:
                    self._ot_study.tell(ot_trial, float(value))
            self._completed_trials.add(trial_id)

        def _told_before(self, trial_id) -> bool:
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is None or trial_id in self._completed_trials:
                return False
            if self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished():
                self._completed_trials.add(trial_id)
                return True
            return False

        def on_trial_result(self, trial_id, result):
            if self._batches and trial_id in self._batches:
                return  # a batch reports once, at its end, and is never pruned
            if self._told_before(trial_id):  # Optuna refuses values for a finished trial
                return
            super().on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id, result=None, error=False):
            if self._batches and trial_id in self._batches:
                if trial_id not in self._completed_trials:
                    self._tell_batch(trial_id, result, error)
                return
            if self._told_before(trial_id):
                return
            stopped_early = (result and not error and trial_id in self._ot_trials
                             and trial_id not in self._completed_trials
                             and result.get("training_iteration", max_epochs) < max_epochs)
            if stopped_early:
                self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
                self._completed_trials.add(trial_id)
                return
            super().on_trial_complete(trial_id, result=result, error=error)

        def save(self, checkpoint_path: str):
            state = self.__dict__.copy()
            state["_journal_bytes"] = journal.read_bytes() if journal.exists() else b""
            with open(checkpoint_path, "wb") as fh:
                pickle.dump(state, fh)

        def restore(self, checkpoint_path: str):
            with open(checkpoint_path, "rb") as fh:
                state = pickle.load(fh)
            saved = state.pop("_journal_bytes", b"")
            if saved and not journal.exists():  # resumed on a node without the file
                journal.parent.mkdir(parents=True, exist_ok=True)
                journal.write_bytes(saved)
            self.__dict__.update(state)

    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    searcher = PrunedAwareOptunaSearch(space=space, metric="best_val_score", mode="max", sampler=sampler,
                                       storage=journal_storage(journal), study_name=study_name)
    if batches and max(batches) > 1:
        searcher._batch_sizes, searcher._batches = list(batches), {}
    return searcher


def cell_trainable(cell_name: str):
    """`run_trial` under a name of its own for each cell.

    tune.with_parameters files its parameters in the cluster-wide registry under the
    function's str(); with one shared function, concurrent cells overwrite each other's
    context and every trial trains the cell registered last.
    """

    def trainable(config, ctx):
        return run_search_trial(config, ctx)

    trainable.__name__ = trainable.__qualname__ = f"trial__{cell_name}"
    return trainable


def run_search_trial(config: dict[str, Any], ctx: CellContext) -> None:
    """One Tune trial of a cell's search: a batch of configurations, or one."""
    if BATCH_KEY in config:  # several Optuna configurations in this Tune trial
        return run_batch_trial(config, ctx)
    return run_trial(config, ctx)


def concurrency_per_cell(grid: GridConfig, n_cells: int, cluster_cpus: float, cluster_gpus: float) -> int:
    """Trials a cell may run at once: an even share of the cluster, at least 1."""
    if grid.max_concurrent_per_cell:
        return grid.max_concurrent_per_cell
    res = grid.resources_per_trial
    slots = cluster_cpus / res.cpu if res.cpu else math.inf
    if res.gpu:
        slots = min(slots, cluster_gpus / res.gpu)
    return max(1, int(slots // max(1, n_cells)))


def experiment_path(storage_path: str, cell_name: str) -> str:
    """Where a cell's Tune experiment (trial results, checkpoints, searcher state) lives."""
    return f"{storage_path.rstrip('/')}/{cell_name}"


def _interrupted(results) -> bool:
    """Tune returned because it was told to stop (SIGUSR1), with trials still unfinished."""
    return results.num_terminated + results.num_errors < len(results)


def search_name(ctx: CellContext) -> str:
    """The search's Tune experiment and Optuna study name: the cell's, or `<cell>__outer<j>`."""
    return ctx.cell.name if ctx.outer_fold is None else f"{ctx.cell.name}__outer{ctx.outer_fold}"


def cell_searcher(ctx: CellContext, grid: GridConfig, *, storage_path: str):
    """The search's Optuna searcher (its own study and journal, a sampler seeded from its name)
    and its Tune trials' batch sizes (study/config_batches.py)."""
    name = search_name(ctx)
    batches = batch_sizes(grid.trials_per_cell, configs_per_trial(grid, ctx.train))
    searcher = _pruned_aware_searcher(optuna_space(grid.search), batches=batches,
                                      seed=cell_seed(name, grid.split.seed),
                                      journal=journal_path(storage_path, name), study_name=name,
                                      startup=grid.optuna_startup_trials,
                                      # only a scheduler stops trials early; without one nothing is pruned
                                      max_epochs=grid.train.epochs if grid.scheduler == "asha" else 0)
    return searcher, batches


def build_tuner(ctx: CellContext, grid: GridConfig, *, storage_path: str, max_concurrent: int):
    """The cell's Tuner: restored from its experiment folder when a resumed launch finds one
    (finished trials are kept, Optuna's state comes back, unfinished trials continue from their
    checkpoints), else a new one. A nested-CV outer fold (ctx.outer_fold) is an experiment of
    its own, `<cell>__outer<j>`, with a sampler seeded for that fold."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from study import progress

    trainable = tune.with_resources(tune.with_parameters(cell_trainable(ctx.cell.name), ctx=ctx),
                                    {"cpu": ctx.cpus_per_trial, "gpu": ctx.gpus_per_trial})
    name = search_name(ctx)
    path = experiment_path(storage_path, name)
    if tune.Tuner.can_restore(path):
        # errored trials used up their retries in the earlier session; they stay errored
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False), True
    searcher, batches = cell_searcher(ctx, grid, storage_path=storage_path)
    scheduler = None
    if grid.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=grid.train.epochs,
                                  grace_period=max(1, grid.train.epochs // 4))
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric="best_val_score", mode="max", search_alg=searcher,
                                    scheduler=scheduler, num_samples=len(batches),
                                    max_concurrent_trials=max_concurrent,
                                    # a finished trial's worker takes the cell's next trial: no new
                                    # process, no second import of torch (seconds per trial)
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name=name, storage_path=storage_path, verbose=0,
            callbacks=[progress.tune_callback(ctx.cell.name, ctx.progress_hub)],
            **run_settings(grid)),
    )
    return tuner, False


def run_settings(grid: GridConfig) -> dict[str, Any]:
    """A search's Tune RunConfig settings beyond its name, folder and callbacks."""
    from ray import tune

    # retries restart a trial from its checkpoint before Optuna hears of a failure
    return {"failure_config": tune.FailureConfig(max_failures=grid.trial_retries),
            "checkpoint_config": tune.CheckpointConfig(num_to_keep=1)}


def run_cell_search(ctx: CellContext, grid: GridConfig, *, storage_path: str, max_concurrent: int,
                    searched: list | None = None) -> dict[str, Any]:
    """Run (or continue) one cell's Optuna study as Ray Tune trials, then evaluate and log it.

    searched: the cell's Tune results when its trials ran in the launch's shared Tune run
    (study/shared_run.py); the task then only closes the cell.

    Returns the cell's results row; status "ok", "interrupted" (the launch was stopped: the
    cell continues on --resume) or "failed: ...". Never raises for a cell's own failure.
    """
    import os

    from mlflow.tracking import MlflowClient

    from study import evaluation, progress, tracking
    from study.trainable import _node_id

    client = MlflowClient(ctx.tracking_uri)
    progress.post(ctx.progress_hub, {"kind": "cell_start", "cell": ctx.cell.name, "pid": os.getpid(),
                                     "node": _node_id()})
    status = "FAILED"
    try:
        given, searched = searched, []  # (context, Tune results) per search: one, or one per outer fold
        for fold_ctx in (fold_contexts(ctx) if given is None else []):  # given: the shared run trained it
            tuner, restored = build_tuner(fold_ctx, grid, storage_path=storage_path, max_concurrent=max_concurrent)
            if restored:
                client.set_tag(ctx.cell_run_id, "resumed", "true")
            results = tuner.fit()
            if _interrupted(results) or progress.stop_requested(ctx.progress_hub):
                status = "KILLED"
                return {"cell": ctx.cell.name, **ctx.cell.axes, "cell_run_id": ctx.cell_run_id,
                        "status": "interrupted"}
            searched.append((fold_ctx, results))
        if given is not None:
            searched = [(ctx, given)]
        tracking.end_open_children(client, ctx.experiment_id, ctx.cell_run_id)
        journals = study_journals(ctx, storage_path)
        if ctx.outer_folds:
            row = evaluation.finish_nested_cell(ctx, grid, client, searched)
        else:
            row = evaluation.finish_cell(ctx, grid, client, searched[0][1])
        log_study_record(client, ctx.cell_run_id, journals)
        status = "FINISHED"
        return row
    except Exception as exc:  # one failing cell must not take the other cells' results with it
        client.set_tag(ctx.cell_run_id, "error", f"{type(exc).__name__}: {exc}"[:5000])
        return {"cell": ctx.cell.name, **ctx.cell.axes, "cell_run_id": ctx.cell_run_id,
                "status": f"failed: {type(exc).__name__}: {exc}"}
    finally:
        if status == "KILLED":
            tracking.end_open_children(client, ctx.experiment_id, ctx.cell_run_id)
        client.set_terminated(ctx.cell_run_id, status)


def search_names(ctx: CellContext) -> list[str]:
    """The cell's searches (Tune experiments and Optuna studies): its name, or one per outer fold."""
    if not ctx.outer_folds:
        return [ctx.cell.name]
    return [f"{ctx.cell.name}__outer{f.index}" for f in ctx.outer_folds]


def study_journals(ctx: CellContext, storage_path: str) -> list[tuple[str, Path]]:
    """(study name, journal file) of each of the cell's finished searches, lost trials closed."""
    journals = [(name, journal_path(storage_path, name)) for name in search_names(ctx)]
    for name, path in journals:
        close_journal(path, name)
    return journals


def log_study_record(client, cell_run_id: str, journals: list[tuple[str, Path]]) -> None:
    """The journals and Optuna's figures of them on the cell run. A failure here is tagged
    (`study_record_error`) and does not fail the cell: its result is already logged."""
    from study import figures

    try:
        log_journals(client, cell_run_id, journals)
        figures.log_study_figures(client, cell_run_id, journals)
    except Exception as exc:
        client.set_tag(cell_run_id, "study_record_error", f"{type(exc).__name__}: {exc}"[:5000])


def fold_contexts(ctx: CellContext) -> list[CellContext]:
    """The searches a cell runs: itself, or under nested CV one per outer fold, each with that
    fold's split (train + inner folds + test), labels and threshold."""
    import dataclasses

    if not ctx.outer_folds:
        return [ctx]
    return [dataclasses.replace(ctx, split=f.split, labels=f.labels, threshold=f.threshold,
                                threshold_rule=f.threshold_rule, outer_fold=f.index) for f in ctx.outer_folds]


def remote_cell_runner():
    """The cell search as a Ray task that holds no CPU itself: its trials hold the resources.

    Never retried by Ray: a rerun would start the cell's search again beside its own logged
    runs; a cell task that dies is reported as failed and continues on --resume instead.
    """
    import ray

    return ray.remote(num_cpus=0, max_retries=0)(run_cell_search)

