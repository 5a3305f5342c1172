"""Subject-level test statistics: the model against the majority-class baseline, honest intervals.

Usage::

    from study.metrics import summarize

    result = evaluate(model, test_loader)                    # study.engine
    s = summarize(result["subject_labels"], result["subject_probs"],
                  train_labels=train_subject_labels, seed=0)
    s["acc"], s["acc_ci_low"], s["baseline_acc"], s["vs_baseline_p"], s["vs_baseline_diff"]

Everything here works on subjects (one row per person), never slices.

The headline test of a cell is the model against the majority-class predictor (the training
majority) on the same test subjects: an exact McNemar test, one-sided (model better), of the
discordant subjects (`vs_baseline_p`), with the paired accuracy difference and its CI
(`vs_baseline_diff*`). `assoc_p` is a different question, kept under its own name: is the
prediction associated with the label at all (one-sided Fisher exact test); a model can be
associated with the labels and still not beat the majority class.

Methods (STAT_METHODS, logged as params):
- accuracy and baseline accuracy: Clopper-Pearson exact interval (scipy.stats.binomtest),
  which holds its coverage at small n and at 0 or 100% (9/9 correct: [0.66, 1.00]).
- balanced accuracy: MOVER (Newcombe 1998 / Zou & Donner 2008) from the two classes' Wilson
  intervals; defined whenever both classes are present, never one-class resamples.
- AUROC: Newcombe (2006, Stat Med 25:559, method 5) score interval: {t : |AUROC - t| <=
  z sqrt(V(t))} with the Hanley-McNeil variance V at N = (n_pos + n_neg) / 2. Unlike DeLong's
  or a bootstrap interval it does not collapse to [1, 1] when the two classes are perfectly
  separated (hand-written: no library offers an AUROC interval with that property).
- paired differences (vs baseline, vs other models): study/paired.py.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from study.engine import SUBJECT_THRESHOLD
from study.paired import PAIRED_METHODS, accuracy_difference

STAT_METHODS = {
    "acc_ci": "Clopper-Pearson exact, 95%",
    "baseline": "majority class of the training subjects (ties -> low)",
    "balanced_acc_ci": "MOVER from per-class Wilson intervals, 95%",
    "auroc_ci": "Newcombe 2006 method 5 score interval, 95%",
    "vs_baseline_p": "exact McNemar vs the majority-class predictor, one-sided (model better)",
    "vs_baseline_diff_ci": PAIRED_METHODS["acc_diff_ci"],
    "assoc_p": "Fisher exact, one-sided (prediction associated with label)",
}


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of subjects predicted correctly."""
    from sklearn.metrics import accuracy_score  # on first use (a compiled-head worker: never)
    return float(accuracy_score(y_true, y_pred))


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean of per-class recall (0.5 for any constant predictor on two classes)."""
    from sklearn.metrics import balanced_accuracy_score  # on first use (a compiled-head worker: never)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one class present: sklearn warns, the value is that class's recall
        return float(balanced_accuracy_score(y_true, y_pred))


def auroc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Area under the ROC curve; NaN when y_true holds a single class (undefined)."""
    from sklearn.metrics import roc_auc_score  # on first use (a compiled-head worker: never)
    if np.unique(y_true).size < 2:
        return math.nan
    return float(roc_auc_score(y_true, y_score))


def majority_class(train_labels: np.ndarray) -> int:
    """The class most training subjects have (ties -> 0, low): what the baseline predicts."""
    counts = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=2)
    return int(np.argmax(counts))


def majority_baseline(train_labels: np.ndarray, test_labels: np.ndarray) -> float:
    """Test accuracy of always predicting the training majority class (ties -> class 0)."""
    test_labels = np.asarray(test_labels, dtype=np.int64)
    return float(np.mean(test_labels == majority_class(train_labels))) if test_labels.size else math.nan


def proportion_ci(k: int, n: int, *, alpha: float = 0.05, method: str = "exact") -> tuple[float, float]:
    """Interval of a binomial proportion k/n: "exact" (Clopper-Pearson) or "wilson"; NaN for n = 0."""
    from scipy import stats  # on first use (a compiled-head worker: never)
    if n == 0:
        return math.nan, math.nan
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=1 - alpha, method=method)
    return float(ci.low), float(ci.high)


