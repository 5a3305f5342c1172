"""One trial: train a ResNet18 on a cell's training subjects, report validation accuracy.

Ray Tune calls `run_trial(config, ctx=...)` in a worker: `config` holds the hyperparameters
Optuna suggested, `ctx` (a `CellContext`) the cell's fixed settings and its subject-level split,
computed once in the driver. The engine (study/engine.py) is plain PyTorch; this file wraps it
with `ray.tune.report` and an MLflow run per trial, nested under the cell's run.

When the frozen part of the network cannot change during the trial (freeze fc/layer4/layer3,
no random augmentation), `build_trial` trains only the head on frozen-prefix outputs from the
node's feature cache (study/features.py); the model it returns is still the full ThighResNet.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from study.config import Cell, TrainConfig

CHECKPOINT_FILE = "model_state.pt"


@dataclass
class CellContext:
    """Everything a trial of one cell needs, decided in the driver before any trial starts."""

    cell: Cell
    store: str
    store_hash: str
    train: TrainConfig
    split: dict[str, np.ndarray]  # partition → store row indices (subject-level)
    labels: dict[str, np.ndarray]  # partition → 0/1 per subject, aligned with split
    threshold: float
    threshold_rule: str
    direction: str
    tracking_uri: str
    experiment_id: str
    cell_run_id: str
    cpus_per_trial: float
    gpus_per_trial: float
    protocol: str = "holdout"  # holdout | seed_replication | nested_cv (see study/config.py)


def resolve_train_config(base: TrainConfig, suggested: dict[str, Any]) -> TrainConfig:
    """The trial's training settings: the grid's fixed values overridden by Optuna's suggestions."""
    typed = {k: (int(v) if k in ("batch_size", "epochs") else v) for k, v in suggested.items()}
    return dataclasses.replace(base, **typed)


def _device(ctx: CellContext) -> str:
    import torch

    return "cuda" if ctx.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu"


def make_loaders(store, ctx: CellContext, train: TrainConfig, partitions=("train", "val")):
    """DataLoaders over preloaded slices of the requested partitions (subject-level split)."""
    import torch

    from study.data import SliceDataset

    loaders = {}
    for part in partitions:
        ds = SliceDataset(store, ctx.split[part], ctx.labels[part], input_size=train.input_size,
                          slices_per_subject=train.slices_per_subject)
        gen = torch.Generator().manual_seed(train.seed)
        loaders[part] = torch.utils.data.DataLoader(
            ds, batch_size=train.batch_size, shuffle=(part == "train"), generator=gen,
            num_workers=train.num_workers)
    return loaders


def build_trial(store, ctx: CellContext, train: TrainConfig, *, device: str = "cpu",
                cache_dir: str | None = None):
    """The trial's model, the module to fit, its train/val loaders, and how they were made.

    Call right after seed_everything(train.seed): the model's initial weights come from it.

    Returns:
        (model, fit_model, loaders, info): model is the full ThighResNet that gets checkpointed;
        fit_model is the module engine.fit trains: model itself, or a features.FeatureHead
        sharing model's head modules when the feature cache applies; info["feature_cache"]
        says "used" or why not, plus the cache's stats when used.
    """
    import warnings

    from study import features
    from study.model import build_model

    model = build_model(weights=train.weights, freeze=train.freeze).to(device)
    reason = features.ineligible_reason(train, store)
    if reason is None:
        try:
            loaders, head, stats = features.feature_loaders(
                store, ctx.split, ctx.labels, train, model, cache_dir=cache_dir, device=device)
            return model, head, loaders, {"feature_cache": "used", **stats}
        except OSError as err:  # an unwritable or full cache disk costs speed, not the trial
            reason = f"cache unavailable ({type(err).__name__}: {err})"
            warnings.warn(f"feature cache not used: {reason}")
    return model, model, make_loaders(store, ctx, train), {"feature_cache": f"off: {reason}"}


