"""study.metrics on constructed cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from study import metrics
from study.config import GridConfig


def test_thin_wrappers_match_hand_computed_values():
    y = np.array([1, 1, 1, 0])
    pred = np.array([1, 0, 1, 1])
    assert metrics.accuracy(y, pred) == 0.5
    # recall class 1 = 2/3, class 0 = 0/1
    assert metrics.balanced_accuracy(y, pred) == pytest.approx((2 / 3 + 0) / 2)
    # positives scored 0.9, 0.4, 0.8 vs the negative 0.5: 2 of 3 pairs ordered right
    assert metrics.auroc(y, np.array([0.9, 0.4, 0.8, 0.5])) == pytest.approx(2 / 3)
    assert math.isnan(metrics.auroc(np.array([1, 1]), np.array([0.2, 0.9])))


def test_majority_class_and_baseline():
    assert metrics.majority_class([1, 1, 0]) == 1
    assert metrics.majority_class([0, 1]) == 0  # tie -> low
    assert metrics.majority_baseline([1, 1, 0], [0, 1, 1, 1]) == 0.75
    assert metrics.majority_baseline([0, 0, 1], [0, 1, 1, 1]) == 0.25
    assert metrics.majority_baseline([0, 1], [0, 1, 1, 1]) == 0.25


def _issue_example():
    """30 test subjects, 70% low; the model gets 18/21 low and 7/9 high right (25/30)."""
    y = np.array([0] * 21 + [1] * 9)
    pred = np.array([0] * 18 + [1] * 3 + [1] * 7 + [0] * 2)
    return y, np.where(pred == 1, 0.8, 0.2)


def test_issue_example_test_against_baseline_is_mcnemar_not_association():
    y, probs = _issue_example()
    s = metrics.summarize(y, probs, train_labels=np.array([0] * 70 + [1] * 30), seed=0, n_boot=2000)
    assert s["acc"] == pytest.approx(25 / 30) and s["baseline_acc"] == pytest.approx(0.7)
    assert s["baseline_class"] == 0
    # discordant pairs: 7 highs only the model gets right, 3 lows only the baseline gets right;
    # one-sided exact McNemar = P(Bin(10, 1/2) >= 7) = 176/1024
    assert (s["vs_baseline_n_better"], s["vs_baseline_n_worse"]) == (7, 3)
    assert s["vs_baseline_p"] == pytest.approx(176 / 1024)
    assert s["assoc_p"] < 0.005  # association with the labels is strong; beating the baseline is not shown
    assert s["vs_baseline_diff"] == pytest.approx(25 / 30 - 0.7)
    assert s["vs_baseline_diff_ci_low"] < 0 < s["vs_baseline_diff_ci_high"]  # agrees with p > 0.05
    # Clopper-Pearson 25/30
    assert (s["acc_ci_low"], s["acc_ci_high"]) == pytest.approx((0.6528, 0.9436), abs=1e-4)


def test_nine_of_nine_correct_intervals_do_not_collapse():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    probs = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95])
    s = metrics.summarize(y, probs, train_labels=np.array([0, 1, 1]), n_boot=500)
    assert s["acc"] == 1.0
    assert (s["acc_ci_low"], s["acc_ci_high"]) == pytest.approx((0.6637, 1.0), abs=1e-4)  # Clopper-Pearson
    assert s["auroc"] == 1.0 and 0.5 < s["auroc_ci_low"] < 0.7 and s["auroc_ci_high"] == 1.0
    assert s["balanced_acc"] == 1.0 and s["balanced_acc_ci_low"] < 0.8
    # baseline (high) right on 5, the model on all 9: 4 discordant pairs, p = 1/16
    assert s["vs_baseline_p"] == pytest.approx(1 / 16)


def test_auroc_interval_with_one_subject_in_a_class_uses_no_resampling():
    """A bootstrap would draw one-class resamples in about a third of the draws here and
    silently drop them; the score interval needs no resampling."""
    y = np.array([0] * 9 + [1])
    point, low, high = metrics.auroc_ci(y, np.linspace(0, 1, 10))
    assert point == 1.0 and high == 1.0 and low < 0.5
    assert all(math.isnan(v) for v in metrics.auroc_ci(np.ones(5, int), np.linspace(0, 1, 5)))


def test_auroc_interval_solves_newcombes_equation():
    """The limits are the roots in (0, 1) of (auc - t)^2 = z^2 V(t), as a quartic (numpy.roots)."""
    rng = np.random.default_rng(4)
    y = np.array([0] * 12 + [1] * 8)
    scores = rng.normal(size=20) + y
    auc, low, high = metrics.auroc_ci(y, scores)
    m, n, big = 8, 12, 10.0
    z2 = 1.959963984540054 ** 2
    t = np.polynomial.Polynomial([0, 1])
    lhs = (auc - t) ** 2 * m * n * (2 - t) * (1 + t)
    rhs = z2 * t * (1 - t) * ((2 * big - 1) * (2 - t) * (1 + t) - 3 * (big - 1))
    roots = sorted(r.real for r in (lhs - rhs).roots() if abs(r.imag) < 1e-9 and 0 < r.real < 1)
    assert (low, high) == pytest.approx((roots[0], roots[-1]), abs=1e-6)


def test_min_test_per_class_default_gives_ci_narrower_than_a_quarter():
    k = GridConfig.min_test_per_class
    low, high = metrics.proportion_ci(k, 2 * k)  # widest at 50% accuracy
    assert (high - low) / 2 < 0.25
    low, high = metrics.proportion_ci(k - 1, 2 * (k - 1))
    assert (high - low) / 2 > 0.25  # one fewer per class would not do


def test_balanced_accuracy_interval_is_mover_of_wilson_limits():
    y = np.array([0] * 10 + [1] * 20)
    pred = np.array([0] * 8 + [1] * 2 + [1] * 15 + [0] * 5)
    point, low, high = metrics.balanced_accuracy_ci(y, pred)
    assert point == pytest.approx((0.8 + 0.75) / 2)
    l0, h0 = metrics.proportion_ci(8, 10, method="wilson")
    l1, h1 = metrics.proportion_ci(15, 20, method="wilson")
    assert low == pytest.approx(point - 0.5 * math.hypot(0.8 - l0, 0.75 - l1))
    assert high == pytest.approx(point + 0.5 * math.hypot(h0 - 0.8, h1 - 0.75))
    assert all(math.isnan(v) for v in metrics.balanced_accuracy_ci(np.ones(4, int), np.ones(4, int)))


def test_summarize_keys_and_random_predictions():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)
    probs = rng.random(120)
    out = metrics.summarize(y, probs, train_labels=rng.integers(0, 2, 300), seed=0, n_boot=400)
    assert set(out) == {
        "n", "n_pos", "acc", "acc_ci_low", "acc_ci_high", "balanced_acc", "balanced_acc_ci_low",
        "balanced_acc_ci_high", "auroc", "auroc_ci_low", "auroc_ci_high", "baseline_class", "baseline_acc",
        "baseline_ci_low", "baseline_ci_high", "vs_baseline_diff", "vs_baseline_diff_ci_low",
        "vs_baseline_diff_ci_high", "vs_baseline_n_better", "vs_baseline_n_worse", "vs_baseline_p", "assoc_p"}
    for name in ("acc", "balanced_acc", "auroc"):
        assert out[f"{name}_ci_low"] < 0.5 < out[f"{name}_ci_high"], name
    assert out["vs_baseline_p"] > 0.05 and out["assoc_p"] > 0.05
    again = metrics.summarize(y, probs, train_labels=rng.integers(0, 2, 300), seed=0, n_boot=400)
    assert again["vs_baseline_diff_ci_low"] == out["vs_baseline_diff_ci_low"]  # seeded


def test_constant_majority_predictor_never_beats_the_baseline():
    y = np.array([0] * 14 + [1] * 6)
    s = metrics.summarize(y, np.full(20, 0.3), train_labels=np.array([0, 0, 1]), n_boot=200)
    assert s["acc"] == s["baseline_acc"] == 0.7
    assert s["vs_baseline_p"] == 1.0 and s["vs_baseline_diff"] == 0
    assert s["vs_baseline_diff_ci_low"] == s["vs_baseline_diff_ci_high"] == 0.0
    assert s["balanced_acc"] == 0.5 and s["auroc"] == 0.5


def test_single_class_test_set():
    out = metrics.summarize(np.ones(6, int), np.full(6, 0.7), train_labels=[0, 1, 1], n_boot=50)
    assert out["acc"] == 1.0 and out["baseline_acc"] == 1.0
    assert math.isnan(out["auroc"]) and math.isnan(out["auroc_ci_low"]) and math.isnan(out["balanced_acc"])
    assert out["vs_baseline_p"] == 1.0


def test_summarize_refuses_ambiguous_baseline():
    with pytest.raises(ValueError, match="exactly one"):
        metrics.summarize(np.array([0, 1]), np.array([0.2, 0.8]))
    with pytest.raises(ValueError, match="exactly one"):
        metrics.summarize(np.array([0, 1]), np.array([0.2, 0.8]), train_labels=[0], baseline_class=1)


def test_pooled_outer_folds_use_each_folds_training_majority():
    folds = [{"labels": np.array([0, 0, 1]), "probs": np.array([0.1, 0.2, 0.9]), "train_labels": np.array([0, 0, 1])},
             {"labels": np.array([1, 1, 0]), "probs": np.array([0.8, 0.9, 0.1]), "train_labels": np.array([1, 1, 0])}]
    s = metrics.pooled_outer_summary(folds, n_boot=100)
    assert s["n"] == 6 and s["acc"] == 1.0
    assert s["baseline_acc"] == pytest.approx(4 / 6)  # fold 1 predicts low, fold 2 high
    assert math.isnan(s["baseline_class"])
    assert (s["vs_baseline_n_better"], s["vs_baseline_n_worse"]) == (2, 0)