def balanced_accuracy_ci(y_true: np.ndarray, y_pred: np.ndarray, *, alpha: float = 0.05
                         ) -> tuple[float, float, float]:
    """Balanced accuracy with a MOVER interval from the two recalls' Wilson intervals.

    Returns:
        (balanced accuracy, low, high); all NaN unless both classes are present.
    """
    y, p = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    recalls, lows, highs = [], [], []
    for cls in (0, 1):
        members = y == cls
        if not members.any():
            return math.nan, math.nan, math.nan
        k, n = int(np.sum(p[members] == cls)), int(members.sum())
        low, high = proportion_ci(k, n, alpha=alpha, method="wilson")
        recalls.append(k / n), lows.append(low), highs.append(high)
    point = float(np.mean(recalls))
    # MOVER for (r0 + r1) / 2: each side recovers the variance from the components' own limits
    low = point - 0.5 * math.sqrt(sum((r - l) ** 2 for r, l in zip(recalls, lows)))
    high = point + 0.5 * math.sqrt(sum((h - r) ** 2 for r, h in zip(recalls, highs)))
    return point, max(0.0, low), min(1.0, high)


def _newcombe_variance(theta: np.ndarray, n_pos: int, n_neg: int) -> np.ndarray:
    """Hanley-McNeil variance of the AUROC at theta, with n_pos, n_neg replaced by their mean N."""
    big_n = (n_pos + n_neg) / 2
    return theta * (1 - theta) / (n_pos * n_neg) * (2 * big_n - 1 - 3 * (big_n - 1) / ((2 - theta) * (1 + theta)))


def auroc_ci(y_true: np.ndarray, y_score: np.ndarray, *, alpha: float = 0.05) -> tuple[float, float, float]:
    """AUROC with Newcombe's (2006, method 5) score interval.

    The limits are the two roots of |auc - t| = z sqrt(V(t)), found with brentq after a
    grid scan (at auc = 1 the root t = 1 is not a limit; the scan finds the interior one).

    Returns:
        (AUROC, low, high); all NaN when y_true holds one class.
    """
    from scipy import optimize  # on first use (a compiled-head worker: never)
    from scipy import stats
    y = np.asarray(y_true, dtype=np.int64)
    point = auroc(y, y_score)
    if math.isnan(point):
        return math.nan, math.nan, math.nan
    n_pos, n_neg = int(y.sum()), int((y == 0).sum())
    z = stats.norm.ppf(1 - alpha / 2)

    def gap(t: float | np.ndarray) -> float | np.ndarray:  # <= 0 inside the interval
        return np.abs(point - t) - z * np.sqrt(np.maximum(_newcombe_variance(t, n_pos, n_neg), 0))

    grid = np.linspace(0.0, 1.0, 2001)
    inside = np.flatnonzero(gap(grid) <= 0)
    first, last = inside[0], inside[-1]  # the interval is one run of grid points around auc
    low = 0.0 if first == 0 else optimize.brentq(gap, grid[first - 1], grid[first])
    high = 1.0 if last == grid.size - 1 else optimize.brentq(gap, grid[last], grid[last + 1])
    return point, float(min(low, point)), float(max(high, point))


