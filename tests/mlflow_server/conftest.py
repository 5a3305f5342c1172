"""A lab's server for the session: MLflow with --auth on a real PostgreSQL, and a small study on it.

``lab_server`` is what ``python -m mlflow_server start --auth --backend-store-uri postgresql://...``
gives a lab; ``lab_study`` runs this project's own CLIs against it (synthetic DICOM → store →
launch → promote) the way a user would: no tracking URI or credentials passed, only the server
home in ``$THIGHMRI_MLFLOW_HOME``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from server_helpers import as_lab_user, run_small_study

from mlflow_server import server


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


@pytest.fixture(scope="session")
def lab_study(lab_server, tmp_path_factory) -> dict:
    """A small study (one cell, two trials, 1 epoch) launched and promoted on ``lab_server``."""
    ray_dir = Path(tempfile.mkdtemp(prefix="tm", dir="/tmp"))  # Ray's socket paths stay short
    try:
        with as_lab_user(lab_server.home):
            study = run_small_study(tmp_path_factory.mktemp("lab_study"), ray_dir)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    return {**study, "server": lab_server}

