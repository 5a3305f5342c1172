"""Tests for study.data: strata, labels, subject splits, leakage checks, tensors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from fakes import FakeStore

from study import data
from study.data import LeakageError


def make_subjects() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "subject_id": ["a", "b", "c", "d", "e", "f", "g", "h"],
            "cohort": ["oai", "oai", "oai", "oai", "oai", "somma", "somma", "somma"],
            "sex": ["male", "female", None, "male", "female", "male", "female", "female"],
            "age": [60.0] * 8,
            "bmi": [22.0, 25.0, 29.9, 30.0, np.nan, 24.9, 31.0, 27.0],
            "leg_strength": [300.0, 200.0, np.nan, 350.0, 150.0, 400.0, 250.0, 100.0],
            "gait_speed_short": [1.2] * 8,
            "gait_400m": [300.0] * 8,
            "chair_stand": [10.0] * 8,
            "exercise": [np.nan] * 8,
            "slice_start": np.arange(8) * 3,
            "slice_count": [3] * 8,
        }
    )


def test_stratum_rows_filters_cohort_sex_bmi_and_missing_measure():
    s = make_subjects()
    assert data.stratum_rows(s, cohort="all", measure="leg_strength").tolist() == [0, 1, 3, 4, 5, 6, 7]
    assert data.stratum_rows(s, cohort="oai", measure="leg_strength").tolist() == [0, 1, 3, 4]
    assert data.stratum_rows(s, cohort="all", measure="leg_strength", sex="female").tolist() == [1, 4, 6, 7]
    assert data.stratum_rows(s, cohort="all", measure="leg_strength", bmi="<25").tolist() == [0, 5]
    # 25 is inclusive in 25-30, 30 goes to >=30, NaN BMI (row 4) only in "all"
    assert data.stratum_rows(s, cohort="all", measure="leg_strength", bmi="25-30").tolist() == [1, 7]
    assert data.stratum_rows(s, cohort="all", measure="leg_strength", bmi=">=30").tolist() == [3, 6]
    assert data.stratum_rows(s, cohort="somma", measure="leg_strength", sex="male", bmi="<25").tolist() == [5]


def test_stratum_rows_reports_every_bad_value_with_allowed_ones():
    with pytest.raises(ValueError) as err:
        data.stratum_rows(make_subjects(), cohort="ukb", measure="grip", sex="M", bmi="obese")
    msg = str(err.value)
    for piece in ("'ukb'", "'oai'", "'grip'", "leg_strength", "'M'", "'female'", "'obese'", "'>=30'"):
        assert piece in msg


def test_threshold_and_label_direction():
    s = make_subjects()
    rows = data.stratum_rows(s, cohort="oai", measure="leg_strength")
    assert data.function_threshold(s, measure="leg_strength", rows=rows) == 250.0
    values = np.array([1.0, 2.0, 3.0, 2.0])
    assert data.high_function_labels(values, direction="higher", threshold=2.0).tolist() == [0, 0, 1, 0]
    # lower is better (400 m time): faster than the median is high function
    lower = data.high_function_labels(values, direction="lower", threshold=2.0)
    assert lower.tolist() == [1, 0, 0, 0] and lower.dtype == np.int64
    with pytest.raises(ValueError, match="'up'.*higher, lower"):
        data.high_function_labels(values, direction="up", threshold=2.0)


def test_threshold_refuses_missing_values():
    with pytest.raises(ValueError, match="missing"):
        data.function_threshold(make_subjects(), measure="leg_strength", rows=np.array([0, 2]))


def _labels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(n) % 2)


def test_split_is_disjoint_complete_stratified_and_deterministic():
    rows = np.arange(100, 300)
    labels = _labels(200)
    sex = np.where(np.random.default_rng(1).random(200) < 0.7, "male", "female")
    split = data.split_subjects(rows, labels, val=0.1, test=0.2, seed=3, strata=sex)
    sizes = {k: v.size for k, v in split.items()}
    assert sizes == {"train": 140, "val": 20, "test": 40}
    assert np.array_equal(np.sort(np.concatenate(list(split.values()))), rows)
    combo = pd.Series([f"{l}|{s}" for l, s in zip(labels, sex)], index=rows)
    share = combo.value_counts(normalize=True)
    for part in ("val", "test"):
        counts = combo[split[part]].value_counts().reindex(share.index, fill_value=0)
        expected = share * split[part].size
        assert (counts - expected).abs().max() <= 1.0, (part, counts, expected)
    again = data.split_subjects(rows, labels, val=0.1, test=0.2, seed=3, strata=sex)
    other = data.split_subjects(rows, labels, val=0.1, test=0.2, seed=4, strata=sex)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    assert not np.array_equal(split["test"], other["test"])


def test_split_falls_back_when_a_stratum_is_tiny():
    rows, labels = np.arange(20), _labels(20)
    strata = np.array(["male"] * 19 + ["female"])
    with pytest.warns(UserWarning, match="stratified by label"):
        split = data.split_subjects(rows, labels, val=0.2, test=0.2, seed=0, strata=strata)
    assert [np.mean(labels[split[k]]) for k in ("val", "test")] == [0.5, 0.5]


def test_split_too_small_or_bad_fraction():
    with pytest.raises(ValueError, match="n=3 subjects is too small"):
        data.split_subjects(np.arange(3), np.array([0, 1, 0]), val=0.5, test=0.5, seed=0)
    with pytest.raises(ValueError, match="val must be in"):
        data.split_subjects(np.arange(10), _labels(10), val=0.0, test=0.1, seed=0)
    split = data.split_subjects(np.arange(10), _labels(10), val=0.2, test=0.0, seed=0)
    assert split["test"].size == 0 and split["val"].size == 2


def test_check_disjoint_catches_leaky_split():
    leaky = {"train": np.array([0, 1, 2, 3]), "val": np.array([3, 4]), "test": np.array([5, 1])}
    with pytest.raises(LeakageError, match=r"1 rows in both 'train' and 'val'.*1 rows in both 'train' and 'test'"):
        data.check_disjoint(leaky)
    # same person under two store rows: only the subject ids reveal it
    ids = np.array(["p0", "p1", "p2", "p1"])
    with pytest.raises(LeakageError, match="1 subject ids in both 'train' and 'test'"):
        data.check_disjoint({"train": np.array([0, 1]), "test": np.array([2, 3])}, ids)
    data.check_disjoint({"train": np.array([0, 1]), "test": np.array([2])}, ids)
    assert issubclass(LeakageError, ValueError)


def test_to_model_input_range_shape_and_resize():
    imgs = np.array([[[0, 65535], [32768, 65535]]], dtype=np.uint16)
    x = data.to_model_input(imgs)
    assert x.shape == (1, 1, 2, 2) and x.dtype == torch.float32
    assert x.min() == 0.0 and x.max() == 1.0 and abs(float(x[0, 0, 1, 0]) - 32768 / 65535) < 1e-7
    big = np.random.default_rng(0).integers(0, 65536, size=(3, 64, 128), dtype=np.uint16)
    y = data.to_model_input(big, (32, 64))
    assert y.shape == (3, 1, 32, 64) and 0.0 <= float(y.min()) and float(y.max()) <= 1.0
    assert abs(float(y.mean()) - big.mean() / 65535) < 1e-3
    with pytest.raises(ValueError, match="float32"):
        data.to_model_input(big.astype(np.float32))


def test_central_slices():
    assert data.central_slices(15, 5).tolist() == [5, 6, 7, 8, 9]
    assert data.central_slices(15, 15).tolist() == list(range(15))
    assert data.central_slices(4, None).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="central 16 of 15"):
        data.central_slices(15, 16)


def test_slice_dataset_reads_each_subjects_block():
    subjects = make_subjects()
    n = len(subjects)
    # slice k of subject i has the constant value 1000 * i + k
    images = np.stack([np.full((4, 8), 1000 * i + k, np.uint16) for i in range(n) for k in range(3)])
    store = FakeStore(images=images, subjects=subjects)
    ds = data.SliceDataset(store, np.array([5, 1]), np.array([1, 0]), slices_per_subject=1)
    assert len(ds) == 2
    x, label, row = ds[0]
    assert x.shape == (1, 4, 8) and x.dtype == torch.float32
    assert label.dtype == torch.int64 and int(label) == 1 and int(row) == 5
    assert float(x[0, 0, 0]) * 65535 == pytest.approx(5001, abs=1e-2)
    full = data.SliceDataset(store, np.array([2]), np.array([0]), input_size=(2, 4))
    assert len(full) == 3 and full[2][0].shape == (1, 2, 4)
    assert [round(float(full[k][0].mean()) * 65535) for k in range(3)] == [2000, 2001, 2002]


def test_measure_directions_prefers_store_then_fallback():
    subjects = make_subjects()
    assert data.measure_directions(FakeStore(np.zeros((1, 1, 1), np.uint16), subjects)) == data.MEASURE_DIRECTIONS
    store = FakeStore(np.zeros((1, 1, 1), np.uint16), subjects, measures={"exercise": {"direction": "higher"}})
    assert data.measure_directions(store) == {"exercise": "higher"}
