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

import contextlib
import dataclasses
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from study import tracking
from study.config import Cell, TrainConfig
from study.head_fit import fit_head_like_engine, head_trainer_reason
from study.selection import epoch_key, from_engine, reportable, selection_value

CHECKPOINT_FILE = "model_state.pt"
LOG_EVERY_S = 5.0  # a trial's epoch metrics reach MLflow at least this often (and at every checkpoint)


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
    checkpoint_interval_s: float = 30.0  # see GridConfig.checkpoint_interval_s
    select_on: str = "balanced_acc"  # epoch, trial and ASHA selection (study/selection.py)
    # nested CV: the plan's OuterFolds (study/plan.py); the cell runs one search per outer fold,
    # each with that fold's split, labels and threshold in the fields above (outer_fold = its index)
    # every epoch goes to Tune (ASHA decides on them); without a scheduler a compiled-head trial
    # reports only its last epoch (50 round trips to the driver cost more than its training)
    report_each_epoch: bool = True
    outer_folds: tuple = ()
    outer_fold: int | None = None
    progress_hub: str | None = None  # the launch's progress actor (study/progress.py); None: silent


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
                cache_dir: str | None = None, on_progress=None):
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
                store, ctx.split, ctx.labels, train, model, cache_dir=cache_dir, device=device,
                on_progress=on_progress)
            return model, head, loaders, {"feature_cache": "used", **stats}
        except OSError as err:  # an unwritable or full cache disk costs speed, not the trial
            reason = f"cache unavailable ({type(err).__name__}: {err})"
            warnings.warn(f"feature cache not used: {reason}")
    return model, model, make_loaders(store, ctx, train), {"feature_cache": f"off: {reason}"}


