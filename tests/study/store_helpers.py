"""A real OAI-like store for study tests: synthetic DICOM (data_prep/synth.py) ingested by
data_prep/build_store.py, as a user would build one."""

from __future__ import annotations

from pathlib import Path


def synthetic_oai_store(root: Path, *, subjects: int, seed: int, size: str, salt: str, workers: int = 2) -> Path:
    """Write a synthetic cohort under `root`/cohort (64x128 DICOM) and ingest its OAI part into
    `root`/store.zarr at `size` ("HxW"); returns the store's path."""
    from data_prep.build_store import main as build_main
    from data_prep.synth import generate_cohort

    generate_cohort(root / "cohort", subjects=subjects, seed=seed, matrix=(64, 128))
    (root / "salt").write_text(salt + "\n")
    oai = root / "cohort" / "oai"
    rc = build_main(["--dicom", str(oai / "dicom"), "--tables", str(oai / "tables"), "--cohort", "oai",
                     "--out", str(root / "store.zarr"), "--size", size, "--salt-file", str(root / "salt"),
                     "--no-progress", "--workers", str(workers)])
    assert rc in (0, None)
    return root / "store.zarr"
