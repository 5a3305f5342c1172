"""Check a Zarr slice store and list every problem at once.

    from data_prep.store import verify_store
    problems = verify_store("data/demo.zarr")     # [] when all is well
    problems = verify_store("s3://bucket/demo.zarr")  # a copy on object storage, read in full

`python data_prep/build_store.py --verify STORE` prints the problems and exits 1 if any.
Reads the store through reader.py (open_store) and checks it against schema.py (columns,
REASONS, content_hash); it never writes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from data_prep.store.journal import JOURNAL
from data_prep.store.reader import ThighStore, open_store
from data_prep.store.remote import exists, is_url
from data_prep.store.schema import (HASH_BLOCK, REASONS, REPORT_COLUMNS, SPACING_COLUMNS,
                                    SUBJECT_COLUMNS, StoreError, content_hash, slice_digests)
from data_prep.store.shards import STAGING, shard_index_nbytes, written_inner_chunks


def verify_store(path: str | os.PathLike) -> list[str]:
    """Every problem found in the store at `path` ([] when it is sound).

    Checks schema version, required attributes and arrays, no leftover build journal or
    staging folder, image dtype/shape/chunking, that every image chunk was written (an
    unwritten chunk would read back as zeros; in a sharded store: listed in its shard's
    index, which must be intact), the subjects table (columns, pseudonyms, sex codes,
    pixel spacing), slice_subject / slice_position against slice_start / slice_count, the
    `counts` attribute, the ingest problems, and that the recomputed content hash equals the
    recorded one. All problems are listed at once.
    """
    try:
        store = open_store(path, require_complete=False, cache_dir=None)  # a URL: read every byte from there
    except (StoreError, KeyError, ValueError, OSError) as exc:
        return [f"cannot open: {exc}"]
    problems: list[str] = []
    a = store.attrs
    if a.get("complete") is not True:
        problems.append("store is incomplete ('complete' attribute not set): rerun its build "
                        "command to resume it")
    if _has(path, JOURNAL):
        problems.append(f"a build journal ({JOURNAL}) is present: a build or append is "
                        "unfinished or was interrupted")
    if _has(path, STAGING):
        problems.append(f"a build staging folder ({STAGING}) is present: a build or append "
                        "is unfinished or was interrupted")
    for key in ("recipe", "measures", "cohorts", "counts", "ingest_problems", "content_hash",
                "provenance"):
        if key not in a:
            problems.append(f"root attribute {key!r} is missing")
    for name in ("images", "slice_subject", "slice_position", "slice_digest", "subjects",
                 "normalisation"):
        if name not in store.root:
            problems.append(f"{name!r} is missing")
    subjects = store.subjects
    images = store.images
    n = int(images.shape[0])
    rows, cols = store.recipe.size
    if images.dtype != np.uint16 or tuple(images.shape[1:]) != (rows, cols):
        problems.append(f"images are {images.dtype} {images.shape[1:]}, recipe says uint16 "
                        f"{(rows, cols)}")
    if tuple(images.chunks) != (1, rows, cols):
        problems.append(f"images chunks {images.chunks}, expected one chunk per slice")
    else:
        written, damaged = _written_chunk_rows(images)
        if damaged:
            problems.append(f"{len(damaged)} image shards have a damaged index (their slices "
                            f"cannot be read): {', '.join(damaged[:8])}")
        missing = sorted(set(range(n)) - written)
        if missing:
            problems.append(f"{len(missing)} of {n} image chunks were never written (they "
                            f"would read as zeros): slices {_ranges(missing)}")
    if len(store.slice_subject) != n or len(store.slice_position) != n:
        problems.append(f"slice_subject / slice_position length ({len(store.slice_subject)} / "
                        f"{len(store.slice_position)}) differs from images ({n})")
    missing_cols = [c for c in SUBJECT_COLUMNS if c not in subjects.columns]
    if missing_cols:
        problems.append(f"subjects table lacks columns {missing_cols}")
    else:
        problems += _check_subjects(store, subjects, n)
    counts = a.get("counts") or {}
    per_cohort = {str(k): int(v) for k, v in subjects["cohort"].value_counts().sort_index()
                  .items()} if "cohort" in subjects else {}
    if counts and (counts.get("subjects") != len(subjects) or counts.get("slices") != n
                   or counts.get("per_cohort") != per_cohort):
        problems.append(f"counts attribute {counts} disagrees with the data: {len(subjects)} "
                        f"subjects, {n} slices, per cohort {per_cohort}")
    ingest = a.get("ingest_problems")
    if isinstance(ingest, list):
        if counts and counts.get("ingest_problems") != len(ingest):
            problems.append(f"counts.ingest_problems {counts.get('ingest_problems')} but "
                            f"{len(ingest)} ingest problems are listed")
        bad = [i for i, p in enumerate(ingest) if not isinstance(p, dict)
               or set(REPORT_COLUMNS) - set(p) or p.get("reason") not in REASONS]
        if bad:
            problems.append(f"ingest_problems entries {bad[:10]} lack {list(REPORT_COLUMNS)} "
                            f"or have a reason outside {list(REASONS)}")
    if len(store.normalisation) != len(subjects):
        problems.append("normalisation table length differs from subjects")
    if a.get("content_hash") and not missing_cols:
        try:
            actual = content_hash(store.root, store.recipe, subjects)
        except Exception as exc:  # noqa: BLE001 - a damaged store can fail in many ways
            problems.append(f"content hash cannot be recomputed ({type(exc).__name__}: {exc})")
        else:
            if actual != a["content_hash"]:
                problems.append(f"content_hash mismatch: recorded {a['content_hash']}, "
                                f"recomputed {actual}")
                problems += _changed_slices(store)
    return problems


def _has(path: str | os.PathLike, name: str) -> bool:
    """Whether the store at a path or URL holds `name` (a file or folder)."""
    return exists(str(path), name) if is_url(path) else (Path(path) / name).exists()


def _check_subjects(store: ThighStore, subjects: pd.DataFrame, n: int) -> list[str]:
    problems = []
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
    for c in SPACING_COLUMNS:
        bad = np.flatnonzero(~(subjects[c].to_numpy(dtype=float) > 0))
        if len(bad):
            problems.append(f"{c} not a positive number in rows {bad[:10].tolist()}")
    expected_start = 0
    ss, sp = store.slice_subject, store.slice_position
    for i, (start, count) in enumerate(zip(subjects["slice_start"], subjects["slice_count"])):
        start, count = int(start), int(count)
        if start != expected_start:
            problems.append(f"subject row {i}: slice_start {start}, expected {expected_start} "
                            "(slices must be contiguous, in table order)")
        block = slice(start, start + count)
        if len(ss) >= start + count and len(sp) >= start + count:
            if np.any(ss[block] != i):
                problems.append(f"subject row {i}: slice_subject disagrees with "
                                f"slice_start/slice_count ({start}, {count})")
            if np.any(sp[block] != np.arange(count)):
                problems.append(f"subject row {i}: slice_position is not 0..{count - 1}")
        expected_start = start + count
    total = int(subjects["slice_count"].sum())
    if total != n:
        problems.append(f"subjects' slice_count values add up to {total} slices, "
                        f"images has {n}")
    return problems


def _written_chunk_rows(images: zarr.Array) -> tuple[set[int], list[str]]:
    """(slice indices whose image chunk exists in the store, shard keys whose index is
    damaged). One chunk per slice, or shards of inner chunks of one slice along axis 0
    (shards.py: index at the end with zarr's default index codecs)."""
    from zarr.abc.store import SuffixByteRequest
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    store = images.store
    prefix = images.path.rstrip("/") + "/"
    sharded = images.shards is not None
    per_file = int(images.shards[0]) if sharded else 1
    config = images.metadata.codecs[0].to_dict().get("configuration", {}) if sharded else {}
    indexed = sharded and config.get("index_location") == "end" and [
        c["name"] for c in config.get("index_codecs", ())] == ["bytes", "crc32c"]

    async def keys() -> list[str]:
        return [k async for k in store.list_prefix(prefix)]

    async def tail(key: str) -> bytes:
        buf = await store.get(key, default_buffer_prototype(),
                              SuffixByteRequest(shard_index_nbytes(per_file)))
        return b"" if buf is None else buf.to_bytes()

    separator = images.metadata.chunk_key_encoding.separator  # "." (IMAGE_CHUNK_KEYS) or "/"
    rows, damaged = set(), []
    for key in sync(keys()):
        parts = key[len(prefix):].split(separator)
        if not (len(parts) == 4 and parts[0] == "c" and parts[1].isdigit()):
            continue
        first = int(parts[1]) * per_file
        if not indexed:  # one chunk per slice (or a shard index this code does not read)
            rows.update(range(first, first + per_file))
            continue
        try:
            rows.update(first + i for i in written_inner_chunks(sync(tail(key)), per_file))
        except ValueError:
            damaged.append(key[len(prefix):])
    return rows, damaged


def _changed_slices(store: ThighStore) -> list[str]:
    """Slices whose bytes differ from the digest recorded when they were written."""
    if "slice_digest" not in store.root:
        return ["'slice_digest' is missing"]
    recorded = store.root["slice_digest"][:]
    images, changed = store.images, []
    for start in range(0, min(len(recorded), images.shape[0]), HASH_BLOCK):
        block = slice_digests(images[start:start + HASH_BLOCK])
        changed += [start + i for i, d in enumerate(block)
                    if d != bytes(recorded[start + i]).hex()]
    return [f"{len(changed)} slices differ from their recorded sha256: {_ranges(changed)}"
            ] if changed else []


def _ranges(indices: list[int], limit: int = 8) -> str:
    """[3, 4, 5, 9] -> '3-5, 9' (at most `limit` ranges, then '...')."""
    out: list[str] = []
    for i in indices:
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    text = [f"{a}" if a == b else f"{a}-{b}" for a, b in out[:limit]]
    return ", ".join(text) + (", ..." if len(out) > limit else "")
