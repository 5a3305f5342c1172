"""Paired comparisons between cells on the subjects they share."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_plan import _grid, _store

from study.compare import launch_comparisons, measure_difference, pooled_cell, stratum_vs_pooled
from study.config import Cell
from study.plan import plan_cells


def _predictions(plans, store, *, noise):
    """Test predictions that follow each cell's labels with the given noise (seeded per cell)."""
    out = {}
    for i, plan in enumerate(plans):
        rng = np.random.default_rng(i)
        y = plan.labels["test"]
        probs = np.clip(0.5 + (y - 0.5) * 0.6 + rng.normal(0, noise, y.size), 0, 1)
        out[plan.cell] = {"rows": plan.split["test"], "labels": y, "probs": probs}
    return out


def test_strata_are_scored_by_the_pooled_model_on_their_own_test_subjects():
    store = _store()
    plans = plan_cells(_grid(grid={"cohort": ["oai"], "measure": ["leg_strength", "chair_stand"],
                                   "sex": ["all", "female"], "bmi": ["all", "25-30"]}), store)
    preds = _predictions(plans, store, noise=0.3)
    per_cell, pairs = launch_comparisons(preds, n_boot=300)
    strata = [p.cell for p in plans if p.cell != pooled_cell(p.cell)]
    assert set(per_cell) == {c.name for c in strata}
    for cell in strata:
        r = per_cell[cell.name]
        assert r["pooled_n_test"] == len(preds[cell]["rows"]) and r["pooled_n_label_differs"] == 0
        pooled = preds[pooled_cell(cell)]
        at = np.searchsorted(pooled["rows"], preds[cell]["rows"])
        y = preds[cell]["labels"]
        assert r["pooled_test_acc"] == pytest.approx(np.mean((pooled["probs"][at] >= 0.5) == y))
        own = np.mean((preds[cell]["probs"] >= 0.5) == y)
        assert r["stratum_minus_pooled_acc"] == pytest.approx(own - r["pooled_test_acc"])
        assert r["stratum_minus_pooled_acc_ci_low"] <= r["stratum_minus_pooled_acc"] <= r["stratum_minus_pooled_acc_ci_high"]
        assert 0 <= r["stratum_minus_pooled_acc_p"] <= 1 and 0 <= r["stratum_minus_pooled_auroc_p"] <= 1
        assert r["stratum_minus_pooled_acc_p_holm"] >= r["stratum_minus_pooled_acc_p"]
    # measure pairs within each (cohort, sex, bmi), on the subjects who have both measures
    assert len(pairs) == 4 and {(p["measure_a"], p["measure_b"]) for p in pairs} == {("chair_stand", "leg_strength")}
    pair = next(p for p in pairs if p["sex"] == "all" and p["bmi"] == "all")
    shared = np.intersect1d(preds[Cell("oai", "chair_stand")]["rows"], preds[Cell("oai", "leg_strength")]["rows"])
    assert pair["n_shared"] == shared.size < len(preds[Cell("oai", "leg_strength")]["rows"])


def test_same_model_gives_zero_difference():
    rows = np.arange(40)
    y = np.r_[np.zeros(20, int), np.ones(20, int)]
    probs = np.random.default_rng(0).random(40)
    pooled = {"rows": rows, "labels": y, "probs": probs}
    stratum = {"rows": rows[::2], "labels": y[::2], "probs": probs[::2]}
    r = stratum_vs_pooled(stratum, pooled, n_boot=200)
    assert r["stratum_minus_pooled_acc"] == 0 and r["stratum_minus_pooled_acc_p"] == 1.0
    assert r["stratum_minus_pooled_auroc"] == 0 and r["stratum_minus_pooled_auroc_p"] == 1.0
    assert r["stratum_minus_pooled_auroc_ci_low"] == r["stratum_minus_pooled_auroc_ci_high"] == 0


def test_stratum_thresholds_compare_auroc_only_and_unshared_subjects_are_refused():
    rows = np.arange(30)
    y = np.r_[np.zeros(15, int), np.ones(15, int)]
    probs = np.linspace(0.05, 0.95, 30)
    pooled = {"rows": rows, "labels": y, "probs": probs}
    relabelled = {"rows": rows[10:], "labels": np.r_[np.zeros(10, int), np.ones(10, int)], "probs": probs[10:]}
    r = stratum_vs_pooled(relabelled, pooled, n_boot=200)
    assert r["pooled_n_label_differs"] == 5
    assert math.isnan(r["pooled_test_acc"]) and math.isnan(r["stratum_minus_pooled_acc"])
    assert r["pooled_test_auroc"] == 1.0 and r["stratum_minus_pooled_auroc"] == 0
    with pytest.raises(ValueError, match="one split per cohort"):
        stratum_vs_pooled({"rows": np.array([99]), "labels": np.array([1]), "probs": np.array([0.9])}, pooled)


def test_measure_difference_scores_each_on_its_own_labels():
    a = {"rows": np.array([1, 2, 3, 4, 5, 6]), "labels": np.array([0, 0, 0, 1, 1, 1]),
         "probs": np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])}
    b = {"rows": np.array([4, 5, 6, 7]), "labels": np.array([0, 1, 0, 1]), "probs": np.array([0.9, 0.8, 0.1, 0.9])}
    d = measure_difference(a, b, n_boot=100)
    assert d["n_shared"] == 3 and d["acc_a"] == 1.0 and d["acc_b"] == pytest.approx(2 / 3)
    assert d["a_minus_b_acc"] == pytest.approx(1 / 3) and d["a_minus_b_acc_p"] == 1.0  # one discordant pair
