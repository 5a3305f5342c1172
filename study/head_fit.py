"""A trial's fc head trained by the compiled head trainer, seen by the trial as engine.fit.

    from study.head_fit import head_trainer_reason, fit_head_like_engine

    if head_trainer_reason(train, how, fit_model, saved=None, device="cpu") is None:
        result = fit_head_like_engine(fit_model, loaders, train, select_key=key, on_epoch=on_epoch)

`study.head_trainer.fit_head` trains a freeze="fc" head on cached features 40-100x faster than
the torch loop (benchmarks/README.md "Head trainer") and matches it to rounding
(tests/study/test_head_trainer.py). This adapter gives run_trial what engine.fit gives it:
`on_epoch(epoch, metrics, state)` per epoch with engine's metric names and a FitState, the
trained module left at its final weights, and {"history", "best_epoch", "state"} back.

The whole trial trains first (it takes milliseconds to a second), then its epochs are
replayed to on_epoch in order: Tune and ASHA see every epoch as before, and a scheduler that
stops the trial at epoch k stops the replay there (the epochs after k were computed but are
never reported or logged). The state handed over at the last epoch holds the best epoch's
weights (for the trial checkpoint); earlier states hold none, so only the last epoch can be
checkpointed: a trial interrupted before then restarts from its start, which costs about a
second. A trial restored from a checkpoint continues on engine.fit (it holds the optimizer
state exactly).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from study.engine import FitState

# head_trainer's history names -> engine.fit's
_ENGINE_NAMES = {"val_balanced_acc": "val_subject_balanced_acc", "val_auroc": "val_subject_auroc"}


def head_trainer_reason(train, how: dict[str, Any], fit_model, *, saved: dict | None, device: str) -> str | None:
    """None when the compiled head trainer applies to this trial, else why not (logged as a tag)."""
    if not train.compiled_head:
        return "off (train.compiled_head: false)"
    if how.get("feature_cache") != "used":
        return "no cached features"
    if train.freeze != "fc" or set(dict(fit_model.named_children())) != {"fc"}:
        return f"freeze {train.freeze}: only an fc head is compiled"
    if saved is not None:
        return "restored from a checkpoint: continues on engine.fit"
    if device != "cpu":
        return f"device {device}: the compiled loop runs on CPU"
    return None


def engine_metrics(m: dict[str, float], time_s: float) -> dict[str, float]:
    """One epoch of head_trainer's history under engine.fit's metric names."""
    out = {_ENGINE_NAMES.get(k, k): float(v) for k, v in m.items()}
    out["epoch"] = int(m["epoch"])
    out["time_s"] = time_s
    return out


def fit_head_like_engine(fit_model, loaders: dict, train, *, select_key: Callable[[dict[str, float]], tuple],
                         on_epoch: Callable[[int, dict[str, float], FitState], Any] | None = None) -> dict[str, Any]:
    """Train fit_model's fc on the loaders' cached features; report like engine.fit.

    Args:
        fit_model: a features.FeatureHead whose only child is "fc".
        loaders: {"train", "val"} from features.feature_loaders.
        train: the trial's TrainConfig.
        select_key: engine.fit's select_key (ranks an epoch from engine-named metrics).
        on_epoch: as engine.fit's; an exception from it stops the replay and propagates.

    Returns:
        {"history", "best_epoch", "state"} as engine.fit (state: the last epoch replayed).
    """
    from study import head_trainer as ht

    fc = fit_model.fc
    start = time.perf_counter()
    res = ht.fit_head(*ht.partition_from_loader(loaders["train"]), *ht.partition_from_loader(loaders["val"]),
                      weight=fc.weight.detach(), bias=fc.bias.detach(), epochs=train.epochs,
                      batch_size=train.batch_size, optimizer=train.optimizer, lr=train.lr,
                      momentum=train.momentum, weight_decay=train.weight_decay, seed=train.seed,
                      select=lambda m: select_key(engine_metrics(m, 0.0)))
    per_epoch = (time.perf_counter() - start) / max(1, len(res.history))
    with torch.no_grad():  # the final weights while the epochs are replayed (a checkpoint's module_state)
        fc.weight.copy_(torch.from_numpy(res.final_weight))
        fc.bias.copy_(torch.from_numpy(res.final_bias))
    state = FitState()
    for epoch, metrics, state in replay(res, select_key, per_epoch):
        if on_epoch is not None and on_epoch(epoch, dict(metrics), state) is True:
            break
    best = state.history[state.best_epoch - 1]
    if state.epoch == len(res.history):  # as engine.fit: the module ends at the best epoch's weights
        fc.load_state_dict(res.state_dict())
    return {"history": state.history, "best_epoch": state.best_epoch, "best_val_subject_acc": best["val_subject_acc"],
            "best_val_loss": best["val_loss"], "state": state}


def replay(res, select_key: Callable[[dict[str, float]], tuple], per_epoch_s: float = 0.0):
    """A head_trainer result's epochs as engine.fit would have lived them: yields (epoch,
    engine-named metrics, FitState so far) in order; the last state holds the best epoch's
    weights (state.best_state, what a trial checkpoint stores). Raises when engine.fit's
    best-epoch rule (ties keep the earlier epoch) disagrees with the trainer's choice."""
    history = [engine_metrics(m, per_epoch_s) for m in res.history]
    state, best_key = FitState(), None
    for epoch, metrics in enumerate(history, start=1):
        key = tuple(select_key(metrics))
        if best_key is None or key > best_key:  # ties keep the earlier epoch, as engine.fit
            best_key, state.best_epoch = key, epoch
        state.epoch, state.history, state.best_key = epoch, history[:epoch], best_key
        if epoch == len(history):
            if state.best_epoch != res.best_epoch:
                raise RuntimeError(f"head trainer chose epoch {res.best_epoch}, the replay {state.best_epoch}")
            state.best_state = {f"fc.{k}": v for k, v in res.state_dict().items()}
        yield epoch, metrics, state
