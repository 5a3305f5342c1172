"""A lab's server for the session: MLflow with --auth on a real PostgreSQL, and a small study on it.

``lab_server`` is what ``python -m mlflow_server start --auth --backend-store-uri postgresql://...``
gives a lab; ``lab_study`` runs this project's own CLIs against it (synthetic DICOM → store →
launch → promote) the way a user would: no tracking URI or credentials passed, only the server
home in ``$THIGHMRI_MLFLOW_HOME``.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from mlflow_server import server

# One cohort, two measures: a launch with two cell runs of two trial runs each, 1 epoch.
STUDY_GRID = {
    "question": "Does a small study run on a lab's PostgreSQL-backed server with auth?",
    "name": "lab",
    "grid": {"cohort": ["oai"], "measure": ["leg_strength", "gait_speed_short"]},
    "search": {"lr": {"loguniform": [1.0e-3, 1.0e-2]}, "freeze": {"choice": ["none"]}},
    "trials_per_cell": 2,
    "optuna_startup_trials": 1,
    "min_subjects_per_cell": 20,
    "train": {"epochs": 1, "batch_size": 16, "optimizer": "adamw", "weights": "none", "slices_per_subject": 3},
    "split": {"val": 0.2, "test": 0.25, "seed": 0},
    "resources_per_trial": {"cpu": 1, "gpu": 0},
}
STUDY_MEASURE = "leg_strength"  # the one promote registers: model thigh-leg_strength
# Variables the project's commands read or set; cleared around a command so that one test's
# launch (which exports MLFLOW_TRACKING_URI for its Ray workers) cannot steer the next.
CLIENT_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
              "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", server.HOME_ENV)


@contextmanager
def as_lab_user(home: Path):
    """The environment of a lab member whose commands find the server by its home, and nothing else."""
    with pytest.MonkeyPatch.context() as mp:
        for key in CLIENT_ENV:
            mp.delenv(key, raising=False)
        mp.setenv(server.HOME_ENV, str(home))
        yield mp


@pytest.fixture(scope="session")
def lab_server(postgres, tmp_path_factory) -> server.ServerInfo:
    """``start --auth --backend-store-uri postgresql://mlflow@127.0.0.1:PORT/mlflow`` in a temp home.

    The role's password is in ``$PGPASSWORD`` only while the server starts; it is in no URI.
    """
    home = tmp_path_factory.mktemp("lab_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PGPASSWORD", postgres.password)
        info = server.start(home, port=server.free_port(), timeout=120, auth_on=True,
                            backend_store_uri=postgres.uri)
    try:
        yield info
    finally:
        server.stop(home)


def run_small_study(root: Path, ray_dir: Path) -> dict:
    """Synthetic cohort → store → ``launch.py`` → ``promote.py``, with the CLIs' own defaults for
    the tracking server (the caller's environment names its home). Returns the paths made."""
    from data_prep.build_store import main as build_main
    from data_prep.synth import generate_cohort
    from study.launch import main as launch_main
    from study.promote import main as promote_main

    cohort = root / "cohort"
    generate_cohort(cohort, subjects=44, seed=5, matrix=(64, 128))
    salt = root / "salt"
    salt.write_text("lab-test-salt-0123456789abcdef\n")
    store = root / "store.zarr"
    assert build_main(["--dicom", str(cohort / "oai" / "dicom"), "--tables", str(cohort / "oai" / "tables"),
                       "--cohort", "oai", "--out", str(store), "--size", "32x64", "--salt-file", str(salt)]) in (0, None)
    grid = root / "lab.yaml"
    grid.write_text(yaml.safe_dump({**STUDY_GRID, "store": str(store)}))
    results = root / "cells.csv"
    assert launch_main(["--grid", str(grid), "--num-cpus", "2", "--storage-path", str(ray_dir),
                        "--results", str(results)]) == 0
    assert promote_main(["--measure", STUDY_MEASURE, "--experiment", STUDY_GRID["name"]]) == 0
    return {"cohort": cohort, "store": store, "results": results, "root": root}


@pytest.fixture(scope="session")
def lab_study(lab_server, tmp_path_factory) -> dict:
    """A small study (2 cells x 2 trials, 1 epoch) launched and promoted on ``lab_server``."""
    ray_dir = Path(tempfile.mkdtemp(prefix="tm", dir="/tmp"))  # Ray's socket paths stay short
    try:
        with as_lab_user(lab_server.home):
            study = run_small_study(tmp_path_factory.mktemp("lab_study"), ray_dir)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    return {**study, "server": lab_server}

