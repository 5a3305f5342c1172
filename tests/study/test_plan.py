"""Cell planning: one split per cohort, cells as subsets, thresholds, refusals, nested CV."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from study.config import GridError, parse_grid
from study.data import stratum_rows
from study.plan import PlanError, plan_cells
from study.splits import split_cohort


def _store(n=800, seed=0):
    rng = np.random.default_rng(seed)
    sex = rng.choice(["male", "female"], n)
    subjects = pd.DataFrame({
        "subject_id": [f"{i:016x}" for i in rng.permutation(n)],
        "cohort": np.where(np.arange(n) < n * 3 // 4, "oai", "somma"),
        "sex": sex,
        "age": rng.integers(45, 80, n).astype(float),
        "bmi": rng.normal(28, 5, n),
        "leg_strength": rng.normal(400, 80, n) + np.where(sex == "male", 100, 0),
        "chair_stand": np.where(rng.random(n) < 0.1, np.nan, rng.normal(12, 3, n)),
        "slice_start": np.arange(n) * 15, "slice_count": 15,
    })
    return SimpleNamespace(subjects=subjects, measures={"leg_strength": {"direction": "higher"},
                                                        "chair_stand": {"direction": "lower"}})


def _grid(**over):
    raw = {"question": "q", "store": "s.zarr", "search": {"lr": {"loguniform": [1e-4, 1e-2]}},
           "grid": {"cohort": ["oai"], "measure": ["leg_strength", "chair_stand"], "sex": ["all", "female"],
                    "bmi": ["all", "25-30"]},
           "split": {"val": 0.2, "test": 0.25, "seed": 3}, "min_test_per_class": 5, **over}
    return parse_grid(raw)


def _by(plans, **axes):
    return next(p for p in plans if all(getattr(p.cell, k) == v for k, v in axes.items()))


def test_cells_are_subsets_of_one_cohort_split():
    store = _store()
    plans = plan_cells(_grid(), store)
    assert len(plans) == 8
    cohort = split_cohort(store.subjects, "oai", val=0.2, test=0.25, seed=3)
    # every cell's partition p = the cohort's partition p intersected with the cell's subjects
    for plan in plans:
        rows = stratum_rows(store.subjects, cohort="oai", measure=plan.cell.measure, sex=plan.cell.sex,
                            bmi=plan.cell.bmi)
        for part in ("train", "val", "test"):
            assert np.array_equal(plan.split[part], np.intersect1d(rows, cohort.rows_in(part))), (plan.cell, part)
    # a stratum's test subjects are a subset of the pooled cell's: the pooled model can score them
    for plan in plans:
        same_measure_pooled = _by(plans, measure=plan.cell.measure, sex="all", bmi="all")
        assert set(plan.split["test"].tolist()) <= set(same_measure_pooled.split["test"].tolist())
    # two measures' cells share the test subjects who have both measures
    pooled = _by(plans, measure="leg_strength", sex="all", bmi="all")
    chair = _by(plans, measure="chair_stand", sex="all", bmi="all")
    has_chair = set(stratum_rows(store.subjects, cohort="oai", measure="chair_stand").tolist())
    assert set(chair.split["test"].tolist()) == set(pooled.split["test"].tolist()) & has_chair


def test_threshold_cohort_is_one_number_per_cohort_and_measure():
    store = _store()
    plans = plan_cells(_grid(threshold="cohort"), store)
    values = store.subjects["leg_strength"].to_numpy()
    pooled = _by(plans, measure="leg_strength", sex="all", bmi="all")
    expected = np.median(values[pooled.split["train"]])  # the cohort's training subjects
    for plan in (p for p in plans if p.cell.measure == "leg_strength"):
        assert plan.threshold == expected, plan.cell.name
        for part in ("train", "val", "test"):
            assert np.array_equal(plan.labels[part], (values[plan.split[part]] > expected).astype(int))
    chair = {p.threshold for p in plans if p.cell.measure == "chair_stand"}
    assert len(chair) == 1
    # the female stratum is not labelled by its own median: its classes are unbalanced
    female = _by(plans, measure="leg_strength", sex="female", bmi="all")
    assert female.labels["train"].mean() < 0.35
    assert "training subjects of cohort oai" in female.threshold_rule


def test_threshold_stratum_uses_the_strata_own_training_subjects():
    store = _store()
    plans = plan_cells(_grid(threshold="stratum"), store)
    values = store.subjects["leg_strength"].to_numpy()
    female = _by(plans, measure="leg_strength", sex="female", bmi="all")
    assert female.threshold == pytest.approx(np.median(values[female.split["train"]]))
    assert abs(female.labels["train"].mean() - 0.5) < 0.02
    assert "stratum sex=female" in female.threshold_rule


def test_lower_is_better_measure_flips_labels():
    store = _store()
    plans = plan_cells(_grid(), store)
    chair = _by(plans, measure="chair_stand", sex="all", bmi="all")
    values = store.subjects["chair_stand"].to_numpy()
    assert np.array_equal(chair.labels["test"], (values[chair.split["test"]] < chair.threshold).astype(int))


def test_threshold_fit_all_only_for_seed_replication_or_when_allowed():
    with pytest.raises(GridError, match="threshold_fit: all labels test subjects"):
        _grid(threshold_fit="all")
    store = _store()
    plans = plan_cells(_grid(threshold_fit="all", allow_threshold_fit_all=True), store)
    values = store.subjects["leg_strength"].to_numpy()
    oai = stratum_rows(store.subjects, cohort="oai", measure="leg_strength")
    assert _by(plans, measure="leg_strength", sex="female").threshold == pytest.approx(np.median(values[oai]))
    seed = parse_grid({"question": "q", "store": "s", "search": {"lr": {"choice": [1e-4]}}, "protocol": "seed_replication",
                       "threshold_fit": "all", "grid": {"cohort": ["oai"], "measure": ["leg_strength"]},
                       "split": {"val": 0.1, "test": 0}})
    assert seed.threshold_fit == "all"


def test_median_ties_are_counted_and_labelled_low():
    store = _store()
    s = store.subjects
    oai = np.flatnonzero(s["cohort"] == "oai")
    s.loc[oai[:120], "leg_strength"] = 450.0  # 120 subjects on one value: the median lands on it
    plans = plan_cells(_grid(grid={"cohort": ["oai"], "measure": ["leg_strength"]}), store)
    (plan,) = plans
    assert plan.threshold == 450.0
    assert plan.n_ties == 120
    counts = plan.counts()
    assert counts["n_ties"] == 120 and counts["high_fraction"] < 0.45  # ties are low: fewer highs than lows
    assert all(plan.labels[p][s["leg_strength"].to_numpy()[plan.split[p]] == 450.0].max() == 0 for p in plan.split)
    meta = plan.model_metadata()
    assert meta["train_majority"] == "low" and meta["n_ties"] == 120


def test_split_is_deterministic_and_ignores_row_order_and_other_cohorts():
    store = _store()
    grid = _grid(grid={"cohort": ["oai"], "measure": ["leg_strength"]})
    (a,) = plan_cells(grid, store)
    (b,) = plan_cells(grid, store)
    assert all(np.array_equal(a.split[p], b.split[p]) for p in a.split)
    both = _grid(grid={"cohort": ["oai", "somma"], "measure": ["leg_strength"]}, min_test_per_class=3)
    c = next(p for p in plan_cells(both, store) if p.cell.cohort == "oai")
    assert all(np.array_equal(a.split[p], c.split[p]) for p in a.split)
    shuffled = SimpleNamespace(subjects=store.subjects.sample(frac=1, random_state=1).reset_index(drop=True),
                               measures=store.measures)
    (d,) = plan_cells(grid, shuffled)
    ids = store.subjects["subject_id"].to_numpy()
    ids_d = shuffled.subjects["subject_id"].to_numpy()
    assert all(set(ids[a.split[p]]) == set(ids_d[d.split[p]]) for p in a.split)
    (e,) = plan_cells(_grid(grid={"cohort": ["oai"], "measure": ["leg_strength"]}, split={"val": 0.2, "test": 0.25, "seed": 4}),
                      store)
    assert not np.array_equal(a.split["test"], e.split["test"])


def test_dealing_balances_every_sex_bmi_stratum_to_one_subject():
    store = _store(n=1200)
    plans = plan_cells(_grid(grid={"cohort": ["oai"], "measure": ["leg_strength"], "sex": ["male", "female"],
                                   "bmi": ["<25", "25-30", ">=30"]}, min_test_per_class=3), store)
    for plan in plans:
        n = plan.n
        assert abs(len(plan.split["test"]) - 0.25 * n) <= 1.0, plan.cell.name
        assert abs(len(plan.split["val"]) - 0.2 * n) <= 2.0, plan.cell.name


def test_one_person_under_two_rows_lands_in_one_partition():
    store = _store()
    s = store.subjects
    s.loc[1, "subject_id"] = s.loc[0, "subject_id"]
    (plan,) = plan_cells(_grid(grid={"cohort": ["oai"], "measure": ["leg_strength"]}), store)
    where = [p for p in plan.split if 0 in plan.split[p] or 1 in plan.split[p]]
    assert len(where) == 1


def test_too_few_test_subjects_per_class_refused_with_counts_or_nested():
    store = _store(n=300)
    grid = _grid(grid={"cohort": ["oai"], "measure": ["leg_strength"], "sex": ["all", "female"], "bmi": ["<25"]},
                 min_test_per_class=9)
    with pytest.raises(PlanError) as exc:
        plan_cells(grid, store)
    msg = str(exc.value)
    assert "test subjects" in msg and "low /" in msg and "min_test_per_class is 9" in msg
    nested = _grid(grid={"cohort": ["oai"], "measure": ["leg_strength"], "sex": ["all"], "bmi": ["<25"]},
                   min_test_per_class=9, small_cells="nested_cv", split={"val": 0.2, "test": 0.25, "folds": 3, "seed": 3})
    (plan,) = plan_cells(nested, store)
    assert plan.protocol == "nested_cv" and len(plan.outer_folds) == 5
    assert plan.counts()["n_tested"] == plan.n


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


def test_nested_cv_tests_every_subject_once_with_inner_folds():
    store = _store(n=400)
    grid = _grid(protocol="nested_cv", split={"test": 0.2, "folds": 4, "outer_folds": 5, "seed": 1},
                 grid={"cohort": ["oai"], "measure": ["leg_strength"], "sex": ["all", "female"]})
    plans = plan_cells(grid, store)
    for plan in plans:
        assert len(plan.outer_folds) == 5
        tested = np.concatenate([f.split["test"] for f in plan.outer_folds])
        assert np.array_equal(np.sort(tested), np.sort(np.unique(tested)))  # nobody twice
        assert tested.size == plan.n
        for fold in plan.outer_folds:
            inner = [fold.split[f"fold{i}"] for i in range(4)]
            assert np.array_equal(np.sort(np.concatenate(inner)), fold.split["train"])
            assert not set(fold.split["train"].tolist()) & set(fold.split["test"].tolist())
            assert all(0 < fold.labels[f"fold{i}"].mean() < 1 for i in range(4))
            values = store.subjects["leg_strength"].to_numpy()
            if plan.cell.sex == "all":  # threshold: cohort, from this fold's training subjects
                assert fold.threshold == np.median(values[fold.split["train"]])
        # legacy view for today's search.py: outer fold 0 as one holdout, empty val
        assert np.array_equal(plan.split["test"], plan.outer_folds[0].split["test"])
        assert plan.split["val"].size == 0 and plan.counts()["n_train"] + plan.counts()["n_test"] == plan.n
    pooled, female = plans
    for fp, ff in zip(pooled.outer_folds, female.outer_folds):  # folds are the cohort's: strata nest
        assert set(ff.split["test"].tolist()) <= set(fp.split["test"].tolist())
        assert fp.threshold == ff.threshold


def test_nested_cv_fold0_is_holdouts_test_set_when_test_is_one_over_k():
    store = _store(n=400)
    base = {"grid": {"cohort": ["oai"], "measure": ["leg_strength"]}}
    (holdout,) = plan_cells(_grid(**base, split={"val": 0.2, "test": 0.2, "seed": 5}), store)
    (nested,) = plan_cells(_grid(**base, protocol="nested_cv", split={"test": 0.2, "outer_folds": 5, "folds": 3,
                                                                     "seed": 5}), store)
    assert np.array_equal(holdout.split["test"], nested.outer_folds[0].split["test"])


def test_nested_cv_rejects_asha_and_single_fold():
    with pytest.raises(Exception) as exc:
        _grid(protocol="nested_cv", scheduler="asha", split={"test": 0.2, "folds": 1, "outer_folds": 1})
    assert "split.folds" in str(exc.value) and "scheduler" in str(exc.value) and "split.outer_folds" in str(exc.value)


def test_more_slices_per_subject_than_subjects_have_is_refused():
    store = _store()
    grid = _grid(train={"slices_per_subject": 99})
    with pytest.raises(PlanError) as exc:
        plan_cells(grid, store)
    assert "train.slices_per_subject: 99" in str(exc.value) and "fewest:" in str(exc.value)
