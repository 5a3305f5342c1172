"""study.splits: systematic dealing of a cohort's subjects."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from study.splits import bmi_group, inner_folds, split_cohort, systematic_pick


def test_systematic_pick_takes_every_kth_from_a_random_start():
    for start in (0, 1 << 19, 3 * (1 << 20) - 1):
        mask = systematic_pick(100, 1 / 3, start)
        assert mask.sum() in (33, 34)
        gaps = np.diff(np.flatnonzero(mask))
        assert set(gaps.tolist()) <= {3}  # evenly spread: every block of 3 holds one
    assert systematic_pick(20, 0.15, 0).sum() == 3
    assert not systematic_pick(10, 0, 0).any() and systematic_pick(10, 1, 0).all()


def test_bmi_groups_match_the_grid_strata():
    assert bmi_group(np.array([18.0, 24.99, 25.0, 29.9, 30.0, np.nan])).tolist() == [
        "<25", "<25", "25-30", "25-30", ">=30", "missing"]


def _subjects(n=97, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"subject_id": [f"s{i:04d}" for i in range(n)], "cohort": "oai",
                         "sex": rng.choice(["male", "female", None], n, p=[0.45, 0.45, 0.1]),
                         "bmi": np.where(rng.random(n) < 0.1, np.nan, rng.normal(28, 5, n))})


def test_tiny_strata_still_split_without_fallback():
    s = _subjects()
    cs = split_cohort(s, "oai", val=0.2, test=0.2, seed=0)
    # sex x BMI strata of one or two subjects exist; every stratum still gets its share to +-1
    key = s["sex"].astype(str) + "|" + bmi_group(s["bmi"].to_numpy())
    for k, members in key.groupby(key).groups.items():
        n_test = np.isin(members.to_numpy(), cs.rows_in("test")).sum()
        assert abs(n_test - 0.2 * len(members)) <= 1, k
    assert sorted(np.concatenate([cs.rows_in(p) for p in ("train", "val", "test")]).tolist()) == list(range(97))


def test_seed_replication_has_no_test_and_folds_partition_everyone():
    cs = split_cohort(_subjects(), "oai", val=0.1, test=0.0, seed=2, outer_folds=4)
    assert cs.rows_in("test").size == 0 and cs.rows_in("val").size in (9, 10)
    sizes = [cs.fold_rows(k).size for k in range(4)]
    assert sum(sizes) == 97 and max(sizes) - min(sizes) <= 1


def test_bad_arguments_are_named():
    with pytest.raises(ValueError) as exc:
        split_cohort(_subjects(), "ukb", val=0.6, test=0.5, seed=0, outer_folds=1)
    msg = str(exc.value)
    assert "test must be" not in msg and "val + test < 1" in msg and "outer_folds" in msg and "'ukb'" in msg


def test_inner_folds_keep_both_classes_or_refuse():
    rows = np.arange(20)
    labels = np.r_[np.zeros(12, int), np.ones(8, int)]
    folds = inner_folds(rows, labels, np.random.default_rng(0).permutation(20), 4)
    assert np.array_equal(np.sort(np.concatenate(folds)), rows)
    assert all(labels[f].sum() == 2 and (labels[f] == 0).sum() == 3 for f in folds)
    with pytest.raises(ValueError, match="cannot fill 5 inner folds"):
        inner_folds(rows[:8], np.r_[np.zeros(4, int), np.ones(4, int)], np.arange(8), 5)
