"""Shared fixtures: a real MLflow tracking server for the session, and short temp dirs for Ray.

Tests that log to the server set ``MLFLOW_TRACKING_URI`` themselves (``monkeypatch.setenv``);
nothing here sets it globally.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from mlflow_server import server


@pytest.fixture(scope="session", autouse=True)
def feature_cache_dir(tmp_path_factory):
    """Frozen-feature cache in a temp dir, so tests never write into the repo's runs/."""
    import os

    path = tmp_path_factory.mktemp("feature_cache")
    old = os.environ.get("THIGHMRI_FEATURE_CACHE")
    os.environ["THIGHMRI_FEATURE_CACHE"] = str(path)  # also inherited by Ray workers started later
    yield path
    if old is None:
        os.environ.pop("THIGHMRI_FEATURE_CACHE", None)
    else:
        os.environ["THIGHMRI_FEATURE_CACHE"] = old


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> server.ServerInfo:
    """A real tracking server (SQLite + proxied artifacts) in a temp home on a free port.

    Yields its :class:`mlflow_server.server.ServerInfo`; ``.url`` is the tracking URI.
    Stopped (whole process group) at the end of the session.
    """
    home = tmp_path_factory.mktemp("mlflow_home")
    info = server.start(home, port=server.free_port(), timeout=90)
    try:
        yield info
    finally:
        server.stop(home)


@pytest.fixture(scope="module")
def short_tmp() -> Path:
    """A short temp dir under /tmp: Ray's unix socket paths must stay <= 107 bytes.

    Module-scoped so module-scoped fixtures (a whole pipeline run) can use it; tests in one
    module share it, so give each its own subdirectory.
    """
    path = Path(tempfile.mkdtemp(prefix="tm", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
