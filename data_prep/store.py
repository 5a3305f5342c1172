"""Zarr slice store: write, append, open, verify (schema in ARCHITECTURE.md "Zarr store").

    from data_prep.store import open_store, verify_store
    store = open_store("data/demo.zarr")          # refuses an incomplete store
    store.subjects, store.subject_images(0), store.recipe, store.content_hash
    problems = verify_store("data/demo.zarr")     # [] when all is well

Layout: root attributes (schema_version, complete, recipe, measures, cohorts, counts,
ingest_problems, content_hash, provenance); arrays `images` uint16 (n, rows, cols) one chunk
per slice, `slice_subject` int32, `slice_position` int16; group `subjects` with one 1-D array
per numeric column and the string columns (pseudonym, cohort, sex) in its attributes; group
`normalisation` with the per-subject intensity window (`intensity_low`, `intensity_high`).
No PHI: subjects are known only by a salted HMAC pseudonym; the salt never enters the store.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from data_prep.cohorts import MEASURES
from data_prep.preprocess import Recipe

SCHEMA_VERSION = 1
SALT_ENV = "THIGHMRI_SALT"
MIN_SALT_CHARS = 16

STRING_COLUMNS = ("subject_id", "cohort", "sex")
FLOAT_COLUMNS = ("age", "bmi", *MEASURES, "exercise")
INT_COLUMNS = ("slice_start", "slice_count")
SUBJECT_COLUMNS = (*STRING_COLUMNS, *FLOAT_COLUMNS, *INT_COLUMNS)
NORM_COLUMNS = ("intensity_low", "intensity_high")
HASH_BLOCK = 256  # slices read at a time when hashing images


class StoreError(RuntimeError):
    """A store that cannot be written or opened as asked; the message says why."""


class SaltError(RuntimeError):
    """No usable pseudonymisation salt."""


# ---------------------------------------------------------------- pseudonyms
def load_salt(salt_file: str | os.PathLike | None = None) -> bytes:
    """The pseudonymisation salt from `salt_file`, else from $THIGHMRI_SALT.

    Raises:
        SaltError: with instructions when neither is set or the salt is too short.
    """
    if salt_file is not None:
        path = Path(salt_file)
        if not path.is_file():
            raise SaltError(f"Salt file {path} does not exist.")
        salt = path.read_text(encoding="utf-8").strip()
        where = f"salt file {path}"
    else:
        salt = os.environ.get(SALT_ENV, "").strip()
        where = f"${SALT_ENV}"
    if not salt:
        raise SaltError(
            f"No pseudonymisation salt: set {SALT_ENV} or pass --salt-file FILE. Create one "
            "once with\n  python -c \"import secrets; print(secrets.token_hex(32))\" > salt.txt\n"
            "keep it outside the store and outside version control, and reuse it for every "
            "build so that pseudonyms stay the same across stores.")
    if len(salt) < MIN_SALT_CHARS:
        raise SaltError(f"The salt in {where} has {len(salt)} characters; use at least "
                        f"{MIN_SALT_CHARS} (e.g. secrets.token_hex(32)).")
    return salt.encode("utf-8")


def pseudonym(salt: bytes, cohort: str, key: str) -> str:
    """First 16 hex digits of HMAC-SHA256(salt, "<cohort>:<original key>")."""
    msg = f"{cohort}:{key}".encode("utf-8")
    return hmac.new(salt, msg, hashlib.sha256).hexdigest()[:16]


# ---------------------------------------------------------------- writing
class StoreWriter:
    """Streams subjects into a store; `finish()` writes the table, hash and `complete` last.

    Use `StoreWriter.create(path, recipe)` for a new store or `StoreWriter.append(path,
    recipe)` to add another cohort to a complete store with the same recipe. Until
    `finish()` the store's `complete` attribute is False, so a crash leaves a store that
    `open_store` refuses.
    """

    def __init__(self, root: zarr.Group, recipe: Recipe, rows: list[dict], norm: list[dict]):
        self.root = root
        self.recipe = recipe
        self.rows = rows
        self.norm = norm
        # Runtime config is not persisted: re-apply it on every open for writing.
        self.images = root["images"].with_config({"write_empty_chunks": True})
        self.slice_subject = root["slice_subject"].with_config({"write_empty_chunks": True})
        self.slice_position = root["slice_position"].with_config({"write_empty_chunks": True})
        self.n_slices = int(self.images.shape[0])
        self._ids = {r["subject_id"] for r in rows}

    @classmethod
    def create(cls, path: str | os.PathLike, recipe: Recipe, *, overwrite: bool = False
               ) -> StoreWriter:
        path = Path(path)
        if path.exists() and not overwrite:
            raise StoreError(f"{path} exists; remove it, pass overwrite, or append to it")
        root = zarr.open_group(str(path), mode="w")
        root.attrs.update({"schema_version": SCHEMA_VERSION, "complete": False,
                           "recipe": recipe.to_dict()})
        rows, cols = recipe.size
        # One chunk per slice: training reads random slices. Empty chunks are written too,
        # so that a missing chunk always means "never written" (see verify_store).
        cfg = {"write_empty_chunks": True}
        root.create_array("images", shape=(0, rows, cols), chunks=(1, rows, cols),
                          dtype="uint16", fill_value=0, config=cfg)
        root.create_array("slice_subject", shape=(0,), chunks=(65536,), dtype="int32",
                          fill_value=-1, config=cfg)
        root.create_array("slice_position", shape=(0,), chunks=(65536,), dtype="int16",
                          fill_value=-1, config=cfg)
        return cls(root, recipe, [], [])

    @classmethod
    def append(cls, path: str | os.PathLike, recipe: Recipe) -> StoreWriter:
        store = open_store(path)  # must be complete: never append onto a half-written store
        if store.recipe != recipe:
            raise StoreError(
                f"Cannot append: the store's recipe {store.recipe.to_dict()} differs from "
                f"this build's {recipe.to_dict()}. One store holds one recipe; build a new store.")
        root = zarr.open_group(str(Path(path)), mode="r+")
        root.attrs["complete"] = False
        rows = store.subjects.to_dict("records")
        for r in rows:
            r["sex"] = r["sex"] if isinstance(r["sex"], str) else None
        norm = store.normalisation.to_dict("records")
        return cls(root, recipe, rows, norm)

    def has_subject(self, subject_id: str) -> bool:
        return subject_id in self._ids

    def add_subject(self, row: dict[str, Any], images: np.ndarray, stats: dict[str, Any]) -> None:
        """Append one subject's slices. `row` holds subject_id, cohort and the canonical fields."""
        expected = (self.recipe.n_slices, *self.recipe.size)
        if images.dtype != np.uint16 or images.shape != expected:
            raise StoreError(f"images must be uint16 {expected}, got {images.dtype} {images.shape}")
        if row["subject_id"] in self._ids:
            raise StoreError(f"subject {row['subject_id']} is already in the store")
        n, start = images.shape[0], self.n_slices
        self.images.resize((start + n, *self.recipe.size))
        self.slice_subject.resize((start + n,))
        self.slice_position.resize((start + n,))
        self.images[start:start + n] = images
        self.slice_subject[start:start + n] = np.full(n, len(self.rows), dtype=np.int32)
        self.slice_position[start:start + n] = np.arange(n, dtype=np.int16)
        full = {c: row.get(c) for c in (*STRING_COLUMNS, *FLOAT_COLUMNS)}
        full.update(slice_start=start, slice_count=n)
        self.rows.append(full)
        self.norm.append({c: float(stats[c]) for c in NORM_COLUMNS})
        self._ids.add(row["subject_id"])
        self.n_slices += n

    def finish(self, *, cohort: str, cohort_summary: dict[str, Any],
               ingest_problems: list[dict[str, str]], provenance: dict[str, Any]) -> str:
        """Write the subjects table and attributes, then the content hash, then `complete`."""
        subjects = _subjects_frame(self.rows)
        _write_table(self.root, "subjects", subjects, strings=STRING_COLUMNS)
        _write_table(self.root, "normalisation", pd.DataFrame(self.norm, columns=NORM_COLUMNS))
        attrs = dict(self.root.attrs)
        cohorts = dict(attrs.get("cohorts") or {})
        cohorts[cohort] = cohort_summary
        problems = list(attrs.get("ingest_problems") or [])
        problems += [dict(p, cohort=cohort) for p in ingest_problems]
        history = list((attrs.get("provenance") or {}).get("builds", []))
        history.append(provenance)
        counts = {
            "subjects": int(len(subjects)), "slices": int(self.n_slices),
            "per_cohort": {str(k): int(v) for k, v in subjects["cohort"].value_counts()
                           .sort_index().items()},
            "ingest_problems": len(problems),
        }
        self.root.attrs.update({
            "measures": MEASURES, "cohorts": cohorts, "counts": counts,
            "ingest_problems": problems, "provenance": {"builds": history},
        })
        digest = content_hash(self.root, self.recipe, subjects)
        self.root.attrs["content_hash"] = digest
        self.root.attrs["complete"] = True  # last: everything above is on disk
        return digest


