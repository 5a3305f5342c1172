"""Fixtures for the launch tests that need a real store and a launch subprocess."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def two_cohort_store(tmp_path_factory) -> Path:
    """A real store built from synthetic DICOM: 60 OAI + ~30 SOMMA participants at 32x64.

    Two cohorts of different sizes give cells whose searches finish at different times.
    """
    from data_prep.build_store import main as build_main
    from data_prep.synth import generate_cohort

    root = tmp_path_factory.mktemp("two_cohorts")
    cohort = root / "cohort"
    generate_cohort(cohort, subjects=60, seed=3, matrix=(64, 128))
    salt = root / "salt"
    salt.write_text("launch-tests-salt-0123456789abcdef\n")
    store = root / "store.zarr"
    for name in ("oai", "somma"):
        args = ["--dicom", str(cohort / name / "dicom"), "--tables", str(cohort / name / "tables"),
                "--cohort", name, "--out", str(store), "--size", "32x64", "--salt-file", str(salt)]
        assert build_main(args + (["--append"] if name == "somma" else [])) in (0, None)
    return store
