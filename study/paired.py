"""Two predictors on the same subjects: paired differences with a CI and a test.

    from study.paired import accuracy_difference, auroc_difference

    d = accuracy_difference(pred_a == y, pred_b == y, alternative="greater", seed=0)
    d["diff"], d["ci_low"], d["ci_high"], d["p"], d["n_a_only"], d["n_b_only"]
    a = auroc_difference(y, probs_a, probs_b, seed=0)
    a["diff"], a["ci_low"], a["ci_high"], a["p"]

Methods (also in PAIRED_METHODS, for logging):
- accuracy difference: exact McNemar test, i.e. a binomial test (scipy.stats.binomtest) of
  the discordant pairs against 1/2; CI by paired bootstrap over subjects, BCa
  (scipy.stats.bootstrap on the per-subject differences of correctness).
- AUROC difference: DeLong et al. (1988) test for two correlated AUROCs (hand-written: no
  scipy / statsmodels / scikit-learn routine exists; checked against a simulated null in
  tests/study/test_paired.py); CI by a class-stratified paired bootstrap, BCa: subjects are
  resampled within each class, both predictors with the same draw, so every resample holds
  both classes and none is dropped.
A bootstrap distribution with one value only (e.g. both predictors right on every subject)
gives that value as both limits; where BCa is otherwise undefined the percentile interval of
the same resamples is used.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

PAIRED_METHODS = {
    "acc_diff_test": "exact McNemar (binomial test of discordant pairs)",
    "acc_diff_ci": "paired bootstrap over subjects, BCa",
    "auroc_diff_test": "DeLong 1988, two-sided",
    "auroc_diff_ci": "class-stratified paired bootstrap over subjects, BCa",
}


def mcnemar_exact(n_a_only: int, n_b_only: int, *, alternative: str = "two-sided") -> float:
    """Exact McNemar p-value from the discordant pairs.

    Args:
        n_a_only: subjects predictor a gets right and b gets wrong.
        n_b_only: subjects b gets right and a gets wrong.
        alternative: "greater" (a better than b), "less", or "two-sided".

    Returns:
        The binomial test's p-value of n_a_only out of n_a_only + n_b_only against 1/2; 1.0
        when there is no discordant pair.
    """
    from scipy import stats  # on first use (a compiled-head worker: never)
    total = int(n_a_only) + int(n_b_only)
    if total == 0:
        return 1.0
    return float(stats.binomtest(int(n_a_only), total, 0.5, alternative=alternative).pvalue)


def _bootstrap_interval(data: tuple[np.ndarray, ...], statistic, *, paired: bool,
                        n_boot: int, seed: int, alpha: float) -> tuple[float, float]:
    """BCa interval via scipy.stats.bootstrap; one value only -> that value; BCa undefined -> percentile."""
    from scipy import stats  # on first use (a compiled-head worker: never)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate distributions are handled below
        res = stats.bootstrap(data, statistic, paired=paired, vectorized=True, n_resamples=n_boot,
                              confidence_level=1 - alpha, method="BCa", rng=np.random.default_rng(seed))
    dist = np.asarray(res.bootstrap_distribution)
    if np.ptp(dist) == 0:
        return float(dist.flat[0]), float(dist.flat[0])
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if math.isnan(low) or math.isnan(high):
        low, high = (float(q) for q in np.quantile(dist, [alpha / 2, 1 - alpha / 2]))
    return low, high


def accuracy_difference(correct_a: np.ndarray, correct_b: np.ndarray, *, alternative: str = "two-sided",
                        n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict[str, float]:
    """accuracy(a) - accuracy(b) on the same subjects, with a CI and an exact McNemar test.

    Args:
        correct_a, correct_b: per subject, whether a (b) predicted its label (bool or 0/1).
        alternative: of the test; "greater" tests a better than b.
        n_boot, seed, alpha: bootstrap resamples, their seed, 1 - confidence level.

    Returns:
        n, diff, ci_low, ci_high, p, n_a_only (a right, b wrong), n_b_only.
    """
    a, b = (np.asarray(v).astype(bool) for v in (correct_a, correct_b))
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need two equal non-empty 1-D arrays, got {a.shape} and {b.shape}")
    d = a.astype(float) - b.astype(float)
    diff = float(d.mean())
    n_a_only, n_b_only = int(np.sum(a & ~b)), int(np.sum(b & ~a))
    if d.size > 1:
        low, high = _bootstrap_interval((d,), lambda x, axis=-1: np.mean(x, axis=axis),
                                        paired=True, n_boot=n_boot, seed=seed, alpha=alpha)
    else:
        low = high = math.nan
    return {"n": float(d.size), "diff": diff, "ci_low": low, "ci_high": high,
            "p": mcnemar_exact(n_a_only, n_b_only, alternative=alternative),
            "n_a_only": float(n_a_only), "n_b_only": float(n_b_only)}


def _auroc_by_ranks(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC along the last axis (ties count 1/2), for batches of resamples."""
    from scipy import stats  # on first use (a compiled-head worker: never)
    m, n = pos.shape[-1], neg.shape[-1]
    ranks = stats.rankdata(np.concatenate([pos, neg], axis=-1), axis=-1)
    return (ranks[..., :m].sum(axis=-1) - m * (m + 1) / 2) / (m * n)


