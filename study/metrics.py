"""Subject-level test metrics with confidence intervals, a baseline and a permutation test.

Usage::

    from study.metrics import summarize

    result = evaluate(model, test_loader)                    # study.engine
    summary = summarize(result["subject_labels"], result["subject_probs"],
                        train_labels=train_subject_labels, seed=0)
    summary["acc"], summary["acc_ci_low"], summary["baseline_acc"], summary["perm_p"]

Everything here works on subjects (one row per person), never slices: bootstrap resamples
subjects, because slices of one person are not independent observations.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
from sklearn.dummy import DummyClassifier
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from study.engine import SUBJECT_THRESHOLD


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of subjects predicted correctly."""
    return float(accuracy_score(y_true, y_pred))


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean of per-class recall (0.5 for any constant predictor on two classes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one-class resamples: sklearn warns, value still defined
        return float(balanced_accuracy_score(y_true, y_pred))


def auroc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Area under the ROC curve; NaN when y_true holds a single class (undefined)."""
    if np.unique(y_true).size < 2:
        return math.nan
    return float(roc_auc_score(y_true, y_score))


def majority_baseline(train_labels: np.ndarray, test_labels: np.ndarray) -> float:
    """Test accuracy of always predicting the training majority class (ties -> class 0)."""
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    dummy = DummyClassifier(strategy="most_frequent").fit(np.zeros((train_labels.size, 1)), train_labels)
    return accuracy(test_labels, dummy.predict(np.zeros((test_labels.size, 1))))


def bootstrap_ci(
    y_true: np.ndarray,
    y_score_or_pred: np.ndarray,
    metric: Callable[[np.ndarray, np.ndarray], float],
    *,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Percentile bootstrap CI of ``metric`` over subjects.

    Resamples subjects with replacement; a resample where the metric is undefined (NaN or a
    ValueError, e.g. AUROC on one class) is skipped.

    Returns:
        (metric on all subjects, lower alpha/2 quantile, upper 1 - alpha/2 quantile);
        all NaN when the metric is undefined on the full set or on every resample.
    """
    y_true, y_other = np.asarray(y_true), np.asarray(y_score_or_pred)
    if y_true.shape != y_other.shape:
        raise ValueError(f"y_true shape {y_true.shape} != scores shape {y_other.shape}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")

    def safe(t: np.ndarray, o: np.ndarray) -> float:
        try:
            return float(metric(t, o))
        except ValueError:
            return math.nan

    point = safe(y_true, y_other) if y_true.size else math.nan
    if math.isnan(point):
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, y_true.size, size=(n_boot, y_true.size))
    values = np.array([safe(y_true[i], y_other[i]) for i in idx])
    values = values[~np.isnan(values)]
    if values.size == 0:
        return point, math.nan, math.nan
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return point, float(low), float(high)


def permutation_p_value(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    baseline_acc: float | None = None,
    *,
    n_perm: int = 2000,
    seed: int = 0,
) -> float:
    """One-sided p-value that the accuracy beats chance.

    Null: predictions carry no information about the labels. Under it every pairing of the
    observed predictions with the observed labels is equally likely, so the null accuracies
    come from shuffling y_true against y_pred (keeping both class balances), and
    p = (1 + #{null acc >= observed acc}) / (1 + n_perm).
    A constant predictor gets p = 1 under this null even though it scores the majority rate.
    If ``baseline_acc`` is given, an accuracy that does not exceed it gets p = 1: a model
    that doesn't beat the majority-class baseline is never reported as significant.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"need equal, non-empty shapes, got {y_true.shape} and {y_pred.shape}")
    observed = np.mean(y_true == y_pred)
    if baseline_acc is not None and observed <= baseline_acc:
        return 1.0
    rng = np.random.default_rng(seed)
    null = np.array([np.mean(rng.permutation(y_true) == y_pred) for _ in range(n_perm)])
    return float((1 + np.sum(null >= observed - 1e-12)) / (1 + n_perm))


def summarize(
    y_true: np.ndarray,
    probs: np.ndarray,
    *,
    train_labels: np.ndarray,
    seed: int = 0,
    n_boot: int = 2000,
) -> dict[str, float]:
    """All test metrics for one model on one set of subjects.

    Args:
        y_true: subject labels (0/1).
        probs: subject probabilities of class 1 (predicted class 1 when >= 0.5).
        train_labels: training subject labels (for the majority-class baseline).
        seed: seed of the bootstrap and permutation draws.
        n_boot: bootstrap resamples (also the number of permutations).

    Returns:
        n, n_pos, acc, acc_ci_low, acc_ci_high, balanced_acc, balanced_acc_ci_low,
        balanced_acc_ci_high, auroc, auroc_ci_low, auroc_ci_high (NaN with one class),
        baseline_acc, baseline_ci_low, baseline_ci_high, perm_p.
    """
    y_true = np.asarray(y_true).astype(np.int64)
    probs = np.asarray(probs, dtype=float)
    y_pred = (probs >= SUBJECT_THRESHOLD).astype(np.int64)
    out: dict[str, float] = {"n": float(y_true.size), "n_pos": float(y_true.sum())}
    for name, metric, other in (
        ("acc", accuracy, y_pred),
        ("balanced_acc", balanced_accuracy, y_pred),
        ("auroc", auroc, probs),
    ):
        point, low, high = bootstrap_ci(y_true, other, metric, n_boot=n_boot, seed=seed)
        out.update({name: point, f"{name}_ci_low": low, f"{name}_ci_high": high})
    baseline = majority_baseline(train_labels, y_true)
    majority = np.full_like(y_true, np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=2).argmax())
    _, low, high = bootstrap_ci(y_true, majority, accuracy, n_boot=n_boot, seed=seed)
    out.update(baseline_acc=baseline, baseline_ci_low=low, baseline_ci_high=high)
    out["perm_p"] = permutation_p_value(y_true, y_pred, baseline, n_perm=n_boot, seed=seed)
    return out
