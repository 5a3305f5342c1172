"""Paired differences: exact McNemar, bootstrap CIs, DeLong."""

from __future__ import annotations

import math

import numpy as np
import pytest

from study.paired import accuracy_difference, auroc_difference, delong_test, mcnemar_exact


def test_mcnemar_exact_known_values():
    assert mcnemar_exact(7, 3, alternative="greater") == pytest.approx(176 / 1024)
    assert mcnemar_exact(7, 3) == pytest.approx(2 * 176 / 1024)
    assert mcnemar_exact(3, 7, alternative="greater") == pytest.approx(1 - 56 / 1024)  # P(X >= 3)
    assert mcnemar_exact(0, 0) == 1.0


def test_accuracy_difference_identical_and_better():
    rng = np.random.default_rng(0)
    a = rng.random(80) < 0.7
    same = accuracy_difference(a, a, n_boot=300)
    assert same["diff"] == 0 and same["ci_low"] == same["ci_high"] == 0 and same["p"] == 1.0
    always = np.ones(80, bool)
    d = accuracy_difference(always, a, alternative="greater", n_boot=500, seed=1)
    assert d["diff"] == pytest.approx(1 - a.mean()) and 0 < d["ci_low"] <= d["diff"] <= d["ci_high"]
    assert d["n_a_only"] == (~a).sum() and d["n_b_only"] == 0 and d["p"] < 1e-6
    rev = accuracy_difference(a, always, n_boot=500, seed=1)
    assert rev["diff"] == -d["diff"] and rev["ci_high"] < 0
    with pytest.raises(ValueError):
        accuracy_difference(a, a[:-1])


def _naive_delong(y, a, b):
    """DeLong's variance from its definition (O(m n) pairwise kernels), for cross-checking."""
    pos, neg = y == 1, y == 0
    comps = []
    for s in (a, b):
        psi = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        comps.append((psi.mean(axis=1), psi.mean(axis=0), psi.mean()))
    m, n = pos.sum(), neg.sum()
    s10 = np.cov(np.vstack([comps[0][0], comps[1][0]]))
    s01 = np.cov(np.vstack([comps[0][1], comps[1][1]]))
    cov = s10 / m + s01 / n
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    from scipy import stats
    return comps[0][2], comps[1][2], 2 * stats.norm.sf(abs(comps[0][2] - comps[1][2]) / math.sqrt(var))


def test_delong_matches_its_definition_with_ties():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 60)
    a = np.round(y + rng.normal(size=60), 1)  # rounding makes ties
    b = np.round(0.5 * y + rng.normal(size=60), 1)
    assert delong_test(y, a, b) == pytest.approx(_naive_delong(y, a, b))


def test_delong_is_calibrated_under_equal_aurocs():
    rng = np.random.default_rng(3)
    p = []
    for _ in range(400):
        y = rng.integers(0, 2, 60)
        p.append(delong_test(y, y + rng.normal(size=60) * 1.5, y + rng.normal(size=60) * 1.5)[2])
    rate = np.mean(np.array(p) < 0.05)
    assert rate < 0.05 + 2 * math.sqrt(0.05 * 0.95 / 400), rate  # within two Monte-Carlo SEs


def test_auroc_difference_keeps_both_classes_in_every_resample():
    """With 2 positives in 12, a plain bootstrap draws no positive in (10/12)^12 = 11% of
    resamples; the class-stratified one never does, so the CI exists and is finite."""
    y = np.array([0] * 10 + [1] * 2)
    a = np.linspace(0, 1, 12)
    b = np.r_[np.linspace(0, 1, 10), 0.3, 0.95]
    d = auroc_difference(y, a, b, n_boot=500, seed=0)
    assert d["auroc_a"] == 1.0 and d["auroc_b"] == pytest.approx(0.6)  # (3 + 9) / 20 pairs
    assert np.isfinite(d["ci_low"]) and np.isfinite(d["ci_high"]) and d["ci_low"] <= d["diff"] <= d["ci_high"]
    one = auroc_difference(np.array([0] * 10 + [1]), np.linspace(0, 1, 11), np.linspace(0, 1, 11))
    assert math.isnan(one["ci_low"])  # a class of one subject: no interval claimed


def test_auroc_difference_ci_excludes_zero_for_a_clearly_better_model():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 200)
    good, noise = y + rng.normal(size=200) * 0.5, rng.normal(size=200)
    d = auroc_difference(y, good, noise, n_boot=1000, seed=0)
    assert d["ci_low"] > 0.2 and d["p"] < 1e-6