def run_trial(config: dict[str, Any], ctx: CellContext) -> None:
    """Ray Tune function trainable: one hyperparameter configuration of one cell.

    Restartable: a trial restored by Tune (a retry after its worker died, or a resumed
    launch) continues from its last checkpoint at that epoch + 1, in the same MLflow run,
    logging only the epochs that run did not hold yet.
    """
    import torch
    from mlflow.tracking import MlflowClient
    from ray import tune

    from data_prep.store import open_store
    from study.engine import FitState, fit
    from study.model import seed_everything

    entered = time.perf_counter()
    train = resolve_train_config(ctx.train, config)
    torch.set_num_threads(max(1, int(ctx.cpus_per_trial)))
    seed_everything(train.seed)
    device = _device(ctx)
    saved = load_checkpoint(tune.get_checkpoint())
    client = MlflowClient(ctx.tracking_uri)
    run_id, logged = _trial_run(client, ctx, train, saved)
    status, stopped = "FAILED", [False]
    try:
        store = open_store(ctx.store)
        if ctx.protocol == "nested_cv":
            run_cv_trial(store, ctx, train, client=client, run_id=run_id, device=device)
            status = "FINISHED"
            return
        model, fit_model, loaders, how = build_trial(store, ctx, train, device=device,
                                                     on_progress=_cache_progress(ctx, store))
        why_torch = head_trainer_reason(train, how, fit_model, saved=saved, device=device)
        tracking.set_tags(client, run_id, {"feature_cache": how["feature_cache"][:250],
                                           "trainer": "compiled head (study/head_trainer.py)" if why_torch is None
                                           else f"torch (engine.fit): {why_torch}"[:250]})
        if "computed" in how:  # slices this trial pushed through the prefix vs found in its node's cache
            tracking.log_metrics(client, run_id, {"feature_cache_computed": how["computed"],
                                                  "feature_cache_cached": how["cached"]})
        state = None
        if saved is not None:
            _check_prefix(saved, model, how)
            fit_model.load_state_dict(saved["module_state"])
            state = FitState.from_dict(saved["fit"])
        last_checkpoint = [time.monotonic()]
        reported = [0]
        setup_s = time.perf_counter() - entered

        def to_tune(report: dict, payload: dict | None = None) -> None:
            try:  # Tune stops a trial (scheduler, interrupted launch) by failing its next report
                if payload is None:
                    tune.report(report)
                else:
                    _report_with_checkpoint(report, payload)
            except BaseException:
                stopped[0] = True
                with contextlib.suppress(Exception):  # what was trained and reported stays logged
                    flush()
                raise

        pending: dict[int, dict[str, float]] = {}  # epochs not yet sent to MLflow
        last_flush = [time.monotonic()]

        def flush() -> None:  # one request for several epochs: a compiled trial's 50 take ~1 s
            if pending:
                tracking.log_metric_steps(client, run_id, pending)
                pending.clear()
            last_flush[0] = time.monotonic()

        def on_epoch(epoch: int, metrics: dict[str, float], st: FitState) -> None:
            report = epoch_report(metrics, st)
            if epoch not in logged:
                pending[epoch] = {k: v for k, v in report.items() if k != "epoch"}
            last = epoch == train.epochs
            due = last or (why_torch is not None and time.monotonic() - last_checkpoint[0] >= ctx.checkpoint_interval_s)
            if due or time.monotonic() - last_flush[0] >= LOG_EVERY_S:
                flush()  # before the checkpoint: a restart from it finds every epoch up to it logged
            reported[0] += 1
            if why_torch is None and not ctx.report_each_epoch and not last:
                return
            if due:
                to_tune(report, _checkpoint(train, run_id, fit_model, model, how, st))
                last_checkpoint[0] = time.monotonic()
            else:
                to_tune(report)

        if why_torch is None:
            result = fit_head_like_engine(fit_model, loaders, train, select_key=epoch_key(ctx.select_on),
                                          on_epoch=on_epoch)
        else:
            result = fit(fit_model, loaders["train"], loaders["val"], train, device=device,
                         on_epoch=on_epoch, state=state, select_key=epoch_key(ctx.select_on))
        flush()
        if not reported[0]:  # restored after its last epoch: nothing left to train, say so once
            to_tune(epoch_report(result["history"][-1], result["state"]))
        ran = result["history"][len(result["history"]) - reported[0]:]  # this attempt's epochs
        tracking.log_metrics(client, run_id, {  # where the trial's time went (benchmarks/launch_overhead.py)
            "time_setup_s": setup_s, "time_compute_s": sum(h.get("time_s", 0.0) for h in ran),
            "time_trial_s": time.perf_counter() - entered})
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, "KILLED" if stopped[0] else status)


def epoch_report(metrics: dict[str, float], st) -> dict[str, float]:
    """What a trial reports to Tune (and logs to MLflow) after an epoch."""
    best = st.history[st.best_epoch - 1]
    return {"val_acc": float(metrics["val_subject_acc"]), "val_loss": float(metrics["val_loss"]),
            "val_balanced_acc": float(metrics.get("val_subject_balanced_acc", math.nan)),
            "val_auroc": float(metrics.get("val_subject_auroc", math.nan)),
            "train_loss": float(metrics["train_loss"]),
            "val_slice_acc": float(metrics.get("val_slice_acc", math.nan)),
            "best_val_acc": float(best["val_subject_acc"]), "best_val_loss": float(best["val_loss"]),
            "best_val_score": reportable(float(st.best_key[0])), "epoch": int(metrics["epoch"])}