def association_p(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """One-sided Fisher exact p that predictions and labels are positively associated.

    Not a test against the baseline: a model can be associated with the labels and still be
    no more accurate than predicting the majority class.
    """
    from scipy import stats  # on first use (a compiled-head worker: never)
    y, p = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    table = [[int(np.sum((y == 1) & (p == 1))), int(np.sum((y == 1) & (p == 0)))],
             [int(np.sum((y == 0) & (p == 1))), int(np.sum((y == 0) & (p == 0)))]]
    return float(stats.fisher_exact(table, alternative="greater").pvalue)


def summarize(y_true: np.ndarray, probs: np.ndarray, *, train_labels: np.ndarray | None = None,
              baseline_class: int | np.ndarray | None = None, seed: int = 0, n_boot: int = 2000,
              alpha: float = 0.05) -> dict[str, float]:
    """All test statistics of one model on one set of subjects.

    Args:
        y_true: subject labels (0/1).
        probs: subject probabilities of class 1 (predicted 1 when >= SUBJECT_THRESHOLD).
        train_labels: the model's training labels; the baseline predicts their majority.
        baseline_class: instead of train_labels, the baseline's prediction: one class, or one
            per subject (pooled nested-CV folds, each with its own training majority).
        seed, n_boot: the paired bootstrap's seed and resamples.
        alpha: 1 - confidence level of every interval.

    Returns:
        n, n_pos; acc, acc_ci_low, acc_ci_high; balanced_acc(_ci_low, _ci_high); auroc(_ci_low,
        _ci_high) (NaN with one class); baseline_class (NaN if it varies by subject),
        baseline_acc, baseline_ci_low, baseline_ci_high; vs_baseline_diff (acc - baseline_acc),
        vs_baseline_diff_ci_low, vs_baseline_diff_ci_high, vs_baseline_n_better (model right,
        baseline wrong), vs_baseline_n_worse, vs_baseline_p; assoc_p. See STAT_METHODS.
    """
    y = np.asarray(y_true).astype(np.int64)
    probs = np.asarray(probs, dtype=float)
    if y.shape != probs.shape or y.ndim != 1 or y.size == 0:
        raise ValueError(f"need equal non-empty 1-D labels and probabilities, got {y.shape} and {probs.shape}")
    if (train_labels is None) == (baseline_class is None):
        raise ValueError("pass exactly one of train_labels and baseline_class")
    base = majority_class(train_labels) if baseline_class is None else baseline_class
    base_pred = np.broadcast_to(np.asarray(base, dtype=np.int64), y.shape)
    pred = (probs >= SUBJECT_THRESHOLD).astype(np.int64)
    correct, base_correct = pred == y, base_pred == y
    out: dict[str, float] = {"n": float(y.size), "n_pos": float(y.sum())}
    out["acc"] = float(correct.mean())
    out["acc_ci_low"], out["acc_ci_high"] = proportion_ci(int(correct.sum()), y.size, alpha=alpha)
    out["balanced_acc"], out["balanced_acc_ci_low"], out["balanced_acc_ci_high"] = balanced_accuracy_ci(y, pred, alpha=alpha)
    out["auroc"], out["auroc_ci_low"], out["auroc_ci_high"] = auroc_ci(y, probs, alpha=alpha)
    out["baseline_class"] = float(base_pred[0]) if np.all(base_pred == base_pred[0]) else math.nan
    out["baseline_acc"] = float(base_correct.mean())
    out["baseline_ci_low"], out["baseline_ci_high"] = proportion_ci(int(base_correct.sum()), y.size, alpha=alpha)
    d = accuracy_difference(correct, base_correct, alternative="greater", n_boot=n_boot, seed=seed, alpha=alpha)
    out.update(vs_baseline_diff=d["diff"], vs_baseline_diff_ci_low=d["ci_low"], vs_baseline_diff_ci_high=d["ci_high"],
               vs_baseline_n_better=d["n_a_only"], vs_baseline_n_worse=d["n_b_only"], vs_baseline_p=d["p"])
    out["assoc_p"] = association_p(y, pred)
    return out


def pooled_outer_summary(folds: list[dict[str, np.ndarray]], *, seed: int = 0, n_boot: int = 2000
                         ) -> dict[str, float]:
    """summarize() over nested CV's outer folds pooled: every subject tested once.

    Args:
        folds: one dict per outer fold with "labels" and "probs" of its test subjects and
            "train_labels" of its training subjects (that fold's baseline is their majority).

    Returns:
        summarize()'s keys over all folds' test subjects together.
    """
    if not folds:
        raise ValueError("need at least one outer fold")
    labels = np.concatenate([np.asarray(f["labels"]) for f in folds])
    probs = np.concatenate([np.asarray(f["probs"], dtype=float) for f in folds])
    base = np.concatenate([np.full(len(f["labels"]), majority_class(f["train_labels"])) for f in folds])
    return summarize(labels, probs, baseline_class=base, seed=seed, n_boot=n_boot)
