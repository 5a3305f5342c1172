"""Cells → Optuna studies → Ray Tune trials, all cells at once on one Ray cluster.

Ray Tune cannot mix `grid_search` with OptunaSearch, so the grid is the outer level: each cell
gets its own `Tuner` with its own Optuna study (seeded from the cell's name), run inside a
`@ray.remote(num_cpus=0)` task so that every cell's trials share the cluster concurrently.
When a cell's search ends, the task evaluates the trial chosen on validation subjects once
on the cell's held-out test subjects, and logs the summary and the model to the cell's run.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from study.config import GridConfig, SearchParam
from study.trainable import CHECKPOINT_FILE, CellContext, make_loaders, resolve_train_config, run_trial


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


def _pruned_aware_searcher(space, *, seed: int, startup: int, max_epochs: int):
    """OptunaSearch that tells Optuna about scheduler-stopped trials as PRUNED, not COMPLETE.

    Ray reports an early-stopped trial's last (truncated) value as a completed result, which
    biases TPE towards configurations that look good early; Optuna's own pruned state excludes them.
    """
    import optuna
    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

    class PrunedAwareOptunaSearch(OptunaSearch):
        def on_trial_complete(self, trial_id, result=None, error=False):
            stopped_early = (result and not error and trial_id in self._ot_trials
                             and trial_id not in self._completed_trials
                             and result.get("training_iteration", max_epochs) < max_epochs)
            if stopped_early:
                self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
                self._completed_trials.add(trial_id)
                return
            super().on_trial_complete(trial_id, result=result, error=error)

    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    return PrunedAwareOptunaSearch(space=space, metric="best_val_acc", mode="max", sampler=sampler)


def cell_trainable(cell_name: str):
    """`run_trial` under a name of its own for each cell.

    tune.with_parameters files its parameters in the cluster-wide registry under the
    function's str(); with one shared function, concurrent cells overwrite each other's
    context and every trial trains the cell registered last.
    """

    def trainable(config, ctx):
        return run_trial(config, ctx)

    trainable.__name__ = trainable.__qualname__ = f"trial__{cell_name}"
    return trainable


def concurrency_per_cell(grid: GridConfig, n_cells: int, cluster_cpus: float, cluster_gpus: float) -> int:
    """Trials a cell may run at once: an even share of the cluster, at least 1."""
    if grid.max_concurrent_per_cell:
        return grid.max_concurrent_per_cell
    res = grid.resources_per_trial
    slots = cluster_cpus / res.cpu if res.cpu else math.inf
    if res.gpu:
        slots = min(slots, cluster_gpus / res.gpu)
    return max(1, int(slots // max(1, n_cells)))


def _best_result(result_grid):
    """The trial chosen on validation: best subject accuracy, ties → lower validation loss."""
    candidates = [r for r in result_grid if r.error is None and r.checkpoint is not None and r.metrics]
    if not candidates:
        errors = [str(r.error)[:500] for r in result_grid if r.error is not None]
        raise RuntimeError("no trial of this cell finished with a checkpoint" + (f"; first error: {errors[0]}" if errors else ""))
    return max(candidates, key=lambda r: (r.metrics["best_val_acc"], -r.metrics["best_val_loss"]))


def evaluate_selected(ctx: CellContext, result) -> tuple[Any, dict[str, float], dict[str, Any], dict[str, np.ndarray]]:
    """Load the selected trial's best checkpoint and evaluate it on the cell's test subjects.

    Returns:
        (model, test_* metrics, {"train": TrainConfig, "epoch": int}, per-subject test
        predictions {"rows", "labels", "probs"} for the paired comparisons).
    """
    import torch

    from data_prep.store import open_store
    from study.engine import evaluate
    from study.metrics import summarize
    from study.model import build_model

    with result.checkpoint.as_directory() as ckpt_dir:
        saved = torch.load(Path(ckpt_dir) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    train = resolve_train_config(ctx.train, {k: v for k, v in saved["train"].items()
                                             if k in ("lr", "freeze", "optimizer", "momentum",
                                                      "weight_decay", "batch_size", "epochs")})
    # weights only matter for initialisation; the checkpoint holds every parameter
    model = build_model(weights="none", freeze=train.freeze)
    model.load_state_dict(saved["state_dict"])
    store = open_store(ctx.store)
    loaders = make_loaders(store, ctx, train, partitions=("test",))
    out = evaluate(model, loaders["test"])
    summary = summarize(out["subject_labels"], out["subject_probs"], train_labels=ctx.labels["train"],
                        seed=ctx.train.seed)
    test = {f"test_{k}": v for k, v in summary.items()}
    test["test_slice_acc"] = out["slice_acc"]
    predictions = {"rows": out["subject_rows"], "labels": out["subject_labels"], "probs": out["subject_probs"]}
    return model, test, {"train": train, "epoch": saved["epoch"]}, predictions


def size_and_saliency(ctx: CellContext, client, model, train, predictions: dict[str, np.ndarray]) -> dict[str, float]:
    """Body-size baseline beside the CNN, their paired accuracy difference, saliency PNGs.

    Logs params (size.*, saliency.*) and the saliency overlays as artifacts under "saliency"
    on the cell run; returns the metrics (size_test_*, cnn_minus_size_*, saliency_*) to log.
    """
    import tempfile

    from data_prep.store import open_store
    from study import tracking
    from study.body_size import FEATURES, paired_difference, size_baseline
    from study.engine import SUBJECT_THRESHOLD
    from study.saliency import saliency_report

    store = open_store(ctx.store)
    size = size_baseline(store, ctx.split, ctx.labels, seed=ctx.train.seed)
    test_rows = np.asarray(ctx.split["test"])
    if not np.array_equal(np.asarray(predictions["rows"]), test_rows) or not np.array_equal(size["test_rows"], test_rows):
        raise RuntimeError("CNN and size-baseline test subjects differ; cannot pair them")
    y = np.asarray(ctx.labels["test"])
    cnn_pred = (np.asarray(predictions["probs"]) >= SUBJECT_THRESHOLD).astype(np.int64)
    size_pred = (size["test_probs"] >= SUBJECT_THRESHOLD).astype(np.int64)
    diff, low, high = paired_difference(y, cnn_pred, size_pred, seed=ctx.train.seed)
    metrics = {f"size_test_{k}": float(v) for k, v in size.items()
               if k != "C" and np.isscalar(v) and not isinstance(v, str)}
    metrics.update({f"size_coef_{k}": v for k, v in size["coef"].items()})
    metrics.update(cnn_minus_size_acc=diff, cnn_minus_size_ci_low=low, cnn_minus_size_ci_high=high)
    tracking.log_params(client, ctx.cell_run_id, {
        "size.features": ",".join(FEATURES), "size.fit_on": size["fit_on"], "size.area_unit": size["unit"], "size.C": size["C"],
        "size.model": "median impute + StandardScaler + LogisticRegressionCV (L2, C by 5-fold log loss)"})

    # layer4 is 1/32 of the input: below 8x8 cells Grad-CAM is a blur, input gradients keep detail
    rows_in, cols_in = train.input_size or store.recipe.size
    method = "gradcam" if min(rows_in, cols_in) // 32 >= 8 else "gradient"
    with tempfile.TemporaryDirectory() as tmp:
        report = saliency_report(model.cpu(), store, predictions["rows"], predictions["labels"], predictions["probs"],
                                 out_dir=tmp, input_size=train.input_size, method=method)
        for path in report["paths"]:
            client.log_artifact(ctx.cell_run_id, str(path), "saliency")
    tracking.log_params(client, ctx.cell_run_id, {"saliency.method": method,
                                                  "saliency.layer": "layer4" if method == "gradcam" else "input",
                                                  "saliency.n_subjects": len(report["paths"])})
    metrics.update(saliency_periphery_fraction=report["periphery_fraction"],
                   saliency_periphery_area_fraction=report["periphery_area_fraction"])
    return metrics


def run_cell_search(ctx: CellContext, grid: GridConfig, *, storage_path: str, max_concurrent: int) -> dict[str, Any]:
    """Run one cell's Optuna study as Ray Tune trials, then evaluate and log the selected model."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from study import tracking

    client = MlflowClient(ctx.tracking_uri)
    searcher = _pruned_aware_searcher(optuna_space(grid.search),
                                      seed=cell_seed(ctx.cell.name, grid.split.seed),
                                      startup=grid.optuna_startup_trials,
                                      # only a scheduler stops trials early; without one nothing is pruned
                                      max_epochs=grid.train.epochs if grid.scheduler == "asha" else 0)
    scheduler = None
    if grid.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=grid.train.epochs,
                                  grace_period=max(1, grid.train.epochs // 4))
    trainable = tune.with_resources(tune.with_parameters(cell_trainable(ctx.cell.name), ctx=ctx),
                                    {"cpu": ctx.cpus_per_trial, "gpu": ctx.gpus_per_trial})
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric="best_val_acc", mode="max", search_alg=searcher,
                                    scheduler=scheduler, num_samples=grid.trials_per_cell,
                                    max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(
            name=f"{ctx.cell_run_id}__{ctx.cell.name}", storage_path=storage_path, verbose=0,
            # retries happen before Optuna hears of a failure (it keeps resumed trials FAILED)
            failure_config=tune.FailureConfig(max_failures=1),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
    )
    status = "FAILED"
    try:
        results = tuner.fit()
        tracking.end_open_children(client, ctx.experiment_id, ctx.cell_run_id)
        best = _best_result(results)
        replication = grid.protocol == "seed_replication"
        eval_ctx = validation_as_reported(ctx) if replication else ctx
        model, test_metrics, chosen, predictions = evaluate_selected(eval_ctx, best)
        try:
            extra_metrics = size_and_saliency(eval_ctx, client, model, chosen["train"], predictions)
        except Exception as exc:  # the CNN's own result still counts without the comparisons
            client.set_tag(ctx.cell_run_id, "size_saliency_error", f"{type(exc).__name__}: {exc}"[:5000])
            extra_metrics = {}
        n_trials = len(results)
        n_errors = sum(r.error is not None for r in results)
        summary = {"best_val_acc": best.metrics["best_val_acc"], "best_val_loss": best.metrics["best_val_loss"],
                   "best_epoch": chosen["epoch"], "n_trials": n_trials, "n_trials_failed": n_errors,
                   **test_metrics, **extra_metrics}
        if replication:  # name the numbers for what they are: validation subjects, also used for selection
            summary = {k.replace("test_", "val_"): v for k, v in summary.items()}
        client.set_tag(ctx.cell_run_id, "reported_partition", "val" if replication else "test")
        tracking.log_metrics(client, ctx.cell_run_id, summary)
        chosen_params = {f"best.{k}": v for k, v in dataclasses.asdict(chosen["train"]).items()
                         if k in {p.name for p in grid.search}}
        tracking.log_params(client, ctx.cell_run_id, chosen_params)
        metadata = {"recipe": None, "input_size": list(chosen["train"].input_size or []) or None,
                    "slices_per_subject": chosen["train"].slices_per_subject, "measure": ctx.cell.measure,
                    "direction": ctx.direction, "threshold": ctx.threshold, "threshold_rule": ctx.threshold_rule,
                    "cell": ctx.cell.name, "axes": ctx.cell.axes, "store_hash": ctx.store_hash,
                    "classes": ["low", "high"], "val_acc": summary["best_val_acc"],
                    "test_acc": summary.get("test_acc")}
        from data_prep.store import open_store

        metadata["recipe"] = open_store(ctx.store).recipe.to_dict()
        mlflow.set_tracking_uri(ctx.tracking_uri)
        with mlflow.start_run(run_id=ctx.cell_run_id):
            info = mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                            metadata=metadata, pip_requirements=["torch", "torchvision"])
        client.set_tag(ctx.cell_run_id, "model_uri", info.model_uri)
        status = "FINISHED"
        return {"cell": ctx.cell.name, **ctx.cell.axes, **summary, "model_uri": info.model_uri,
                "reported_partition": "val" if replication else "test",
                "cell_run_id": ctx.cell_run_id, "status": "ok", **{k: v for k, v in chosen_params.items()}}
    except Exception as exc:  # one failing cell must not take the other cells' results with it
        client.set_tag(ctx.cell_run_id, "error", f"{type(exc).__name__}: {exc}"[:5000])
        return {"cell": ctx.cell.name, **ctx.cell.axes, "status": f"failed: {type(exc).__name__}: {exc}"}
    finally:
        client.set_terminated(ctx.cell_run_id, status)


def validation_as_reported(ctx: CellContext) -> CellContext:
    """The seed's protocol: the validation subjects play the test set's part (optimistically)."""
    empty = ctx.split["val"][:0]
    return dataclasses.replace(
        ctx, split={"train": ctx.split["train"], "val": empty, "test": ctx.split["val"]},
        labels={"train": ctx.labels["train"], "val": ctx.labels["val"][:0], "test": ctx.labels["val"]})


def remote_cell_runner():
    """The cell search as a Ray task that holds no CPU itself: its trials hold the resources."""
    import ray

    return ray.remote(num_cpus=0)(run_cell_search)

