"""One Tune trial that trains several Optuna configurations of a cell (study/config_batches.py).

Ray Tune calls `run_batch_trial(config, ctx)` for a batched trial: config["configs"] holds the K
configurations Optuna proposed, config["optuna_trials"] their Optuna trial numbers. The trial
builds the model and reads the cell's cached features once, trains the K fc heads in one pass
(`head_trainer.fit_heads`: each exactly as a trial of its own would train it; tested against
unbatched launches in tests/study/test_batch_trial.py), logs each configuration as an MLflow
trial run of its own, and reports once to Tune: every configuration's selection score
(`config_score_<i>`, which the searcher tells Optuna) and the metrics and checkpoint of its best
configuration (`config_index`), which the cell's selection compares across trials.

Where the compiled head does not apply at run time (no usable feature cache, a GPU), the K
configurations train one after another on engine.fit, each from the same seed, as K trials.
A batch checkpoints once, when it is done (it takes about a second per configuration); a batch
restarted before then trains again in the same MLflow runs (attempt + 1).
"""

from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from study import tracking
from study.config_batches import BATCH_KEY, NUMBERS_KEY
from study.head_fit import engine_metrics, head_trainer_reason, replay
from study.selection import epoch_key
from study.trainable import CellContext, _device, _process_started, build_trial, epoch_report, resolve_train_config
from study.trial_checkpoint import _checkpoint, _report_with_checkpoint, load_checkpoint
from study.trial_log import cache_progress, log_batch, node_id, params_of


def run_batch_trial(config: dict[str, Any], ctx: CellContext) -> None:
    """Ray Tune function trainable for a batch of configurations of one cell."""
    import torch
    from mlflow.tracking import MlflowClient
    from ray import tune

    from data_prep.store import open_store
    from study.model import seed_everything

    entered = time.perf_counter()
    trains = [resolve_train_config(ctx.train, c) for c in config[BATCH_KEY]]
    numbers = list(config.get(NUMBERS_KEY) or [None] * len(trains))
    torch.set_num_threads(max(1, int(ctx.cpus_per_trial)))
    saved = load_checkpoint(tune.get_checkpoint())
    if saved is not None and "batch_report" in saved:  # restored after it was done: report it again
        _report_with_checkpoint(saved["batch_report"], saved)
        return
    client = MlflowClient(ctx.tracking_uri)
    runs = config_runs(client, ctx, numbers)
    status = "FAILED"
    try:
        store = open_store(ctx.store)
        device = _device(ctx)
        seed_everything(trains[0].seed)
        built = time.perf_counter()
        model, fit_model, loaders, how = build_trial(store, ctx, trains[0], device=device,
                                                     on_progress=cache_progress(ctx, store))
        built = time.perf_counter() - built
        why_torch = head_trainer_reason(trains[0], how, fit_model, saved=None, device=device)
        setup_s = time.perf_counter() - entered
        start = time.perf_counter()
        if why_torch is None:
            outcomes = fit_compiled(fit_model, loaders, trains, ctx)
        else:
            outcomes = fit_each(store, ctx, trains, device)
        compute_s = time.perf_counter() - start
        trainer = ("compiled head, batched (study/head_trainer.py fit_heads)" if why_torch is None
                   else f"torch (engine.fit), batch one by one: {why_torch}")
        timings = {"time_setup_s": setup_s / len(trains), "time_build_s": built / len(trains),
                   "time_compute_s": compute_s / len(trains), "time_batch_compute_s": compute_s,
                   "time_worker_age_s": entered - _process_started(), "configs_in_trial": len(trains),
                   "time_trial_s": (time.perf_counter() - entered) / len(trains)}
        log_configs(client, ctx, trains, runs, outcomes, timings=timings, tags={
            "feature_cache": how["feature_cache"][:250], "trainer": trainer[:250]})
        best = max(range(len(outcomes)), key=lambda i: (outcomes[i]["report"]["best_val_score"],
                                                        -outcomes[i]["report"]["best_val_loss"], -i))
        report = {**outcomes[best]["report"], "configs_in_trial": len(trains), "config_index": best,
                  **{f"config_score_{i}": o["report"]["best_val_score"] for i, o in enumerate(outcomes)}}
        with torch.no_grad():  # the checkpoint's module_state: the best configuration's last weights
            fit_model.load_state_dict(outcomes[best]["module_state"])
        payload = _checkpoint(trains[best], runs[best][0], fit_model, model, how, outcomes[best]["state"])
        payload["batch_report"] = report
        try:
            _report_with_checkpoint(report, payload)
        except BaseException:  # Tune stopped the trial (an interrupted launch): its runs say so
            status = "KILLED"
            raise
        status = "FINISHED"
    finally:
        for run_id, _ in runs:
            with contextlib.suppress(Exception):
                client.set_terminated(run_id, status)