def _trial_run(client, ctx: CellContext, train: TrainConfig, saved: dict | None) -> tuple[str, set[int]]:
    """The trial's MLflow run: the checkpoint's, else one tagged with this Tune trial id
    (a restart before any checkpoint), else a new one. Returns (run id, steps already logged)."""
    import os

    from ray import tune

    tctx = tune.get_context()
    trial_id, trial_name = tctx.get_trial_id(), tctx.get_trial_name()
    run_id = (saved or {}).get("mlflow_run_id")
    if run_id is None:
        found = tracking.children(client, ctx.experiment_id, ctx.cell_run_id, f"tags.tune_trial_id = '{trial_id}'")
        run_id = found[0].info.run_id if found else None
    tags = {"worker_pid": str(os.getpid()), "node_id": _node_id()}
    if run_id is None:
        fold = {} if ctx.outer_fold is None else {"outer_fold": str(ctx.outer_fold)}
        name = ctx.cell.name + ("" if ctx.outer_fold is None else f"/outer{ctx.outer_fold}")
        run_id = tracking.create_run(client, ctx.experiment_id, name=f"{name}/{trial_name}",
                                     run_type="trial", parent_run_id=ctx.cell_run_id,
                                     tags={"cell": ctx.cell.name, "trial": trial_name,
                                           "tune_trial_id": trial_id, "attempt": "1", **fold, **tags})
        tracking.log_params(client, run_id, {**dataclasses.asdict(train),
                                             **{f"axis.{k}": v for k, v in ctx.cell.axes.items()},
                                             "store_hash": ctx.store_hash})
        return run_id, set()
    run = client.get_run(run_id)
    tracking.reopen(client, run_id)
    attempt = int(run.data.tags.get("attempt", "1")) + 1
    tracking.set_tags(client, run_id, {**tags, "resumed_from_epoch": str((saved or {}).get("epoch", 0)),
                                       "attempt": str(attempt)})
    return run_id, {m.step for m in client.get_metric_history(run_id, "val_acc")}


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:
        return "unknown"


def _cache_progress(ctx: CellContext, store):
    """Posts the feature-cache pass's progress to the launch's display."""
    from study import progress

    node = _node_id()
    started = time.monotonic()

    def report(done: int, total: int, *, entry: str, block: str) -> None:
        elapsed = time.monotonic() - started
        progress.post(ctx.progress_hub, {"kind": "cache", "cell": ctx.cell.name, "entry": entry, "block": block,
                                         "node": node, "done": done, "total": total,
                                         "rate": done / elapsed if elapsed > 0 and done else None})

    return report


# ---------------------------------------------------------------- checkpoints
def _checkpoint(train: TrainConfig, run_id: str, fit_model, model, how: dict, st) -> dict:
    """What a trial checkpoint holds: the trained module (only the head when the frozen
    prefix came from the feature cache: the prefix is rebuilt from the seed and checked by
    its digest), fit's state (optimizer, shuffling, best epoch and its weights) and the run."""
    from study import features

    cached = how.get("feature_cache") == "used"
    return {"format": 2, "train": dataclasses.asdict(train), "mlflow_run_id": run_id, "epoch": st.epoch,
            "module": "head" if cached else "model", "module_state": fit_model.state_dict(),
            "prefix_digest": features.weights_digest(model) if cached else None, "fit": st.to_dict()}


def _report_with_checkpoint(report: dict, payload: dict) -> None:
    import torch
    from ray import tune

    with tempfile.TemporaryDirectory() as tmp:
        torch.save(payload, Path(tmp) / CHECKPOINT_FILE)
        tune.report(report, checkpoint=tune.Checkpoint.from_directory(tmp))


