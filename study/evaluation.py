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
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from study import tracking
from study.config import GridConfig
from study.trainable import CellContext, load_checkpoint, make_loaders, model_from_checkpoint, resolve_train_config

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
    loaders = make_loaders(store, ctx, train, partitions=("test",))
    out = evaluate(model, loaders["test"])
    summary = summarize(out["subject_labels"], out["subject_probs"], train_labels=ctx.labels["train"],
                        seed=ctx.train.seed)
    test = {f"test_{k}": v for k, v in summary.items()}
    test["test_slice_acc"] = out["slice_acc"]
    predictions = {"rows": out["subject_rows"], "labels": out["subject_labels"], "probs": out["subject_probs"]}
    return model, test, {"train": train, "epoch": int(saved["fit"]["best_epoch"])}, predictions


def size_and_saliency(ctx: CellContext, client, model, train, predictions: dict[str, np.ndarray]) -> dict[str, float]:
    """Body-size baseline beside the CNN, their paired accuracy difference, saliency PNGs.

    Logs params (size.*, saliency.*) and the saliency overlays as artifacts under "saliency"
    on the cell run; returns the metrics (size_test_*, cnn_minus_size_*, saliency_*) to log.
    """
    from data_prep.store import open_store
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


def validation_as_reported(ctx: CellContext) -> CellContext:
    """The seed's protocol: the validation subjects play the test set's part (optimistically)."""
    empty = ctx.split["val"][:0]
    return dataclasses.replace(
        ctx, split={"train": ctx.split["train"], "val": empty, "test": ctx.split["val"]},
        labels={"train": ctx.labels["train"], "val": ctx.labels["val"][:0], "test": ctx.labels["val"]})


def finish_cell(ctx: CellContext, grid: GridConfig, client, results) -> dict[str, Any]:
    """Select on validation, evaluate once on test, log summary + predictions + model; the row."""
    import mlflow

    from study.packaging import log_cell_model

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
               "best_epoch": chosen["epoch"], "n_trials": len(results),
               "n_trials_failed": sum(r.error is not None for r in results), **test_metrics, **extra_metrics}
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
    mlflow.set_tracking_uri(ctx.tracking_uri)
    with mlflow.start_run(run_id=ctx.cell_run_id):  # a pyfunc from code: study/packaging.py
        info = log_cell_model(ctx, model, chosen["train"], summary)
    lap("log_model")
    tracking.log_metrics(client, ctx.cell_run_id, seconds)
    client.set_tag(ctx.cell_run_id, "model_uri", info.model_uri)
    return {"cell": ctx.cell.name, **ctx.cell.axes, **summary, "model_uri": info.model_uri,
            "reported_partition": partition, "cell_run_id": ctx.cell_run_id, "status": "ok", **chosen_params}


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
