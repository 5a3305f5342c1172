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
# Ingest report: one row per unusable file or participant. `source` is a pseudonym, or
# "<pseudonym>/file#k" (k-th file in sorted path order under the participant's folder);
# `skipped` is True when the participant was left out, False for a file-level problem.
REPORT_COLUMNS = ("cohort", "source", "reason", "detail", "skipped")
REASONS = ("not_dicom", "truncated", "no_pixel_data", "undecodable", "inconsistent_geometry",
           "wrong_orientation", "too_few_slices", "no_thigh_series", "no_table_row",
           "table_only", "duplicate")


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
