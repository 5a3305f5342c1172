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
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from study import tracking
from study.config import Cell, TrainConfig
from study.head_fit import fit_head_like_engine, head_trainer_reason
from study.selection import epoch_key, from_engine, reportable, selection_value
from study.trial_checkpoint import (CHECKPOINT_FILE, _check_prefix, _checkpoint, _report_with_checkpoint,
                                    load_checkpoint, model_from_checkpoint)
from study.trial_log import LOG_EVERY_S, EpochLog, cache_progress, log_batch, params_of, trial_run
from study.trial_log import node_id as _node_id  # noqa: F401 (study/search.py's name for it)

__all__ = ["CHECKPOINT_FILE", "LOG_EVERY_S", "CellContext", "build_trial", "eval_inputs", "load_checkpoint",
           "model_from_checkpoint", "run_trial"]


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

    model = _initial_model(train).to(device)
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


def eval_inputs(store, ctx: CellContext, train: TrainConfig, model, *, cached: bool, partition: str = "test"):
    """The module and loader that evaluate a trial's model on `partition` (the cell's test).

    cached: the trial trained the head on cached features (its checkpoint's module "head").
    Then the head runs on the node's cached frozen-prefix outputs of the partition's slices,
    the numbers its validation ran on, instead of the whole network on the images: the same
    predictions (tests/study/test_features.py) for ~0.1 s instead of a forward pass of every
    test slice (the largest part of an fc-only cell's closing work, benchmarks/README.md).

    Returns:
        (module to evaluate, DataLoader of the partition, how: "cached features" or why not).
    """
    from study import features

    reason = "the trial trained the whole network" if not cached else features.ineligible_reason(train, store)
    if reason is None:
        try:
            loaders, head, _ = features.feature_loaders(store, ctx.split, ctx.labels, train, model,
                                                        partitions=(partition,))
            return head, loaders[partition], "cached features"
        except OSError as err:  # as in build_trial: an unusable cache costs time, not the result
            reason = f"cache unavailable ({type(err).__name__}: {err})"
    return model, make_loaders(store, ctx, train, partitions=(partition,))[partition], f"images: {reason}"


_INITIAL: dict[tuple, tuple] = {}  # (weights, freeze, torch RNG state digest) -> (model, RNG state after)


def _initial_model(train: TrainConfig):
    """build_model(train.weights, train.freeze) from torch's RNG as it is now, without building it
    again when this process built it from the same RNG state before (a worker's next trial of
    the same seed): a copy of that model, and torch's RNG left as the build left it.

    Building and initialising a ResNet18 costs 0.13-0.17 s; the copy ~0.02 s. build_model draws
    only from torch's RNG, so its state before the call decides the weights.
    """
    import copy
    import hashlib

    import torch

    from study.model import build_model

    rng = torch.get_rng_state()
    key = (train.weights, train.freeze, hashlib.blake2b(rng.numpy().tobytes(), digest_size=16).hexdigest())
    if key in _INITIAL:
        model, after = _INITIAL[key]
        torch.set_rng_state(after)
        return copy.deepcopy(model)
    model = build_model(weights=train.weights, freeze=train.freeze)
    _INITIAL.clear()  # one kept: a worker's trials share a seed far more often than not
    _INITIAL[key] = (copy.deepcopy(model), torch.get_rng_state())
    return model


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
    run_id, logged, new_run = trial_run(client, ctx, train, saved)
    params = params_of(ctx, train) if new_run else None
    status, stopped = "FAILED", [False]
    try:
        store = open_store(ctx.store)
        if ctx.protocol == "nested_cv":
            log_batch(client, run_id, params=params)
            params = None
            run_cv_trial(store, ctx, train, client=client, run_id=run_id, device=device)
            status = "FINISHED"
            return
        built = time.perf_counter()
        model, fit_model, loaders, how = build_trial(store, ctx, train, device=device,
                                                     on_progress=cache_progress(ctx, store))
        built = time.perf_counter() - built
        why_torch = head_trainer_reason(train, how, fit_model, saved=saved, device=device)
        # slices this trial pushed through the prefix vs found in its node's cache (per-node reuse)
        reuse = {"feature_cache_computed": how["computed"], "feature_cache_cached": how["cached"]} \
            if "computed" in how else None
        log_batch(client, run_id, params=params, metrics=reuse, tags={
            "feature_cache": how["feature_cache"][:250],
            "trainer": "compiled head (study/head_trainer.py)" if why_torch is None
            else f"torch (engine.fit): {why_torch}"[:250]})
        params = None  # sent
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

        epochs = EpochLog(client, run_id, logged)  # epochs not yet sent to MLflow
        flush = epochs.flush

        def on_epoch(epoch: int, metrics: dict[str, float], st: FitState) -> None:
            report = epoch_report(metrics, st)
            epochs.add(epoch, report)
            last = epoch == train.epochs
            due = last or (why_torch is not None and time.monotonic() - last_checkpoint[0] >= ctx.checkpoint_interval_s)
            if (due and not last) or epochs.due():
                flush()  # before the checkpoint: a restart from it finds every epoch up to it logged
            reported[0] += 1
            if why_torch is None and not ctx.report_each_epoch and not last:
                return
            if due:
                if last:  # the last epochs and the trial's timings in one request, before its checkpoint
                    flush(timings(compute_s=sum(h.get("time_s", 0.0) for h in st.history[len(st.history) - reported[0]:])))
                to_tune(report, _checkpoint(train, run_id, fit_model, model, how, st))
                last_checkpoint[0] = time.monotonic()
            else:
                to_tune(report)

        def timings(compute_s: float) -> dict[str, float]:  # where the trial's time went (benchmarks/launch_overhead.py)
            return {"time_setup_s": setup_s, "time_build_s": built, "time_compute_s": compute_s,
                    "time_worker_age_s": entered - _process_started(),
                    "time_trial_s": time.perf_counter() - entered}

        if why_torch is None:
            result = fit_head_like_engine(fit_model, loaders, train, select_key=epoch_key(ctx.select_on),
                                          on_epoch=on_epoch)
        else:
            result = fit(fit_model, loaders["train"], loaders["val"], train, device=device,
                         on_epoch=on_epoch, state=state, select_key=epoch_key(ctx.select_on))
        if not reported[0]:  # restored after its last epoch: nothing left to train, say so once
            to_tune(epoch_report(result["history"][-1], result["state"]))
        if result["state"].epoch != train.epochs or not reported[0]:  # else sent with the last epoch
            ran = result["history"][len(result["history"]) - reported[0]:]  # this attempt's epochs
            flush(timings(compute_s=sum(h.get("time_s", 0.0) for h in ran)))
        status = "FINISHED"
    finally:
        if params is not None:  # it failed before its first batch: the run still says what it tried
            with contextlib.suppress(Exception):
                log_batch(client, run_id, params=params)
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


def _process_started() -> float:
    """When this worker process started, on time.perf_counter's clock (its first trial's
    time_worker_age_s is then the worker's start-up: process, imports)."""
    import os

    try:
        ticks = int(open(f"/proc/{os.getpid()}/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return time.perf_counter() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return math.nan


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
