"""The results table and the accuracy plot show the test against the baseline and the strata."""

from __future__ import annotations

import math

import pytest

from study.report import format_table, plot_accuracy, results_table


def _cells():
    base = {"cohort": "oai", "measure": "leg_strength", "status": "ok", "n_train": 100, "n_val": 30, "n_test": 30,
            "best_val_acc": 0.7, "test_baseline_acc": 0.5, "test_acc_ci_low": 0.5, "test_acc_ci_high": 0.85,
            "test_auroc": 0.7, "size_age_test_acc": 0.6, "cnn_minus_size_age_acc": 0.1}
    return [
        {**base, "cell": "oai__leg_strength__sex-all__bmi-all", "sex": "all", "bmi": "all", "test_acc": 0.7,
         "test_vs_baseline_p": 0.01},
        {**base, "cell": "oai__leg_strength__sex-female__bmi-all", "sex": "female", "bmi": "all", "test_acc": 0.65,
         "test_vs_baseline_p": 0.02, "pooled_test_acc": 0.6, "stratum_minus_pooled_acc": 0.05,
         "stratum_minus_pooled_acc_ci_low": -0.1, "stratum_minus_pooled_acc_ci_high": 0.2,
         "stratum_minus_pooled_acc_p": 0.5},
        {"cell": "oai__leg_strength__sex-male__bmi-all", "cohort": "oai", "measure": "leg_strength", "sex": "male",
         "bmi": "all", "status": "failed: RuntimeError: no trial"},
    ]


def test_table_adds_holm_and_bh_over_the_cells_that_were_tested():
    df = results_table(_cells())
    assert df["test_vs_baseline_p_holm"].tolist()[:2] == pytest.approx([0.02, 0.02])
    assert df["test_vs_baseline_p_bh"].tolist()[:2] == pytest.approx([0.02, 0.02])
    assert math.isnan(df["test_vs_baseline_p_holm"].iloc[2])
    text = format_table(df)
    assert "p base" in text and "Holm" in text and "strat-pooled" in text
    female = next(line for line in text.splitlines() if "sex-female" in line)
    assert "+0.050 [-0.10, +0.20]" in female and "0.600" in female
    assert "failed: RuntimeError" in text


def test_plot_writes_a_png(tmp_path):
    out = plot_accuracy(results_table(_cells()), tmp_path / "acc.png", "Does it work?")
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"