def _delong_components(pos: np.ndarray, neg: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUROC and DeLong's structural components (per positive, per negative), via midranks."""
    from scipy import stats  # on first use (a compiled-head worker: never)
    m, n = pos.size, neg.size
    all_ranks = stats.rankdata(np.concatenate([pos, neg]))
    pos_ranks, neg_ranks = stats.rankdata(pos), stats.rankdata(neg)
    v10 = (all_ranks[:m] - pos_ranks) / n  # share of negatives each positive outranks
    v01 = 1 - (all_ranks[m:] - neg_ranks) / m  # share of positives that outrank each negative
    return float(v10.mean()), v10, v01


def delong_test(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray) -> tuple[float, float, float]:
    """DeLong's two-sided test of AUROC(a) = AUROC(b) on the same subjects and labels.

    Returns:
        (AUROC of a, AUROC of b, p); p is NaN with fewer than 2 subjects in a class, or
        when the difference's variance is 0 although the AUROCs differ (no test possible);
        1.0 when both are equal with variance 0.
    """
    from scipy import stats  # on first use (a compiled-head worker: never)
    y = np.asarray(y).astype(bool)
    a, b = np.asarray(score_a, float), np.asarray(score_b, float)
    m, n = int(y.sum()), int((~y).sum())
    if m < 1 or n < 1:
        return math.nan, math.nan, math.nan
    auc_a, v10a, v01a = _delong_components(a[y], a[~y])
    auc_b, v10b, v01b = _delong_components(b[y], b[~y])
    if m < 2 or n < 2:
        return auc_a, auc_b, math.nan
    s10, s01 = np.cov(np.vstack([v10a, v10b])), np.cov(np.vstack([v01a, v01b]))
    cov = s10 / m + s01 / n
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    diff = auc_a - auc_b
    if var <= 1e-15:
        return auc_a, auc_b, 1.0 if abs(diff) < 1e-12 else math.nan
    return auc_a, auc_b, float(2 * stats.norm.sf(abs(diff) / math.sqrt(var)))


def auroc_difference(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, *, n_boot: int = 2000,
                     seed: int = 0, alpha: float = 0.05) -> dict[str, float]:
    """AUROC(a) - AUROC(b) on the same subjects and labels: DeLong p, stratified paired bootstrap CI.

    Returns:
        n, auroc_a, auroc_b, diff, ci_low, ci_high, p; all NaN when a class is missing.
    """
    y = np.asarray(y).astype(np.int64)
    a, b = np.asarray(score_a, float), np.asarray(score_b, float)
    if not (y.shape == a.shape == b.shape) or y.ndim != 1:
        raise ValueError(f"need equal 1-D arrays, got {y.shape}, {a.shape}, {b.shape}")
    auc_a, auc_b, p = delong_test(y, a, b)
    out = {"n": float(y.size), "auroc_a": auc_a, "auroc_b": auc_b, "diff": auc_a - auc_b,
           "ci_low": math.nan, "ci_high": math.nan, "p": p}
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if pos.size < 2 or neg.size < 2:
        return out

    def statistic(ip, ineg, axis=-1):  # indices drawn within each class; one draw for both predictors
        ip, ineg = ip.astype(np.int64), ineg.astype(np.int64)
        return _auroc_by_ranks(a[ip], a[ineg]) - _auroc_by_ranks(b[ip], b[ineg])

    out["ci_low"], out["ci_high"] = _bootstrap_interval((pos, neg), statistic, paired=False,
                                                        n_boot=n_boot, seed=seed, alpha=alpha)
    return out