def _subjects_frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(SUBJECT_COLUMNS))
    for c in FLOAT_COLUMNS:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    for c in INT_COLUMNS:
        df[c] = df[c].astype(np.int64)
    for c in STRING_COLUMNS:
        df[c] = df[c].astype(object).where(df[c].notna(), None)
    return df


def _write_table(root: zarr.Group, name: str, df: pd.DataFrame, strings: tuple = ()) -> None:
    group = root.create_group(name, overwrite=True)
    group.attrs.update({
        "columns": list(df.columns),
        "strings": {c: [None if v is None else str(v) for v in df[c]] for c in strings},
        "n_rows": int(len(df)),
    })
    for c in df.columns:
        if c in strings:
            continue
        values = df[c].to_numpy()
        group.create_array(c, shape=values.shape, chunks=(max(1, len(values)),),
                           dtype=values.dtype, fill_value=0)
        if len(values):
            group[c][:] = values


def _read_table(root: zarr.Group, name: str) -> pd.DataFrame:
    group = root[name]
    strings = group.attrs["strings"]
    data = {}
    for c in group.attrs["columns"]:
        data[c] = pd.Series(strings[c], dtype=object) if c in strings else group[c][:]
    return pd.DataFrame(data, columns=group.attrs["columns"])


def content_hash(root: zarr.Group, recipe: Recipe, subjects: pd.DataFrame) -> str:
    """sha256 over the recipe, the subjects table and every slice, in store order."""
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
    images = root["images"]
    for start in range(0, images.shape[0], HASH_BLOCK):
        h.update(np.ascontiguousarray(images[start:start + HASH_BLOCK]).tobytes())
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
            "was interrupted or is still running. Rebuild it with data_prep/build_store.py, "
            "or pass require_complete=False to inspect what was written.")
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(f"{path}: schema_version {attrs.get('schema_version')!r}, this code "
                         f"reads {SCHEMA_VERSION}")
    has_table = "subjects" in root
    return ThighStore(
        path=path, root=root, images=root["images"],
        slice_subject=root["slice_subject"][:], slice_position=root["slice_position"][:],
        subjects=_read_table(root, "subjects") if has_table else _subjects_frame([]),
        normalisation=(_read_table(root, "normalisation") if "normalisation" in root
                       else pd.DataFrame(columns=NORM_COLUMNS)),
        recipe=Recipe.from_dict(attrs["recipe"]), measures=attrs.get("measures", {}),
        content_hash=attrs.get("content_hash", ""), attrs=attrs,
    )


