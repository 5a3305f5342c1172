"""Ingest records each subject's acquisition; packaging turns the training subjects' values
into the ranges, stratum and majority a registered model carries (study/model_package.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    from data_prep.build_store import main as build_main
    from data_prep.synth import generate_cohort

    root = tmp_path_factory.mktemp("packaging")
    generate_cohort(root / "cohort", subjects=6, seed=2, matrix=(64, 128))
    (root / "salt").write_text("packaging-test-salt-0123456789abcdef\n")
    out = root / "store.zarr"
    assert build_main(["--dicom", str(root / "cohort" / "oai" / "dicom"), "--tables",
                       str(root / "cohort" / "oai" / "tables"), "--cohort", "oai", "--out", str(out),
                       "--size", "32x64", "--salt-file", str(root / "salt")]) in (0, None)
    return out


def test_ingest_records_acquisition_per_pseudonym(store):
    from data_prep.dicom.acquisition import ACQUISITION_FIELDS
    from data_prep.store import open_store

    s = open_store(store)
    acq = s.attrs["cohorts"]["oai"]["acquisition"]
    assert acq["fields"] == list(ACQUISITION_FIELDS)
    assert set(acq["by_subject"]) == set(s.subjects["subject_id"])  # pseudonyms, every subject
    for values in acq["by_subject"].values():
        v = dict(zip(acq["fields"], values))
        assert (v["acq_rows"], v["acq_cols"]) == (64.0, 128.0)
        assert v["acq_repetition_time_ms"] == 600 and v["acq_echo_time_ms"] == 10
        assert v["acq_field_strength_t"] == 3 and v["acq_series_description"] == "AX_T1_THIGH"
        assert v["acq_orientation"] == "1.000,0.000,0.000,0.000,1.000,0.000"
        assert v["acq_pixel_spacing_row_mm"] == pytest.approx(250 / 64, rel=1e-3)


def test_model_config_holds_training_ranges_stratum_and_majority(store):
    from data_prep.store import open_store
    from study.model_package import model_config, pinned_requirements

    s = open_store(store)
    rows = np.arange(len(s.subjects))[:4]
    ctx = SimpleNamespace(
        labels={"train": np.array([0, 0, 0, 1])}, split={"train": rows},
        cell=SimpleNamespace(measure="leg_strength", name="oai__leg_strength__sex-female__bmi-lt25",
                             axes={"cohort": "oai", "measure": "leg_strength", "sex": "female", "bmi": "<25"}),
        direction="higher", threshold=1.0, threshold_rule="median", store_hash=s.content_hash)
    train = SimpleNamespace(slices_per_subject=3, input_size=(16, 32))
    config = model_config(ctx, s, train, {"best_val_acc": 0.7})
    assert config["recipe"] == s.recipe.to_dict() and config["series_description"] == ["^AX_T1_THIGH$"]
    acq = config["acquisition"]
    assert acq["n_training"] == acq["n_recorded"] == 4
    assert acq["numeric"]["acq_rows"] == {"min": 64.0, "max": 64.0}
    assert acq["categorical"]["acq_orientation"] == ["1.000,0.000,0.000,0.000,1.000,0.000"]
    assert config["stratum"] == {"sex": "female", "bmi": [None, 25.0], "bmi_label": "<25"}
    assert config["majority"] == {"class": "low", "fraction": 0.75, "n_train": 4, "n_train_high": 1}
    assert config["input_size"] == [16, 32] and config["store_hash"] == s.content_hash
    assert all("==" in r for r in pinned_requirements())
