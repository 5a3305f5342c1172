"""select_on: a constant predictor cannot win the default selection."""

from __future__ import annotations

import math

import numpy as np
import pytest

from study.selection import selection_score, tune_metric, validation_metrics


def test_constant_predictor_loses_under_balanced_accuracy_but_wins_under_accuracy():
    y = np.array([0] * 8 + [1] * 2)  # an imbalanced stratum
    constant = validation_metrics(y, np.full(10, 0.2), loss=0.5)
    informative = validation_metrics(y, np.r_[np.full(6, 0.2), 0.7, 0.7, 0.8, 0.4], loss=0.6)
    assert constant["val_acc"] == 0.8 and informative["val_acc"] == 0.7
    assert constant["val_balanced_acc"] == 0.5 and informative["val_balanced_acc"] == pytest.approx(0.625)
    assert selection_score(constant, "acc") > selection_score(informative, "acc")
    assert selection_score(informative, "balanced_acc") > selection_score(constant, "balanced_acc")
    assert selection_score(informative, "auroc") > selection_score(constant, "auroc")
    assert selection_score(constant, "loss") > selection_score(informative, "loss")  # lower loss wins


def test_ties_go_to_lower_loss_and_undefined_ranks_last():
    a = {"val_balanced_acc": 0.6, "val_loss": 0.7}
    b = {"val_balanced_acc": 0.6, "val_loss": 0.5}
    assert selection_score(b, "balanced_acc") > selection_score(a, "balanced_acc")
    one_class = validation_metrics(np.ones(4, int), np.full(4, 0.9), loss=0.1)
    assert math.isnan(one_class["val_auroc"])
    assert selection_score(one_class, "auroc") < selection_score({"val_auroc": 0.1, "val_loss": 9}, "auroc")


def test_tune_metric_and_bad_value():
    assert tune_metric("balanced_acc") == ("val_balanced_acc", "max")
    assert tune_metric("loss") == ("val_loss", "min")
    with pytest.raises(ValueError, match="balanced_acc, auroc, loss, acc"):
        tune_metric("f1")
