"""study/model_card.py: the card says what the model was trained on, how good it is against
its baselines (with CIs), how it was selected, its intended use and its limits."""

from __future__ import annotations

from pyfunc_helpers import _config


def test_card_holds_data_metrics_baselines_selection_use_and_limits():
    from study.model_card import render_card

    config = _config(axes={"cohort": "oai", "measure": "leg_strength", "sex": "female", "bmi": "<25"},
                     stratum={"sex": "female", "bmi": [None, 25.0], "bmi_label": "<25"}, direction="higher",
                     label_threshold=31.5, label_threshold_rule="median", selected_on="best_val_score")
    metrics = {"n_train": 10, "n_train_high": 4, "n_val": 3, "n_val_high": 1, "n_test": 5, "n_test_high": 2,
               "test_acc": 0.8, "test_acc_ci_low": 0.4, "test_acc_ci_high": 1.0,
               "test_baseline_acc": 0.6, "test_baseline_ci_low": 0.2, "test_baseline_ci_high": 1.0,
               "test_auroc": 0.75, "test_auroc_ci_low": 0.3, "test_auroc_ci_high": 1.0,
               "size_age_test_acc": 0.6, "cnn_minus_size_age_acc": 0.2, "cnn_minus_size_age_acc_ci_low": -0.2,
               "cnn_minus_size_age_acc_ci_high": 0.6, "test_perm_p": 0.04, "best_val_acc": 0.67}
    card = render_card(config, metrics)
    for heading in ("## Intended use", "## Data", "## Performance against baselines", "## Selection", "## Known limits"):
        assert heading in card
    assert "**Not a medical device**" in card and config["store_hash"] in card
    assert "sex female, BMI <25" in card and "| train | 10 | 4 | 6 |" in card and "| test | 5 | 2 | 3 |" in card
    assert "| Accuracy | 0.800 (0.400-1.000) |" in card
    assert "| Training-majority baseline ('low') | 0.600 (0.200-1.000) |" in card
    assert "| Body-size baseline (size+age) accuracy | 0.600 |" in card
    assert "| CNN minus size+age accuracy (paired) | 0.200 (-0.200-0.600) |" in card
    assert "| Test versus baseline p (test_perm_p) | 0.04 |" in card
    assert "`best_val_score`" in card and "never on test" in card
    assert "| Matrix rows | 64 |" in card and "| Pixel spacing, rows (mm) | 3.9 - 3.91 |" in card
    assert "test_vs_baseline_p" in render_card(config, {**metrics, "test_vs_baseline_p": 0.01})
