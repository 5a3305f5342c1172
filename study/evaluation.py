"""After a cell's search: the selected trial on the test subjects, the comparisons, the model.

`finish_cell` is what a cell task does once its Tune experiment has ended: choose the trial on
validation (never test), evaluate its best epoch once on the cell's held-out test subjects,
add the body-size baseline and saliency, log the summary, the per-subject test predictions and
the model to the cell's MLflow run, and return the cell's row of the results table.
`row_from_run` rebuilds that row from MLflow for a cell kept by a resumed launch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from study import tracking
from study.config import GridConfig
from study.config_batches import BATCH_KEY
from study.trainable import (CellContext, eval_inputs, load_checkpoint, model_from_checkpoint,
                             resolve_train_config)

PREDICTIONS_FILE = "test_predictions.json"  # store rows, labels, probabilities of the reported subjects
SEARCHED_KEYS = ("lr", "freeze", "optimizer", "momentum", "weight_decay", "batch_size", "epochs")


def best_result(result_grid):
    """The trial chosen on validation: best selection score, ties -> lower validation loss."""
    candidates = [r for r in result_grid if r.error is None and r.checkpoint is not None and r.metrics]
    if not candidates:
        errors = [str(r.error)[:500] for r in result_grid if r.error is not None]
        raise RuntimeError("no trial of this cell finished with a checkpoint"
                           + (f"; first error: {errors[0]}" if errors else ""))
    return max(candidates, key=lambda r: (r.metrics.get("best_val_score", r.metrics["best_val_acc"]),
                                          -r.metrics["best_val_loss"]))


def configs_in(result) -> int:
    """Optuna configurations a Tune trial trained: K for a batch (study/config_batches.py), else 1."""
    return len((result.config or {}).get(BATCH_KEY) or [None])


def evaluate_selected(ctx: CellContext, result) -> tuple[Any, dict[str, float], dict[str, Any], dict[str, np.ndarray]]:
    """Rebuild the selected trial's best-epoch model and evaluate it on the cell's test subjects.

    Returns:
        (model, test_* metrics, {"train": TrainConfig, "epoch": int}, per-subject test
        predictions {"rows", "labels", "probs"} for the paired comparisons).
    """
    from data_prep.store import open_store
    from study.engine import evaluate
    from study.metrics import summarize

    saved = load_checkpoint(result.checkpoint)
    train = resolve_train_config(ctx.train, {k: v for k, v in saved["train"].items() if k in SEARCHED_KEYS})
    model = model_from_checkpoint(saved, train)
    store = open_store(ctx.store)
    module, loader, _ = eval_inputs(store, ctx, train, model, cached=saved.get("module") == "head")
    out = evaluate(module, loader)  # a head on cached features: the numbers its validation ran on
    summary = summarize(out["subject_labels"], out["subject_probs"], train_labels=ctx.labels["train"],
                        seed=ctx.train.seed)
    test = {f"test_{k}": v for k, v in summary.items()}
    test["test_slice_acc"] = out["slice_acc"]
    predictions = {"rows": out["subject_rows"], "labels": out["subject_labels"], "probs": out["subject_probs"]}
    return model, test, {"train": train, "epoch": int(saved["fit"]["best_epoch"])}, predictions


def size_metrics(ctx: CellContext, client, predictions: dict[str, np.ndarray],
                 fit_on: tuple[str, ...] | None = None) -> dict[str, float]:
    """The size+age baseline on the cell's test subjects beside the CNN's predictions for them.

    Logs the size.* params on the cell run; returns size_age_test_* and cnn_minus_size_age_*.
    """
    from data_prep.store import open_store
    from study.body_size import DEFAULT_FIT_ON, FEATURES, METRIC_PREFIX, SIZE_MODEL_NAME, size_baseline, size_comparison

    size = size_baseline(open_store(ctx.store), ctx.split, ctx.labels, seed=ctx.train.seed,
                         fit_on=fit_on or DEFAULT_FIT_ON)
    test_rows = np.asarray(ctx.split["test"])
    if not np.array_equal(np.asarray(predictions["rows"]), test_rows) or not np.array_equal(size["test_rows"], test_rows):
        raise RuntimeError("CNN and size-baseline test subjects differ; cannot pair them")
    metrics = {f"{METRIC_PREFIX}test_{k}": float(v) for k, v in size.items()
               if k != "C" and np.isscalar(v) and not isinstance(v, str)}
    metrics.update({f"{METRIC_PREFIX}coef_{k}": v for k, v in size["coef"].items()})
    metrics.update(size_comparison(ctx.labels["test"], predictions["probs"], size["test_probs"], seed=ctx.train.seed))
    tracking.log_params(client, ctx.cell_run_id, {
        "size.name": SIZE_MODEL_NAME, "size.features": ",".join(FEATURES), "size.fit_on": size["fit_on"],
        "size.area_unit": size["unit"], "size.C": size["C"],
        "size.model": "median impute + StandardScaler + LogisticRegressionCV (L2, C by 5-fold log loss)"})
    return {**metrics, "_size_test_probs": size["test_probs"]}


def saliency_metrics(ctx: CellContext, client, model, train, predictions: dict[str, np.ndarray]) -> dict[str, float]:
    """Saliency overlays of the test subjects (artifacts under "saliency"); periphery metrics."""
    from data_prep.store import open_store
    from study.saliency import saliency_report

    store = open_store(ctx.store)
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
    return {"saliency_periphery_fraction": report["periphery_fraction"],
            "saliency_periphery_area_fraction": report["periphery_area_fraction"]}


def size_and_saliency(ctx: CellContext, client, model, train, predictions: dict[str, np.ndarray]) -> dict[str, float]:
    """Both of the above for a holdout cell (metrics to log)."""
    metrics = size_metrics(ctx, client, predictions)
    metrics.pop("_size_test_probs")
    return {**metrics, **saliency_metrics(ctx, client, model, train, predictions)}


def validation_as_reported(ctx: CellContext) -> CellContext:
    """The seed's protocol: the validation subjects play the test set's part (optimistically)."""
    empty = ctx.split["val"][:0]
    return dataclasses.replace(
        ctx, split={"train": ctx.split["train"], "val": empty, "test": ctx.split["val"]},
        labels={"train": ctx.labels["train"], "val": ctx.labels["val"][:0], "test": ctx.labels["val"]})


def finish_cell(ctx: CellContext, grid: GridConfig, client, results) -> dict[str, Any]:
    """Select on validation, evaluate once on test, log summary + predictions + model; the row."""
    clock = [time.perf_counter()]
    seconds: dict[str, float] = {}

    def lap(name: str) -> None:  # where a cell's closing minutes go, logged as time_*_s
        now = time.perf_counter()
        seconds[f"time_{name}_s"] = now - clock[0]
        clock[0] = now

    best = best_result(results)
    replication = grid.protocol == "seed_replication"
    eval_ctx = validation_as_reported(ctx) if replication else ctx
    model, test_metrics, chosen, predictions = evaluate_selected(eval_ctx, best)
    lap("test_eval")
    try:
        extra_metrics = size_and_saliency(eval_ctx, client, model, chosen["train"], predictions)
    except Exception as exc:  # the CNN's own result still counts without the comparisons
        client.set_tag(ctx.cell_run_id, "size_saliency_error", f"{type(exc).__name__}: {exc}"[:5000])
        extra_metrics = {}
    lap("size_saliency")
    summary = {"best_val_acc": best.metrics["best_val_acc"], "best_val_loss": best.metrics["best_val_loss"],
               "best_epoch": chosen["epoch"], "n_trials": sum(configs_in(r) for r in results),
               "n_trials_failed": sum(configs_in(r) for r in results if r.error is not None),
               **test_metrics, **extra_metrics}
    if replication:  # name the numbers for what they are: validation subjects, also used for selection
        summary = {k.replace("test_", "val_"): v for k, v in summary.items()}
    partition = "val" if replication else "test"
    client.set_tag(ctx.cell_run_id, "reported_partition", partition)
    tracking.log_metrics(client, ctx.cell_run_id, summary)
    chosen_params = {f"best.{k}": v for k, v in dataclasses.asdict(chosen["train"]).items()
                     if k in {p.name for p in grid.search}}
    tracking.log_params(client, ctx.cell_run_id, chosen_params)
    tracking.log_json(client, ctx.cell_run_id, {k: np.asarray(v).tolist() for k, v in predictions.items()},
                      PREDICTIONS_FILE)
    log_figures(client, ctx.cell_run_id, predictions, partition)
    model_uri = log_cell_model(ctx, model, chosen, summary)
    lap("log_model")
    tracking.log_metrics(client, ctx.cell_run_id, seconds)
    client.set_tag(ctx.cell_run_id, "model_uri", model_uri)
    return {"cell": ctx.cell.name, **ctx.cell.axes, **summary, "model_uri": model_uri,
            "reported_partition": partition, "cell_run_id": ctx.cell_run_id, "status": "ok", **chosen_params}


def log_figures(client, run_id: str, predictions: dict, partition: str) -> None:
    """ROC curve and confusion matrix of the reported subjects (study/figures.py); a figure that
    fails is tagged `figures_error`, the cell's result stands."""
    from study import figures

    try:
        figures.log_prediction_figures(client, run_id, predictions, partition)
    except Exception as exc:
        client.set_tag(run_id, "figures_error", f"{type(exc).__name__}: {exc}"[:5000])


