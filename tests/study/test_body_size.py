"""Thigh areas vs the phantom's truth, the size baseline on a planted cohort, paired bootstrap."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
from store_helpers import synthetic_oai_store

from data_prep.store import open_store, pseudonym
from study import data
from study.body_size import (fit_size_baseline, size_baseline, size_features,
                             thigh_areas, tissue_masks)

SALT = "body-size-test-salt-0123456789"
N_SUBJECTS = 40  # enough that a 5-feature logistic fit on ~28 subjects is stable


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[object, pd.DataFrame]:
    """(opened 64x128 store, truth rows aligned with the store's subject rows)."""
    root = tmp_path_factory.mktemp("size")
    store = open_store(synthetic_oai_store(root, subjects=N_SUBJECTS, seed=1, size="64x128", salt=SALT))
    truth = pd.read_csv(root / "cohort" / "truth.csv")
    truth = truth[truth["cohort"] == "oai"]
    truth.index = [pseudonym(SALT.encode(), "oai", str(i)) for i in truth["id"]]
    return store, truth.loc[store.subjects["subject_id"]].reset_index(drop=True)


def test_areas_follow_truth(cohort):
    store, truth = cohort
    areas = thigh_areas(store, np.arange(len(store.subjects)))
    assert areas.attrs["unit"] == "cm2"  # the store carries pixel spacing
    total = truth[["muscle_area_cm2", "imat_area_cm2", "bone_area_cm2", "fat_area_cm2"]].sum(axis=1)
    pairs = {"muscle_area": truth["muscle_area_cm2"],
             "fat_area": truth["fat_area_cm2"] + truth["imat_area_cm2"],  # T1 can't split them
             "total_area": total}
    for col, true in pairs.items():
        r = np.corrcoef(areas[col], true)[0, 1]
        assert r > 0.9, f"{col}: r = {r:.3f} with truth"
        # both thighs are imaged, truth is per thigh; edge partial volumes allow some bias
        ratio = float(np.median(areas[col] / 2 / true))
        assert 0.8 < ratio < 1.25, f"{col}: measured / true = {ratio:.2f}"


def test_pixel_units_without_spacing(cohort):
    store, _ = cohort
    cm2 = thigh_areas(store, np.array([0, 1]))
    px = thigh_areas(store, np.array([0, 1]), pixel_spacing_mm=(1.0, 1.0))
    assert np.allclose(cm2.to_numpy(), px.to_numpy() * 3.9062**2, rtol=1e-3)


def test_masks_ring_is_fat(cohort):
    store, _ = cohort
    masks = tissue_masks(store.subject_images(0))
    ring = masks["periphery"]
    assert ring.sum() > 0 and masks["muscle"].sum() > 0
    assert (masks["fat"] & ring).sum() / ring.sum() > 0.6
    assert not (masks["muscle"] & ~masks["thigh"]).any()


def test_size_baseline_beats_majority_on_planted_labels(cohort):
    store, truth = cohort
    rows = np.arange(len(store.subjects))
    muscle = truth["muscle_area_cm2"].to_numpy()
    labels = (muscle > np.median(muscle)).astype(np.int64)
    split = data.split_subjects(rows, labels, val=0.2, test=0.3, seed=0)
    by_part = {k: labels[v] for k, v in split.items()}
    result = size_baseline(store, split, by_part, seed=0, n_boot=200)
    assert result["acc"] >= 0.85 and result["acc"] > result["baseline_acc"]
    assert result["auroc"] >= 0.9
    assert result["fit_on"] == "train+val" and result["unit"] == "cm2"
    assert np.array_equal(result["test_rows"], split["test"]) and result["test_probs"].shape == split["test"].shape
    assert result["coef"]["muscle_area"] > 0  # more muscle -> "high"


def test_size_baseline_imputes_missing_bmi(cohort):
    store, truth = cohort
    rows = np.arange(len(store.subjects))
    features = size_features(store, rows)
    features.loc[features.index[:3], "bmi"] = np.nan
    labels = (truth["muscle_area_cm2"].to_numpy() > truth["muscle_area_cm2"].median()).astype(int)
    model = fit_size_baseline(features, labels)
    assert np.isclose(model.named_steps["simpleimputer"].statistics_[0], np.nanmedian(features["bmi"]))
    assert np.isfinite(model.predict_proba(features.to_numpy(dtype=float))).all()
    with pytest.raises(ValueError, match="both classes"):
        fit_size_baseline(features, np.zeros(len(rows)))


def test_size_comparison_reports_accuracy_and_auroc_differences():
    from study.body_size import FEATURES, SIZE_MODEL_NAME, size_comparison

    assert "age" in FEATURES and SIZE_MODEL_NAME == "size+age"
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 120)
    cnn = np.clip(0.5 + (y - 0.5) * 0.5 + rng.normal(0, 0.2, 120), 0, 1)
    size = rng.random(120)
    out = size_comparison(y, cnn, size, n_boot=400)
    assert set(out) == {f"cnn_minus_size_age_{k}" for k in ("acc", "acc_ci_low", "acc_ci_high", "acc_p", "auroc",
                                                            "auroc_ci_low", "auroc_ci_high", "auroc_p")}
    assert out["cnn_minus_size_age_acc_ci_low"] > 0 and out["cnn_minus_size_age_auroc_ci_low"] > 0
    assert out["cnn_minus_size_age_acc_p"] < 0.001 and out["cnn_minus_size_age_auroc_p"] < 0.001
