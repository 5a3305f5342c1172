"""Helpers shared by the tests of mlflow_server: REST calls as any local user, the auth check,
and the small study run on a lab's server (``conftest.py`` holds the fixtures)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from base64 import b64encode
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from mlflow_server import auth, server

# The smallest study with every level of the run hierarchy: a launch run, one cell run, two trial
# runs (1 epoch each); the cell's model is what promote registers.
STUDY_GRID = {
    "question": "Does a small study run on a lab's PostgreSQL-backed server with auth?",
    "name": "lab",
    "grid": {"cohort": ["oai"], "measure": ["leg_strength"]},
    "search": {"lr": {"loguniform": [1.0e-3, 1.0e-2]}, "freeze": {"choice": ["none"]}},
    "trials_per_cell": 2,
    "optuna_startup_trials": 1,
    "min_subjects_per_cell": 20,
    "min_test_per_class": 1,  # a few test subjects: a pipeline check, not a result (default 9 would refuse it)
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
    """The environment of a lab member whose commands find the server by its home, and nothing else.

    Also restores MLflow's process-wide tracking URI, which promote.py and predict.py set
    (``mlflow.set_tracking_uri``) and which would otherwise send later tests' ``models:/``
    look-ups to this server.
    """
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = tracking_utils._tracking_uri  # no public getter tells "unset" from the default
    with pytest.MonkeyPatch.context() as mp:
        for key in CLIENT_ENV:
            mp.delenv(key, raising=False)
        mp.setenv(server.HOME_ENV, str(home))
        try:
            yield mp
        finally:
            import mlflow

            mlflow.set_tracking_uri(saved)


def rest(url: str, path: str, body: dict | None = None, user: str | None = None, password: str | None = None) -> int:
    """HTTP status of a REST call (POST with a JSON ``body``, else GET), as any local user could send it."""
    request = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    if user is not None:
        request.add_header("Authorization", "Basic " + b64encode(f"{user}:{password}".encode()).decode())
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def assert_anonymous_refused_admin_accepted(info: server.ServerInfo) -> str:
    """The Done-when check on any --auth server; returns the experiment the admin created."""
    name = f"auth-{uuid.uuid4().hex[:8]}"
    create = "/api/2.0/mlflow/experiments/create"
    creds = auth.read_credentials(info.home)
    assert rest(info.url, create, {"name": name}) == 401, "an anonymous write was not refused"
    assert rest(info.url, create, {"name": name}, creds.username, "not-the-password") == 401
    assert rest(info.url, "/api/2.0/mlflow/experiments/search?max_results=5") == 401  # nor may it read
    assert rest(info.url, "/api/2.0/mlflow/registered-models/alias", {"name": "thigh-leg_strength", "alias": "champion",
                                                                      "version": "1"}) == 401
    assert rest(info.url, create, {"name": name}, creds.username, creds.password) == 200
    assert rest(info.url, "/health") == 200  # health checks stay open
    return name


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
    # two recorded steps: the pooled cell's model becomes the candidate (version 1 of a fresh
    # registry), then the champion; 44 synthetic subjects rarely beat the baseline: --force
    assert promote_main(["--measure", STUDY_MEASURE, "--experiment", STUDY_GRID["name"], "--store", str(store)]) == 0
    assert promote_main(["--measure", STUDY_MEASURE, "--to", "champion", "1", "--force",
                         "--reason", "lab server test"]) == 0
    return {"cohort": cohort, "store": store, "results": results, "root": root}