def load_checkpoint(checkpoint) -> dict | None:
    """A trial checkpoint's payload (tensors and plain values only: loaded weights_only)."""
    import torch

    if checkpoint is None:
        return None
    with checkpoint.as_directory() as ckpt_dir:
        return torch.load(Path(ckpt_dir) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def _check_prefix(saved: dict, model, how: dict) -> None:
    from study import features

    if saved.get("module") == "head":
        if how.get("feature_cache") != "used":
            raise RuntimeError(f"the checkpoint trained a head on cached features, but now: {how['feature_cache']}")
        if saved.get("prefix_digest") != features.weights_digest(model):
            raise RuntimeError("the rebuilt frozen prefix differs from the checkpoint's (weights or seed changed)")


def model_from_checkpoint(saved: dict, train: TrainConfig, *, state: str = "best"):
    """The full ThighResNet at the checkpoint's best epoch (state="best") or last epoch."""
    from study import features
    from study.model import build_model, seed_everything

    weights = saved["fit"]["best_state"] if state == "best" else saved["module_state"]
    seed_everything(train.seed)  # the frozen prefix of a head checkpoint comes from the seed
    model = build_model(weights=train.weights if saved.get("module") == "head" else "none", freeze=train.freeze)
    if saved.get("module") == "head":
        if saved.get("prefix_digest") != features.weights_digest(model):
            raise RuntimeError("the rebuilt frozen prefix differs from the trial's (weights file or seed changed)")
        features.FeatureHead(model).load_state_dict(weights)
    else:
        model.load_state_dict(weights)
    return model


def run_cv_trial(store, ctx: CellContext, train: TrainConfig, *, client, run_id: str, device: str) -> None:
    """Nested CV, inner loop: k fits (one per held-out fold) → the epoch with the best mean
    fold selection value (`select_on`) → one refit on all non-test subjects for that many
    epochs, checkpointed.

    The reported `best_val_score` is the mean inner-fold selection value at the chosen epoch
    (`best_val_acc` the mean subject accuracy there); the test subjects are never touched here.
    """
    from ray import tune

    from study.engine import fit
    from study.model import seed_everything

    folds = sorted((k for k in ctx.split if k.startswith("fold")), key=lambda k: int(k[4:]))
    acc_curves, loss_curves, score_curves = [], [], []
    for i, fold in enumerate(folds):
        rest = [f for f in folds if f != fold]
        fold_ctx = dataclasses.replace(
            ctx, split={"train": np.concatenate([ctx.split[f] for f in rest]), "val": ctx.split[fold]},
            labels={"train": np.concatenate([ctx.labels[f] for f in rest]), "val": ctx.labels[fold]})
        seed_everything(train.seed)
        _, fit_model, loaders, _ = build_trial(store, fold_ctx, train, device=device)
        history = fit(fit_model, loaders["train"], loaders["val"], train, device=device)["history"]
        acc_curves.append([h["val_subject_acc"] for h in history])
        loss_curves.append([h["val_loss"] for h in history])
        score_curves.append([selection_value(from_engine(h), ctx.select_on) for h in history])
        tracking.log_metrics(client, run_id, {"fold_best_val_acc": max(acc_curves[-1]),
                                              "fold_best_val_score": reportable(max(score_curves[-1]))}, step=i)
        tune.report({"best_val_acc": float(np.mean([max(c) for c in acc_curves])),
                     "best_val_score": reportable(float(np.mean([max(c) for c in score_curves]))), "fold": i,
                     "best_val_loss": float(np.mean([min(c) for c in loss_curves]))})
    mean_acc, mean_loss = np.mean(acc_curves, axis=0), np.mean(loss_curves, axis=0)
    mean_score = np.mean(score_curves, axis=0)
    best_epoch = 1 + max(range(len(mean_score)), key=lambda e: (mean_score[e], -mean_loss[e]))
    tracking.log_metric_steps(client, run_id, {epoch: {"cv_val_acc": float(a), "cv_val_loss": float(loss)}
                                               for epoch, (a, loss) in enumerate(zip(mean_acc, mean_loss), start=1)})
    # refit on every non-test subject; "val" is unused (fit gets none) but keeps the loaders' shape
    seed_everything(train.seed)
    refit_ctx = dataclasses.replace(ctx, split={"train": ctx.split["train"], "val": ctx.split[folds[0]]},
                                    labels={"train": ctx.labels["train"], "val": ctx.labels[folds[0]]})
    model, fit_model, loaders, how = build_trial(store, refit_ctx, train, device=device)
    refit = fit(fit_model, loaders["train"], None, dataclasses.replace(train, epochs=best_epoch), device=device)
    report = {"best_val_acc": float(mean_acc[best_epoch - 1]),
              "best_val_score": reportable(float(mean_score[best_epoch - 1])),
              "best_val_loss": float(mean_loss[best_epoch - 1]),
              "cv_best_epoch": best_epoch, "fold": len(folds)}
    tracking.log_metrics(client, run_id, {"best_val_acc": report["best_val_acc"], "cv_best_epoch": best_epoch})
    _report_with_checkpoint(report, _checkpoint(train, run_id, fit_model, model, how, refit["state"]))