def fit_compiled(fit_model, loaders: dict, trains: list, ctx: CellContext) -> list[dict[str, Any]]:
    """The K fc heads in one pass of head_trainer.fit_heads; per configuration its epochs' reports,
    last FitState (best weights in best_state) and last weights, as fit_head_like_engine gives them."""
    import torch

    from study import head_trainer as ht

    key = epoch_key(ctx.select_on)
    fc = fit_model.fc
    configs = [ht.HeadConfig(optimizer=t.optimizer, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                             batch_size=t.batch_size, epochs=t.epochs, seed=t.seed) for t in trains]
    start = time.perf_counter()
    results = ht.fit_heads(ht.partition_from_loader(loaders["train"]), ht.partition_from_loader(loaders["val"]),
                           configs, weight=fc.weight.detach(), bias=fc.bias.detach(),
                           select=lambda m: key(engine_metrics(m, 0.0)), threads=max(1, int(ctx.cpus_per_trial)))
    per_epoch = (time.perf_counter() - start) / max(1, sum(len(r.history) for r in results))
    outcomes = []
    for res in results:
        steps, state = {}, None
        for epoch, metrics, state in replay(res, key, per_epoch):
            steps[epoch] = epoch_report(metrics, state)
        outcomes.append({"steps": steps, "report": steps[state.epoch], "state": state, "module_state": {
            "fc.weight": torch.from_numpy(np.ascontiguousarray(res.final_weight, dtype=np.float32)),
            "fc.bias": torch.from_numpy(np.ascontiguousarray(res.final_bias, dtype=np.float32))}})
    return outcomes


def fit_each(store, ctx: CellContext, trains: list, device: str) -> list[dict[str, Any]]:
    """The K configurations one after another on engine.fit, each from its seed as a trial would."""
    from study.engine import fit
    from study.model import seed_everything

    outcomes = []
    for train in trains:
        seed_everything(train.seed)
        _, fit_model, loaders, _ = build_trial(store, ctx, train, device=device)
        steps = {}

        def on_epoch(epoch, metrics, st, steps=steps):
            steps[epoch] = epoch_report(metrics, st)

        result = fit(fit_model, loaders["train"], loaders["val"], train, device=device, on_epoch=on_epoch,
                     select_key=epoch_key(ctx.select_on))
        state = result["state"]
        outcomes.append({"steps": steps, "report": steps[state.epoch], "state": state,
                         "module_state": {k: v.detach().clone() for k, v in fit_model.state_dict().items()}})
    return outcomes


def config_runs(client, ctx: CellContext, numbers: list) -> list[tuple[str, bool]]:
    """(run id, new) per configuration: the runs an earlier attempt of this Tune trial created
    (found by its trial id and config_index), else new trial runs under the cell's run."""
    from ray import tune

    tctx = tune.get_context()
    trial_id, trial_name = tctx.get_trial_id(), tctx.get_trial_name()
    found = {r.data.tags.get("config_index"): r for r in
             tracking.children(client, ctx.experiment_id, ctx.cell_run_id, f"tags.tune_trial_id = '{trial_id}'")}
    fold = {} if ctx.outer_fold is None else {"outer_fold": str(ctx.outer_fold)}
    where = {"worker_pid": str(os.getpid()), "node_id": node_id()}
    out = []
    for i, number in enumerate(numbers):
        run = found.get(str(i))
        if run is None:
            run_id = tracking.create_run(
                client, ctx.experiment_id, name=f"{ctx.cell.name}/{trial_name}/config{i}", run_type="trial",
                parent_run_id=ctx.cell_run_id,
                tags={"cell": ctx.cell.name, "trial": trial_name, "tune_trial_id": trial_id, "config_index": str(i),
                      "configs_in_trial": str(len(numbers)), "optuna_trial": str(number), "attempt": "1",
                      **fold, **where})
            out.append((run_id, True))
            continue
        tracking.reopen(client, run.info.run_id)
        tracking.set_tags(client, run.info.run_id,
                          {**where, "attempt": str(int(run.data.tags.get("attempt", "1")) + 1)})
        out.append((run.info.run_id, "store_hash" not in run.data.params))
    return out


def log_configs(client, ctx: CellContext, trains: list, runs: list, outcomes: list, *,
                timings: dict[str, float], tags: dict[str, str]) -> None:
    """Each configuration's params, tags, epochs and timings: one request per run, sent from a
    few threads at once (each a round trip to the tracking server)."""

    def send(i: int) -> None:
        run_id, new = runs[i]
        log_batch(client, run_id, params=params_of(ctx, trains[i]) if new else None, tags=tags,
                  steps={e: {k: v for k, v in r.items() if k != "epoch"} for e, r in outcomes[i]["steps"].items()},
                  metrics=timings)

    with ThreadPoolExecutor(min(4, len(trains))) as pool:
        list(pool.map(send, range(len(trains))))
