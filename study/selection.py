"""Which epoch, trial and ASHA survivor is best on validation subjects (`select_on` in the grid).

    from study.selection import validation_metrics, selection_score, tune_metric, epoch_key

    fit(..., select_key=epoch_key(grid.select_on))  # study.engine: which epoch is the trial's best

    m = validation_metrics(val["subject_labels"], val["subject_probs"], loss=val["loss"])
    key = selection_score(m, grid.select_on)       # tuple; larger is better, compare with >
    metric, mode = tune_metric(grid.select_on)     # for Tuner / ASHAScheduler / OptunaSearch

Raw accuracy at 0.5 rewards a constant predictor in an imbalanced stratum (it scores the
majority share); balanced accuracy and AUROC give any constant predictor 0.5, and the loss
penalises one that is confident, so the default (`balanced_acc`) cannot be won by predicting
one class. Ties are broken by the lower validation loss. A metric that is undefined on the
validation subjects (AUROC with one class) ranks below every defined one.
"""

from __future__ import annotations

import math

import numpy as np

from study.config import SELECT_ON
from study.engine import SUBJECT_THRESHOLD
from study.metrics import accuracy, auroc, balanced_accuracy

# select_on -> (reported metric name, "max" | "min")
TUNE_METRICS = {"balanced_acc": ("val_balanced_acc", "max"), "auroc": ("val_auroc", "max"),
                "loss": ("val_loss", "min"), "acc": ("val_acc", "max")}
assert set(TUNE_METRICS) == set(SELECT_ON)


def validation_metrics(subject_labels: np.ndarray, subject_probs: np.ndarray, *, loss: float) -> dict[str, float]:
    """val_acc, val_balanced_acc, val_auroc (NaN with one class) and val_loss of one evaluation."""
    y = np.asarray(subject_labels, dtype=np.int64)
    probs = np.asarray(subject_probs, dtype=float)
    pred = (probs >= SUBJECT_THRESHOLD).astype(np.int64)
    return {"val_acc": accuracy(y, pred), "val_balanced_acc": balanced_accuracy(y, pred),
            "val_auroc": auroc(y, probs), "val_loss": float(loss)}


def _check(select_on: str) -> None:
    if select_on not in TUNE_METRICS:
        raise ValueError(f"Invalid select_on {select_on!r}. Only {', '.join(TUNE_METRICS)} are supported.")


def tune_metric(select_on: str) -> tuple[str, str]:
    """(metric name, mode) that Ray Tune, ASHA and OptunaSearch optimise for this select_on."""
    _check(select_on)
    return TUNE_METRICS[select_on]


def selection_value(metrics: dict[str, float], select_on: str) -> float:
    """The select_on value as "larger is better" (the loss negated); -inf when undefined."""
    name, mode = tune_metric(select_on)
    value = float(metrics.get(name, math.nan))
    if math.isnan(value):
        return -math.inf
    return value if mode == "max" else -value


def selection_score(metrics: dict[str, float], select_on: str) -> tuple[float, float]:
    """Comparable key of an epoch or trial: (select_on value, -val_loss); larger is better."""
    loss = float(metrics.get("val_loss", math.nan))
    return selection_value(metrics, select_on), (-math.inf if math.isnan(loss) else -loss)


# study.engine's epoch metric names -> the names selection reads
_ENGINE_NAMES = {"val_acc": "val_subject_acc", "val_balanced_acc": "val_subject_balanced_acc",
                 "val_auroc": "val_subject_auroc", "val_loss": "val_loss"}


def from_engine(metrics: dict[str, float]) -> dict[str, float]:
    """An engine epoch's metrics (val_subject_*) under the names used here (val_*)."""
    return {name: float(metrics.get(engine, math.nan)) for name, engine in _ENGINE_NAMES.items()}


def epoch_key(select_on: str):
    """study.engine.fit's select_key for this select_on: ranks an epoch from its metrics."""
    _check(select_on)
    return lambda metrics: selection_score(from_engine(metrics), select_on)


# what Tune and Optuna receive for an undefined value (-inf is not a number Optuna can rank)
WORST_SCORE = -1e9


def reportable(score: float) -> float:
    """A selection value as Tune / Optuna take it: finite, larger is better."""
    return score if math.isfinite(score) else WORST_SCORE
