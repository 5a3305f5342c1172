"""Cell planning: thresholds, labels and subject-level splits decided before Ray starts."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from study.config import parse_grid
from study.plan import PlanError, plan_cells


def _store(n=200, seed=0):
    rng = np.random.default_rng(seed)
    sex = rng.choice(["male", "female"], n)
    subjects = pd.DataFrame({
        "subject_id": [f"{i:016x}" for i in range(n)],
        "cohort": np.where(np.arange(n) < n * 3 // 4, "oai", "somma"),
        "sex": sex,
        "bmi": rng.normal(28, 5, n),
        "leg_strength": rng.normal(400, 80, n) + np.where(sex == "male", 100, 0),
        "chair_stand": rng.normal(12, 3, n),
        "slice_start": np.arange(n) * 15, "slice_count": 15,
    })
    return SimpleNamespace(subjects=subjects, measures={"leg_strength": {"direction": "higher"},
                                                        "chair_stand": {"direction": "lower"}})


def _grid(**over):
    raw = {"question": "q", "store": "s.zarr", "search": {"lr": {"loguniform": [1e-4, 1e-2]}},
           "grid": {"cohort": ["oai"], "measure": ["leg_strength", "chair_stand"], "sex": ["all", "female"]},
           "split": {"val": 0.2, "test": 0.2, "seed": 3}, **over}
    return parse_grid(raw)


def test_splits_are_subject_disjoint_and_cover_the_stratum():
    store = _store()
    for plan in plan_cells(_grid(), store):
        parts = [set(plan.split[p].tolist()) for p in ("train", "val", "test")]
        assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
        sub = store.subjects.loc[np.concatenate(list(plan.split.values()))]
        assert (sub["cohort"] == "oai").all()
        if plan.cell.sex == "female":
            assert (sub["sex"] == "female").all()


def test_threshold_fit_on_training_subjects_only():
    store = _store()
    plans = plan_cells(_grid(threshold="stratum", threshold_fit="train"), store)
    plan = next(p for p in plans if p.cell.measure == "leg_strength" and p.cell.sex == "all")
    values = store.subjects["leg_strength"].to_numpy()
    assert plan.threshold == pytest.approx(np.median(values[plan.split["train"]]))
    assert plan.threshold != pytest.approx(np.median(values[np.concatenate(list(plan.split.values()))]))
    # labels follow the recorded threshold in the measure's direction
    assert np.array_equal(plan.labels["test"], (values[plan.split["test"]] > plan.threshold).astype(int))
    assert "training subjects" in plan.threshold_rule


def test_lower_is_better_measure_flips_labels_and_cohort_threshold_is_shared():
    store = _store()
    plans = plan_cells(_grid(threshold="cohort", threshold_fit="all"), store)
    chair = [p for p in plans if p.cell.measure == "chair_stand"]
    values = store.subjects["chair_stand"].to_numpy()
    oai_median = np.median(values[(store.subjects["cohort"] == "oai").to_numpy()])
    for plan in chair:  # the female cell uses the whole cohort's median, as the seed did
        assert plan.threshold == pytest.approx(oai_median)
        assert np.array_equal(plan.labels["train"], (values[plan.split["train"]] < oai_median).astype(int))


def test_every_problem_listed_before_any_compute():
    store = _store(n=60)
    grid = _grid(grid={"cohort": ["oai", "ukb"], "measure": ["leg_strength"]})
    with pytest.raises(PlanError) as exc:
        plan_cells(grid, store)
    assert "'ukb' is not in the store" in str(exc.value) and "oai, somma" in str(exc.value)
    small = _grid(grid={"cohort": ["somma"], "measure": ["leg_strength"], "sex": ["male", "female"]},
                  min_subjects_per_cell=30)
    with pytest.raises(PlanError) as exc:
        plan_cells(small, store)
    assert "2 cell(s) cannot run" in str(exc.value) and "min_subjects_per_cell is 30" in str(exc.value)


def test_nested_cv_folds_partition_the_non_test_subjects():
    store = _store(n=150)
    grid = _grid(protocol="nested_cv", split={"test": 0.2, "folds": 4, "seed": 1},
                 grid={"cohort": ["oai"], "measure": ["leg_strength"]})
    (plan,) = plan_cells(grid, store)
    folds = [plan.split[f"fold{i}"] for i in range(4)]
    assert np.array_equal(np.sort(np.concatenate(folds)), np.sort(plan.split["train"]))
    assert not set(plan.split["train"].tolist()) & set(plan.split["test"].tolist())
    assert all(abs(len(f) - len(plan.split["train"]) / 4) <= 1 for f in folds)
    assert all(0 < plan.labels[f"fold{i}"].mean() < 1 for i in range(4))  # both classes in every fold
    assert plan.counts()["n"] == 112  # oai subjects, each counted once
    assert plan.counts()["n_train"] + plan.counts()["n_test"] == plan.counts()["n"]


def test_nested_cv_rejects_asha_and_single_fold():
    with pytest.raises(Exception) as exc:
        _grid(protocol="nested_cv", scheduler="asha", split={"test": 0.2, "folds": 1})
    assert "split.folds" in str(exc.value) and "scheduler" in str(exc.value)


def test_more_slices_per_subject_than_subjects_have_is_refused():
    store = _store()
    grid = _grid(train={"slices_per_subject": 99})
    with pytest.raises(PlanError) as exc:
        plan_cells(grid, store)
    assert "train.slices_per_subject: 99" in str(exc.value) and "fewest:" in str(exc.value)