def run_trial(config: dict[str, Any], ctx: CellContext) -> None:
    """Ray Tune function trainable: one hyperparameter configuration of one cell."""
    import torch
    from mlflow.tracking import MlflowClient
    from ray import tune

    from data_prep.store import open_store
    from study import tracking
    from study.engine import fit
    from study.model import seed_everything

    train = resolve_train_config(ctx.train, config)
    torch.set_num_threads(max(1, int(ctx.cpus_per_trial)))
    seed_everything(train.seed)
    device = _device(ctx)

    client = MlflowClient(ctx.tracking_uri)
    trial_name = tune.get_context().get_trial_name()
    run_id = tracking.create_run(client, ctx.experiment_id, name=f"{ctx.cell.name}/{trial_name}",
                                 run_type="trial", parent_run_id=ctx.cell_run_id,
                                 tags={"cell": ctx.cell.name, "trial": trial_name})
    tracking.log_params(client, run_id, {**{k: v for k, v in dataclasses.asdict(train).items()},
                                         **{f"axis.{k}": v for k, v in ctx.cell.axes.items()},
                                         "store_hash": ctx.store_hash})
    status = "FAILED"
    try:
        store = open_store(ctx.store)
        if ctx.protocol == "nested_cv":
            run_cv_trial(store, ctx, train, client=client, run_id=run_id, device=device)
            status = "FINISHED"
            return
        model, fit_model, loaders, how = build_trial(store, ctx, train, device=device)
        client.set_tag(run_id, "feature_cache", how["feature_cache"][:250])
        best = {"acc": -math.inf, "loss": math.inf}

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            val_acc, val_loss = float(metrics["val_subject_acc"]), float(metrics["val_loss"])
            improved = val_acc > best["acc"] or (val_acc == best["acc"] and val_loss < best["loss"])
            if improved:  # same rule as engine.fit: best subject accuracy, ties → lower loss
                best.update(acc=val_acc, loss=val_loss, epoch=epoch)
            report = {"val_acc": val_acc, "val_loss": val_loss, "train_loss": float(metrics["train_loss"]),
                      "val_slice_acc": float(metrics.get("val_slice_acc", float("nan"))),
                      "best_val_acc": best["acc"], "best_val_loss": best["loss"], "epoch": epoch}
            tracking.log_metrics(client, run_id, {k: v for k, v in report.items() if k != "epoch"}, step=epoch)
            if improved:
                _save_checkpoint(model, train, epoch, report)
            else:
                tune.report(report)

        fit(fit_model, loaders["train"], loaders["val"], epochs=train.epochs, optimizer=train.optimizer,
            lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay, device=device,
            on_epoch=on_epoch)
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)


def _save_checkpoint(model, train: TrainConfig, epoch: int, report: dict) -> None:
    import torch
    from ray import tune

    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"state_dict": model.state_dict(), "train": dataclasses.asdict(train), "epoch": epoch},
                   Path(tmp) / CHECKPOINT_FILE)
        tune.report(report, checkpoint=tune.Checkpoint.from_directory(tmp))


def run_cv_trial(store, ctx: CellContext, train: TrainConfig, *, client, run_id: str, device: str) -> None:
    """Nested CV, inner loop: k fits (one per held-out fold) → the epoch with the best mean
    fold accuracy → one refit on all non-test subjects for that many epochs, checkpointed.

    The reported `best_val_acc` is the mean inner-fold subject accuracy at the chosen epoch;
    the test subjects are never touched here.
    """
    import numpy as np
    from ray import tune

    from study import tracking
    from study.engine import fit
    from study.model import seed_everything

    folds = sorted((k for k in ctx.split if k.startswith("fold")), key=lambda k: int(k[4:]))
    acc_curves, loss_curves = [], []
    for i, fold in enumerate(folds):
        rest = [f for f in folds if f != fold]
        fold_ctx = dataclasses.replace(
            ctx, split={"train": np.concatenate([ctx.split[f] for f in rest]), "val": ctx.split[fold]},
            labels={"train": np.concatenate([ctx.labels[f] for f in rest]), "val": ctx.labels[fold]})
        seed_everything(train.seed)
        _, fit_model, loaders, _ = build_trial(store, fold_ctx, train, device=device)
        history = fit(fit_model, loaders["train"], loaders["val"], epochs=train.epochs, optimizer=train.optimizer,
                      lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay,
                      device=device)["history"]
        acc_curves.append([h["val_subject_acc"] for h in history])
        loss_curves.append([h["val_loss"] for h in history])
        fold_best = max(acc_curves[-1])
        tracking.log_metrics(client, run_id, {"fold_best_val_acc": fold_best}, step=i)
        tune.report({"best_val_acc": float(np.mean([max(c) for c in acc_curves])), "fold": i,
                     "best_val_loss": float(np.mean([min(c) for c in loss_curves]))})
    mean_acc, mean_loss = np.mean(acc_curves, axis=0), np.mean(loss_curves, axis=0)
    best_epoch = 1 + max(range(len(mean_acc)), key=lambda e: (mean_acc[e], -mean_loss[e]))
    for epoch, (a, l) in enumerate(zip(mean_acc, mean_loss), start=1):
        tracking.log_metrics(client, run_id, {"cv_val_acc": float(a), "cv_val_loss": float(l)}, step=epoch)
    # refit on every non-test subject; "val" is unused (fit gets none) but keeps the loaders' shape
    seed_everything(train.seed)
    refit_ctx = dataclasses.replace(ctx, split={"train": ctx.split["train"], "val": ctx.split[folds[0]]},
                                    labels={"train": ctx.labels["train"], "val": ctx.labels[folds[0]]})
    model, fit_model, loaders, _ = build_trial(store, refit_ctx, train, device=device)
    fit(fit_model, loaders["train"], None, epochs=best_epoch, optimizer=train.optimizer, lr=train.lr,
        momentum=train.momentum, weight_decay=train.weight_decay, device=device)
    report = {"best_val_acc": float(mean_acc[best_epoch - 1]), "best_val_loss": float(mean_loss[best_epoch - 1]),
              "cv_best_epoch": best_epoch, "fold": len(folds)}
    tracking.log_metrics(client, run_id, {"best_val_acc": report["best_val_acc"], "cv_best_epoch": best_epoch})
    _save_checkpoint(model, train, best_epoch, report)