def verify_store(path: str | os.PathLike) -> list[str]:
    """Every problem found in the store at `path` ([] when it is sound)."""
    try:
        store = open_store(path, require_complete=False)
    except (StoreError, KeyError, ValueError) as exc:
        return [f"cannot open: {exc}"]
    problems: list[str] = []
    a = store.attrs
    if a.get("complete") is not True:
        problems.append("store is incomplete ('complete' attribute not set)")
    for key in ("recipe", "measures", "cohorts", "counts", "ingest_problems", "content_hash",
                "provenance"):
        if key not in a:
            problems.append(f"root attribute {key!r} missing")
    subjects, images = store.subjects, store.images
    n = int(images.shape[0])
    rows, cols = store.recipe.size
    if images.dtype != np.uint16 or tuple(images.shape[1:]) != (rows, cols):
        problems.append(f"images are {images.dtype} {images.shape[1:]}, recipe says uint16 "
                        f"{(rows, cols)}")
    if tuple(images.chunks) != (1, rows, cols):
        problems.append(f"images chunks {images.chunks}, expected one chunk per slice")
    if images.nchunks_initialized != images.nchunks:
        problems.append(f"{images.nchunks - images.nchunks_initialized} of {images.nchunks} "
                        "image chunks were never written (they would read as zeros)")
    if len(store.slice_subject) != n or len(store.slice_position) != n:
        problems.append("slice_subject / slice_position length differs from images")
    missing_cols = [c for c in SUBJECT_COLUMNS if c not in subjects.columns]
    if missing_cols:
        problems.append(f"subjects table lacks columns {missing_cols}")
        return problems
    ids = subjects["subject_id"]
    if ids.duplicated().any():
        problems.append(f"{int(ids.duplicated().sum())} duplicate subject_id values")
    bad_ids = [i for i, v in enumerate(ids) if not (isinstance(v, str) and len(v) == 16
                                                     and all(ch in "0123456789abcdef" for ch in v))]
    if bad_ids:
        problems.append(f"subject_id not a 16-hex pseudonym in rows {bad_ids[:10]}")
    bad_sex = sorted({str(v) for v in subjects["sex"] if v not in ("male", "female", None)})
    if bad_sex:
        problems.append(f"sex values {bad_sex} not in ['male', 'female', None]")
    expected_start = 0
    for i, r in subjects.iterrows():
        start, count = int(r["slice_start"]), int(r["slice_count"])
        if start != expected_start:
            problems.append(f"subject row {i}: slice_start {start}, expected {expected_start} "
                            "(slices must be contiguous, in table order)")
        block = slice(start, start + count)
        if len(store.slice_subject) >= start + count:
            if np.any(store.slice_subject[block] != i):
                problems.append(f"subject row {i}: slice_subject disagrees with slice_start/count")
            if np.any(store.slice_position[block] != np.arange(count)):
                problems.append(f"subject row {i}: slice_position is not 0..{count - 1}")
        expected_start = start + count
    if expected_start != n:
        problems.append(f"subjects cover {expected_start} slices, images has {n}")
    counts = a.get("counts") or {}
    if counts and (counts.get("subjects") != len(subjects) or counts.get("slices") != n):
        problems.append(f"counts attribute {counts} disagrees with {len(subjects)} subjects, "
                        f"{n} slices")
    if len(store.normalisation) != len(subjects):
        problems.append("normalisation table length differs from subjects")
    if not problems and a.get("content_hash"):
        actual = content_hash(store.root, store.recipe, subjects)
        if actual != a["content_hash"]:
            problems.append(f"content_hash mismatch: stored {a['content_hash']}, actual {actual}")
    return problems