def log_cell_model(ctx: CellContext, model, chosen: dict[str, Any], summary: dict[str, Any]) -> str:
    """The selected model on the cell run: an MLflow pyfunc from code with its preprocessing,
    training acquisition ranges and card (study/model_package.py); returns its model URI."""
    import mlflow

    from study import model_package

    mlflow.set_tracking_uri(ctx.tracking_uri)
    with mlflow.start_run(run_id=ctx.cell_run_id):
        return model_package.log_cell_model(ctx, model, chosen["train"], summary).model_uri


def finish_nested_cell(ctx: CellContext, grid: GridConfig, client, searched: list) -> dict[str, Any]:
    """Nested CV: each outer fold's trial selected on its inner folds, scored on that fold's test
    subjects; the pooled outer-fold predictions (every subject of the cell tested once) scored
    like a holdout test set (study.metrics.pooled_outer_summary), beside the size+age baseline
    fitted per fold the same way. The model logged is the outer fold's selected model with the
    best inner-fold selection score (tag model_outer_fold): nested CV estimates how well the
    whole procedure does; any one fold's model is one draw of it.

    Args:
        searched: (outer-fold CellContext, its Tune results) in fold order.
    """
    from data_prep.store import open_store
    from study.body_size import FEATURES, METRIC_PREFIX, SIZE_MODEL_NAME, size_baseline, size_comparison
    from study.metrics import pooled_outer_summary

    store = open_store(ctx.store)
    folds, sizes, preds, best = [], [], [], None
    for fctx, results in searched:
        chosen_trial = best_result(results)
        model, fold_test, chosen, p = evaluate_selected(fctx, chosen_trial)
        folds.append({"labels": p["labels"], "probs": p["probs"], "train_labels": fctx.labels["train"]})
        preds.append(p)
        size = size_baseline(store, fctx.split, fctx.labels, seed=ctx.train.seed, fit_on=("train",))
        sizes.append({"labels": p["labels"], "probs": size["test_probs"], "train_labels": fctx.labels["train"]})
        score = chosen_trial.metrics.get("best_val_score", -math.inf)
        tracking.log_metrics(client, ctx.cell_run_id, {"outer_test_acc": fold_test["test_acc"],
                                                       "outer_best_val_score": score}, step=fctx.outer_fold)
        if best is None or score > best[0]:
            best = (score, fctx, model, chosen, chosen_trial, p)
    _, bctx, model, chosen, chosen_trial, bpred = best
    summary = {f"test_{k}": v for k, v in pooled_outer_summary(folds, seed=ctx.train.seed).items()}
    summary.update({f"{METRIC_PREFIX}test_{k}": v
                    for k, v in pooled_outer_summary(sizes, seed=ctx.train.seed).items()})
    labels = np.concatenate([f["labels"] for f in folds])
    summary.update(size_comparison(labels, np.concatenate([f["probs"] for f in folds]),
                                   np.concatenate([f["probs"] for f in sizes]), seed=ctx.train.seed))
    tracking.log_params(client, ctx.cell_run_id, {
        "size.name": SIZE_MODEL_NAME, "size.features": ",".join(FEATURES), "size.fit_on": "train (per outer fold)",
        "size.model": "median impute + StandardScaler + LogisticRegressionCV (L2, C by 5-fold log loss)"})
    try:
        summary.update(saliency_metrics(bctx, client, model, chosen["train"], bpred))
    except Exception as exc:  # the CNN's own result still counts without the overlays
        client.set_tag(ctx.cell_run_id, "size_saliency_error", f"{type(exc).__name__}: {exc}"[:5000])
    summary.update({"best_val_acc": chosen_trial.metrics["best_val_acc"],
                    "best_val_loss": chosen_trial.metrics["best_val_loss"], "best_epoch": chosen["epoch"],
                    "n_trials": sum(len(r) for _, r in searched),
                    "n_trials_failed": sum(t.error is not None for _, r in searched for t in r)})
    tracking.set_tags(client, ctx.cell_run_id, {"reported_partition": "test", "model_outer_fold": bctx.outer_fold})
    tracking.log_metrics(client, ctx.cell_run_id, summary)
    order = np.argsort(np.concatenate([p["rows"] for p in preds]), kind="stable")
    pooled = {k: np.concatenate([p[k] for p in preds])[order] for k in ("rows", "labels", "probs")}
    tracking.log_json(client, ctx.cell_run_id, {k: v.tolist() for k, v in pooled.items()}, PREDICTIONS_FILE)
    log_figures(client, ctx.cell_run_id, pooled, "test")
    chosen_params = {f"best.{k}": v for k, v in dataclasses.asdict(chosen["train"]).items()
                     if k in {p.name for p in grid.search}}
    tracking.log_params(client, ctx.cell_run_id, chosen_params)
    model_uri = log_cell_model(bctx, model, chosen, summary)
    client.set_tag(ctx.cell_run_id, "model_uri", model_uri)
    return {"cell": ctx.cell.name, **ctx.cell.axes, **summary, "model_uri": model_uri, "reported_partition": "test",
            "cell_run_id": ctx.cell_run_id, "status": "ok", **chosen_params}


def row_from_run(run) -> dict[str, Any]:
    """The results-table row of a finished cell, read back from its MLflow run (resume)."""
    params, tags = run.data.params, run.data.tags
    axes = {k: params[k] for k in ("cohort", "measure", "sex", "bmi") if k in params}
    return {"cell": tags.get("cell", run.info.run_name), **axes, **run.data.metrics,
            **{k: v for k, v in params.items() if k.startswith("best.")},
            "model_uri": tags.get("model_uri"), "reported_partition": tags.get("reported_partition", "test"),
            "cell_run_id": run.info.run_id, "status": "ok", "kept": True}


def load_predictions(client, run_id: str) -> dict[str, np.ndarray] | None:
    """A finished cell's per-subject test predictions (None for runs logged before them)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, PREDICTIONS_FILE, tmp)
        except Exception:
            return None
        return {k: np.asarray(v) for k, v in json.loads(Path(path).read_text()).items()}
