"""Shared by the pyfunc and predict tests: a tiny synthetic cohort, a logged + registered model."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
import torch

ORIENTATION = "1.000,0.000,0.000,0.000,1.000,0.000"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from data_prep.synth import generate_cohort

    root = tmp_path_factory.mktemp("pyfunc")
    generate_cohort(root / "cohort", subjects=2, seed=1, matrix=(64, 128))
    return root / "cohort"


def _oai_visits(cohort: Path) -> list[Path]:
    """Each OAI participant's T1 series folder (its localizer may lie in another batch)."""
    return sorted(p.parent for p in (cohort / "oai" / "dicom").rglob("001")
                  if pydicom.dcmread(p, stop_before_pixels=True).SeriesDescription == "AX_T1_THIGH")


def _altered_copy(src: Path, dst: Path, **changes) -> Path:
    """A copy of a series folder with header values changed (another protocol)."""
    dst.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(sorted(p for p in src.rglob("*") if p.is_file())):
        ds = pydicom.dcmread(path)
        for key, value in changes.items():
            setattr(ds, key, value)
        ds.save_as(dst / f"{i:03d}.dcm")
    return dst


def _config(**overrides) -> dict:
    from data_prep.preprocess import Recipe

    config = {
        "format": 1, "classes": ["low", "high"], "threshold": 0.5, "measure": "leg_strength",
        "cell": "oai__leg_strength__sex-all__bmi-all", "store_hash": "0" * 64,
        "recipe": Recipe(size=(32, 64)).to_dict(), "series_description": ["^AX_T1_THIGH$"],
        "slices_per_subject": 3, "input_size": None,
        "acquisition": {"numeric": {"acq_rows": {"min": 64.0, "max": 64.0},
                                    "acq_pixel_spacing_row_mm": {"min": 3.9, "max": 3.91}},
                        "categorical": {"acq_orientation": [ORIENTATION]},
                        "n_training": 10, "n_recorded": 10},
        "stratum": {"sex": "all", "bmi": None, "bmi_label": "all"},
        "majority": {"class": "low", "fraction": 0.6, "n_train": 10, "n_train_high": 4},
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def logged(cohort, tmp_path_factory):
    """A model logged and registered on a local SQLite tracking store; its loaded pyfunc."""
    import mlflow

    from study.model import build_model
    from study.model_package import log_pyfunc

    root = tmp_path_factory.mktemp("tracking")
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=mlflow.MlflowClient(uri).create_experiment(
        "pyfunc-test", artifact_location=str(root / "artifacts")))
    torch.manual_seed(0)
    with mlflow.start_run():
        info = log_pyfunc(build_model(weights="none").eval(), _config())
    version = mlflow.register_model(info.model_uri, "thigh-test")
    mlflow.MlflowClient(uri).set_registered_model_alias("thigh-test", "champion", version.version)
    yield {"uri": uri, "model_uri": info.model_uri, "model": mlflow.pyfunc.load_model(info.model_uri)}
    mlflow.set_tracking_uri(None)
