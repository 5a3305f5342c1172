"""Zarr slice store schema: names, columns, report categories, hashing (ARCHITECTURE.md
"Zarr store"). Reading is reader.py (open_store), writing writer.py, checking verify.py.

    from data_prep.store.schema import REASONS, content_hash, slice_digests

Layout (ARCHITECTURE.md "Zarr store"): root attributes (schema_version, complete, recipe,
measures, cohorts, counts, ingest_problems, content_hash, provenance); arrays `images` uint16
(n, rows, cols) with one shard per participant (shards (n_slices, rows, cols) of inner
chunks (1, rows, cols), Blosc lz4, keys `c.<participant>.0.0`: shards.py; stores
made before have one unsharded chunk per slice, keys `c.<slice>.0.0`, and are still read,
verified and appended to), `slice_subject` int32, `slice_position` int16, `slice_digest` uint8
(n, 32) sha256 per slice; group `subjects` with one 1-D array per numeric
column and the string columns (pseudonym, cohort, sex) in its attributes; group
`normalisation` with the per-subject intensity window (`intensity_low`, `intensity_high`).
While a build runs, `build_journal.jsonl` in the store records finished participants so that
a rerun resumes (writer.py; journal.py), and workers stage shard files in
`build_staging/`. The ingest report CSV lies beside the store (`ingest_report_path`). No PHI:
subjects are known only by a salted HMAC pseudonym (data_prep/pseudonyms.py); the salt
never enters the store.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from data_prep.cohorts.spec import MEASURES
from data_prep.preprocess import Recipe

# 2: pixel spacing columns in the subjects table. Still 2 with one shard per participant:
# the arrays and attributes are unchanged, zarr's own array metadata describes the sharding,
# and this code reads and appends to both layouts.
SCHEMA_VERSION = 2

STRING_COLUMNS = ("subject_id", "cohort", "sex")
FLOAT_COLUMNS = ("age", "bmi", *MEASURES, "exercise")
# Pixel spacing of the stored (resized) images, mm: original spacing x original size / size.
SPACING_COLUMNS = ("pixel_spacing_row_mm", "pixel_spacing_col_mm")
INT_COLUMNS = ("slice_start", "slice_count")
SUBJECT_COLUMNS = (*STRING_COLUMNS, *FLOAT_COLUMNS, *SPACING_COLUMNS, *INT_COLUMNS)
NORM_COLUMNS = ("intensity_low", "intensity_high")
HASH_BLOCK = 256  # slices read at a time when hashing images
# Ingest report: one row per table row or DICOM participant that did not become a subject,
# per unusable file, and per note on a choice made. `source` is a participant's pseudonym,
# "<pseudonym>/file#k" (the k-th of that participant's files in sorted path order),
# "<dicom root>/file#k" (the k-th of the files no participant could be given), or
# "<table file>#row<k>" (k-th data row); never a name, ID, UID or file name. `skipped` is
# True when a table row or participant was left out, False when the participant was kept.
REPORT_COLUMNS = ("cohort", "source", "reason", "detail", "skipped")
REASONS: dict[str, str] = {  # category -> meaning (data_prep/README.md "Ingest report")
    # files (skipped False: the file is not used, its participant may still be)
    "not_dicom": "file is not DICOM",
    "truncated": "file ends early (inside the header or the pixel data)",
    "no_pixel_data": "DICOM without an image (no pixel data, series UID or position)",
    "undecodable": "pixel data or a header value cannot be decoded",
    "no_patient_id": "DICOM image without the participant tag (PatientID): no participant",
    # DICOM participants (skipped True unless noted)
    "inconsistent_geometry": "slices of the thigh series differ in size, spacing or position",
    "wrong_orientation": "the thigh series is not axial",
    "too_few_slices": "the thigh series has fewer slices than the recipe keeps",
    "no_thigh_series": "no series matches the spec's thigh series description",
    "several_thigh_series": "note, participant kept: more than one qualifying thigh series; "
                            "the detail says which was chosen and why",
    "no_table_row": "DICOM participant whose key has no row in the cohort tables",
    "duplicate": "already in the store (same cohort and key)",
    # table rows (skipped True)
    "no_images": "table row whose key matches no DICOM participant of the visit",
    "no_key": "table row with a blank key: it cannot be matched to images",
    "table_only": "no_images, as stores built before 2026-12 call it",
}
# Reasons that describe one file rather than a participant or table row.
FILE_REASONS = ("not_dicom", "truncated", "no_pixel_data", "undecodable", "no_patient_id")


class StoreError(RuntimeError):
    """A store that cannot be written or opened as asked; the message says why."""


def ingest_report_path(store_path: str | os.PathLike) -> Path:
    """`data/demo.zarr` -> `data/demo.zarr.ingest_report.csv` (beside the store)."""
    p = Path(store_path)
    return p.with_name(p.name + ".ingest_report.csv")


def subjects_frame(rows: list[dict]) -> pd.DataFrame:
    """The subjects table from row dicts, with the schema's column order and dtypes."""
    df = pd.DataFrame(rows, columns=list(SUBJECT_COLUMNS))
    for c in (*FLOAT_COLUMNS, *SPACING_COLUMNS):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    for c in INT_COLUMNS:
        df[c] = df[c].astype(np.int64)
    for c in STRING_COLUMNS:
        df[c] = df[c].astype(object).where(df[c].notna(), None)
    return df


def slice_digests(images: np.ndarray) -> list[str]:
    """sha256 (hex) of each slice's bytes (C order, little-endian uint16)."""
    images = np.ascontiguousarray(images, dtype="<u2")
    return [hashlib.sha256(s).hexdigest() for s in images]  # C-contiguous: no copy


def content_hash(root: zarr.Group, recipe: Recipe, subjects: pd.DataFrame,
                 digests: list[str] | None = None) -> str:
    """sha256 over the recipe, the subjects table, the slice index and each slice's sha256.

    `digests` (one hex sha256 per slice, store order) come from the writer; without them
    every slice is read back and hashed (verify_store does so, to check the data itself).
    """
    h = hashlib.sha256()
    h.update(json.dumps(recipe.to_dict(), sort_keys=True).encode())
    for c in subjects.columns:
        h.update(c.encode())
        if c in STRING_COLUMNS:
            h.update(json.dumps([None if v is None else str(v) for v in subjects[c]]).encode())
        else:
            h.update(np.ascontiguousarray(subjects[c].to_numpy()).tobytes())
    h.update(root["slice_subject"][:].tobytes())
    h.update(root["slice_position"][:].tobytes())
    if digests is None:
        images = root["images"]
        digests = []
        for start in range(0, images.shape[0], HASH_BLOCK):
            digests += slice_digests(images[start:start + HASH_BLOCK])
    for d in digests:
        h.update(bytes.fromhex(d))
    return "sha256:" + h.hexdigest()
