"""One trial: train a ResNet18 on a cell's training subjects, report validation accuracy.

Ray Tune calls `run_trial(config, ctx=...)` in a worker: `config` holds the hyperparameters
Optuna suggested, `ctx` (a `CellContext`) the cell's fixed settings and its subject-level split,
computed once in the driver. The engine (study/engine.py) is plain PyTorch; this file wraps it
with `ray.tune.report` and an MLflow run per trial, nested under the cell's run.
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


def run_trial(config: dict[str, Any], ctx: CellContext) -> None:
    """Ray Tune function trainable: one hyperparameter configuration of one cell."""
    import torch
    from mlflow.tracking import MlflowClient
    from ray import tune

    from data_prep.store import open_store
    from study import tracking
    from study.engine import fit
    from study.model import build_model, seed_everything

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
        loaders = make_loaders(store, ctx, train)
        model = build_model(weights=train.weights, freeze=train.freeze).to(device)
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
                with tempfile.TemporaryDirectory() as tmp:
                    torch.save({"state_dict": model.state_dict(), "train": dataclasses.asdict(train),
                                "epoch": epoch}, Path(tmp) / CHECKPOINT_FILE)
                    tune.report(report, checkpoint=tune.Checkpoint.from_directory(tmp))
            else:
                tune.report(report)

        fit(model, loaders["train"], loaders["val"], epochs=train.epochs, optimizer=train.optimizer,
            lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay, device=device,
            on_epoch=on_epoch)
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
