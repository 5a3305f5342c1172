"""Tests for study.metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from study import metrics


def test_thin_wrappers_match_hand_computed_values():
    y = np.array([1, 1, 1, 0])
    pred = np.array([1, 0, 1, 1])
    assert metrics.accuracy(y, pred) == 0.5
    # recall class 1 = 2/3, class 0 = 0/1
    assert metrics.balanced_accuracy(y, pred) == pytest.approx((2 / 3 + 0) / 2)
    # positives scored 0.9, 0.4, 0.8 vs the negative 0.5: 2 of 3 pairs ordered right
    assert metrics.auroc(y, np.array([0.9, 0.4, 0.8, 0.5])) == pytest.approx(2 / 3)
    assert math.isnan(metrics.auroc(np.array([1, 1]), np.array([0.2, 0.9])))


def test_majority_baseline():
    assert metrics.majority_baseline([1, 1, 0], [0, 1, 1, 1]) == 0.75
    assert metrics.majority_baseline([0, 0, 1], [0, 1, 1, 1]) == 0.25
    assert metrics.majority_baseline([0, 1], [0, 1, 1, 1]) == 0.25  # tie -> class 0


def test_bootstrap_ci_contains_point_and_is_reproducible():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    pred = np.where(rng.random(200) < 0.8, y, 1 - y)
    point, low, high = metrics.bootstrap_ci(y, pred, metrics.accuracy, n_boot=500, seed=1)
    assert point == metrics.accuracy(y, pred)
    assert low < point < high
    # normal approximation half-width 1.96 * sqrt(p (1 - p) / n) ~ 0.055 at p = 0.8
    half = 1.96 * math.sqrt(point * (1 - point) / 200)
    assert abs((high - low) / 2 - half) < 0.015
    assert metrics.bootstrap_ci(y, pred, metrics.accuracy, n_boot=500, seed=1) == (point, low, high)


def test_bootstrap_ci_skips_undefined_resamples():
    y = np.array([0] * 9 + [1])  # many resamples miss the one positive
    score = np.linspace(0, 1, 10)
    point, low, high = metrics.bootstrap_ci(y, score, metrics.auroc, n_boot=300, seed=0)
    assert point == 1.0 and low == 1.0 and high == 1.0
    assert all(math.isnan(v) for v in metrics.bootstrap_ci(np.ones(5), score[:5], metrics.auroc, n_boot=50))


def test_permutation_p_value():
    y = np.array([0, 1] * 20)
    assert metrics.permutation_p_value(y, y, n_perm=999, seed=0) == pytest.approx(1 / 1000)
    # a constant predictor scores the majority rate but carries no information
    constant = np.ones_like(y)
    assert metrics.permutation_p_value(y, constant, n_perm=200) == 1.0
    # not above the stated baseline -> p = 1 whatever the permutations say
    assert metrics.permutation_p_value(y, y, 1.0, n_perm=50) == 1.0
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 2, 40)
    assert metrics.permutation_p_value(y, noise, n_perm=500) > 0.05


def test_summarize_random_labels_ci_contains_chance():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)
    probs = rng.random(120)
    out = metrics.summarize(y, probs, train_labels=rng.integers(0, 2, 300), seed=0, n_boot=400)
    expected = {
        "n", "n_pos", "acc", "acc_ci_low", "acc_ci_high", "balanced_acc", "balanced_acc_ci_low",
        "balanced_acc_ci_high", "auroc", "auroc_ci_low", "auroc_ci_high", "baseline_acc",
        "baseline_ci_low", "baseline_ci_high", "perm_p",
    }
    assert set(out) == expected
    assert out["n"] == 120 and out["n_pos"] == y.sum()
    assert out["acc"] == metrics.accuracy(y, (probs >= 0.5).astype(int))
    for name in ("acc", "balanced_acc", "auroc"):
        assert out[f"{name}_ci_low"] < 0.5 < out[f"{name}_ci_high"], name
    assert out["baseline_ci_low"] <= out["baseline_acc"] <= out["baseline_ci_high"]
    assert out["perm_p"] > 0.05


def test_summarize_single_class_auroc_nan():
    out = metrics.summarize(np.ones(6, int), np.full(6, 0.7), train_labels=[0, 1, 1], n_boot=50)
    assert out["acc"] == 1.0 and out["baseline_acc"] == 1.0
    assert math.isnan(out["auroc"]) and math.isnan(out["auroc_ci_low"])
    assert out["perm_p"] == 1.0
