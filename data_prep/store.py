"""Zarr slice store: schema, hashing, open (schema in ARCHITECTURE.md "Zarr store").

    from data_prep.store import open_store
    store = open_store("data/demo.zarr")          # refuses an incomplete store
    store.subjects, store.subject_images(0), store.recipe, store.content_hash

Writing is StoreWriter in data_prep/store_writer.py (used by data_prep/build_store.py). Its
build journal lives in data_prep/journal.py, the image shard format in data_prep/shards.py,
the integrity check `verify_store` in data_prep/verify.py and the pseudonyms (`load_salt`,
`pseudonym`) in data_prep/pseudonyms.py; those names stay importable from here.

Layout (ARCHITECTURE.md "Zarr store"): root attributes (schema_version, complete, recipe,
measures, cohorts, counts, ingest_problems, content_hash, provenance); arrays `images` uint16
(n, rows, cols) with one shard per participant (shards (n_slices, rows, cols) of inner
chunks (1, rows, cols), Blosc lz4, keys `c.<participant>.0.0`: data_prep/shards.py; stores
made before have one unsharded chunk per slice, keys `c.<slice>.0.0`, and are still read,
verified and appended to), `slice_subject` int32, `slice_position` int16, `slice_digest` uint8
(n, 32) sha256 per slice; group `subjects` with one 1-D array per numeric
column and the string columns (pseudonym, cohort, sex) in its attributes; group
`normalisation` with the per-subject intensity window (`intensity_low`, `intensity_high`).
While a build runs, `build_journal.jsonl` in the store records finished participants so that
a rerun resumes (StoreWriter; data_prep/journal.py), and workers stage shard files in
`build_staging/`. The ingest report CSV lies beside the store (`ingest_report_path`). No PHI:
subjects are known only by a salted HMAC pseudonym; the salt never enters the store.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from data_prep.cohorts import MEASURES
from data_prep.journal import JOURNAL, read_journal  # noqa: F401 - importable from here
from data_prep.preprocess import Recipe
from data_prep.pseudonyms import SALT_ENV, SaltError, load_salt, pseudonym  # noqa: F401
from data_prep.shards import IMAGE_CHUNK_KEYS, IMAGE_CODEC, STAGING  # noqa: F401

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


def _subjects_frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(SUBJECT_COLUMNS))
    for c in (*FLOAT_COLUMNS, *SPACING_COLUMNS):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    for c in INT_COLUMNS:
        df[c] = df[c].astype(np.int64)
    for c in STRING_COLUMNS:
        df[c] = df[c].astype(object).where(df[c].notna(), None)
    return df


def _read_table(root: zarr.Group, name: str) -> pd.DataFrame:
    group = root[name]
    strings = group.attrs["strings"]
    data = {}
    for c in group.attrs["columns"]:
        data[c] = pd.Series(strings[c], dtype=object) if c in strings else group[c][:]
    return pd.DataFrame(data, columns=group.attrs["columns"])


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


# ---------------------------------------------------------------- reading
@dataclass
class ThighStore:
    """A complete store opened for reading (see module docstring)."""

    path: Path
    root: zarr.Group
    images: zarr.Array
    slice_subject: np.ndarray
    slice_position: np.ndarray
    subjects: pd.DataFrame
    normalisation: pd.DataFrame
    recipe: Recipe
    measures: dict[str, dict[str, str]]
    content_hash: str
    attrs: dict[str, Any]

    def subject_images(self, i: int) -> np.ndarray:
        """uint16 (n_slices, rows, cols) of the subject in row `i` of `subjects`."""
        row = self.subjects.iloc[i]
        start, count = int(row["slice_start"]), int(row["slice_count"])
        return self.images[start:start + count]


def open_store(path: str | os.PathLike, *, require_complete: bool = True) -> ThighStore:
    """Open a store for reading; raises StoreError if incomplete (unless told otherwise)."""
    path = Path(path)
    try:
        root = zarr.open_group(str(path), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise StoreError(f"{path} is not a Zarr store (no group found)") from exc
    attrs = dict(root.attrs)
    if require_complete and attrs.get("complete") is not True:
        raise StoreError(
            f"{path} is incomplete (its 'complete' attribute is not set): a build or append "
            "was interrupted or is still running. Rerun the same data_prep/build_store.py "
            "command to resume it (finished participants are kept), or pass "
            "require_complete=False to inspect what was written.")
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(f"{path}: schema_version {attrs.get('schema_version')!r}, this code "
                         f"reads {SCHEMA_VERSION}")
    has_table = "subjects" in root
    return ThighStore(
        path=path, root=root, images=root["images"],
        slice_subject=(root["slice_subject"][:] if "slice_subject" in root
                       else np.zeros(0, np.int32)),
        slice_position=(root["slice_position"][:] if "slice_position" in root
                        else np.zeros(0, np.int16)),
        subjects=_read_table(root, "subjects") if has_table else _subjects_frame([]),
        normalisation=(_read_table(root, "normalisation") if "normalisation" in root
                       else pd.DataFrame(columns=NORM_COLUMNS)),
        recipe=Recipe.from_dict(attrs["recipe"]), measures=attrs.get("measures", {}),
        content_hash=attrs.get("content_hash", ""), attrs=attrs,
    )


def __getattr__(name: str) -> Any:
    # The writer (data_prep/store_writer.py) and verify_store (data_prep/verify.py) import
    # this module: resolved on first use so that `from data_prep.store import StoreWriter`
    # (or verify_store) keeps working without an import cycle.
    if name in ("StoreWriter", "write_ingest_report"):
        from data_prep import store_writer
        return getattr(store_writer, name)
    if name == "verify_store":
        from data_prep.verify import verify_store
        return verify_store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
