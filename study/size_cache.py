"""Per-subject tables measured from a store's images once per store, kept on the node.

Every cell of a launch fits the size+age baseline on its own subjects, and the thigh areas it
needs depend only on the store: reading a 3515-participant store for them takes ~20 s, so a
48-cell grid would read the store ~50 times for the same numbers. They are measured once for
every subject of the store and kept beside the feature cache.

Usage::

    from study import size_cache

    table = size_cache.cached_subject_table(store, "areas", "v1 t=0.15,0.6", compute)
    for rows, images, counts in size_cache.subject_blocks(store, rows): ...

Layout (``<root>`` = study.features.default_cache_dir(): $THIGHMRI_FEATURE_CACHE, default
``<repo>/runs/feature_cache``)::

    <root>/<name>/<digest>-v<TABLE_CACHE_VERSION>.npz   table: float64 (n_subjects, k);
        content_hash and code: what it was computed from (checked on read)
    <root>/<name>/<digest>-v<TABLE_CACHE_VERSION>.lock  flock held while one process computes

``digest`` hashes the store's content_hash and the caller's code key, so a rebuilt or
appended store, or a change of the measuring code, names another file. A file is written
under a temporary name and renamed into place (os.replace), so a reader never sees half of
it; of several processes missing it at once one computes and the others wait on the lock,
then read. An unwritable cache folder never fails the caller: the table is computed (and a
warning says why it was not kept).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

# Bump when the file layout changes (callers version what they compute in their code key).
TABLE_CACHE_VERSION = 1
# images read per batch of subjects (uint16 bytes); the masks of a batch take ~6x as much
BATCH_BYTES = 32 << 20
_MEMO: dict[str, np.ndarray] = {}  # path -> table, for callers in the same process


def table_path(store: Any, name: str, code: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the table `name` of `store` lives (whether or not it exists yet)."""
    if cache_dir is None:
        from study.features import default_cache_dir  # torch import: only when caching

        cache_dir = default_cache_dir()
    digest = hashlib.sha256(f"{store.content_hash}\n{code}".encode()).hexdigest()[:32]
    return Path(cache_dir) / name / f"{digest}-v{TABLE_CACHE_VERSION}.npz"


def _read(path: Path, store: Any, code: str) -> np.ndarray | None:
    """The table at path if it was made for this store and code, else None."""
    try:
        with np.load(path, allow_pickle=False) as f:
            table, made_from, made_by = f["table"], str(f["content_hash"]), str(f["code"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # absent or damaged: compute again
        return None
    if made_from != store.content_hash or made_by != code or table.shape[0] != len(store.subjects):
        return None
    return table


def _write(path: Path, table: np.ndarray, store: Any, code: str) -> None:
    """table to path atomically: a temporary file in the same folder, then os.replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp.npz")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the table holds no secrets
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, table=table, content_hash=np.str_(store.content_hash), code=np.str_(code))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def cached_subject_table(store: Any, name: str, code: str, compute: Callable[[], np.ndarray], *,
                         cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """compute()'s (n_subjects, k) table for `store`, from the node's cache or computed into it.

    Args:
        store: opened store (``content_hash``, ``subjects``); without a content_hash nothing is
            cached (compute() every call).
        name: the table's folder under the cache root ("areas").
        code: what compute() measures and how (version, thresholds): part of the key.
        compute: returns float (len(store.subjects), k), row i for store row i.
        cache_dir: cache root (default study.features.default_cache_dir()).

    Returns:
        The table; shared with other callers in this process: read it, never write it.
    """
    if not store.content_hash:
        return compute()
    path = table_path(store, name, code, cache_dir)
    held = _MEMO.get(str(path))
    if held is not None and held.shape[0] == len(store.subjects):
        return held
    table = _read(path, store, code)
    if table is None:
        table = _compute_locked(path, store, name, code, compute)
    table.setflags(write=False)
    _MEMO[str(path)] = table
    return table


def _compute_locked(path: Path, store: Any, name: str, code: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """compute() under the entry's lock and written to path; computed unkept when the cache
    folder cannot be written (a warning says why)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "a+")
    except OSError as exc:  # read-only or missing permissions: the caller still gets its numbers
        warnings.warn(f"{name} table not cached in {path.parent} ({type(exc).__name__}: {exc}); "
                      "computing it for this call only")
        return np.asarray(compute(), dtype=np.float64)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process computes, the others wait here ...
        table = _read(path, store, code)  # ... and then find it written
        if table is None:
            table = np.asarray(compute(), dtype=np.float64)
            try:
                _write(path, table, store, code)
            except OSError as exc:  # a full disk, say
                warnings.warn(f"{name} table not cached at {path} ({type(exc).__name__}: {exc})")
    return table


def subject_blocks(store: Any, rows: np.ndarray, *, batch_bytes: int = BATCH_BYTES
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The stored slices of `rows`, a batch of subjects at a time.

    A local participant-sharded store is read shard file by shard file (data_prep.store.shards
    .decode_shard: ~30x faster than zarr's per-slice codec pipeline); any other store through
    zarr, one contiguous read per run of consecutive subjects.

    Yields:
        (rows of the batch, their uint16 slices concatenated in row order (n, r, c), slice
        count per row).
    """
    rows = np.asarray(rows, dtype=np.int64)
    starts = store.subjects["slice_start"].to_numpy(dtype=np.int64)
    counts = store.subjects["slice_count"].to_numpy(dtype=np.int64)
    shape = tuple(store.images.shape[1:])
    per_batch = max(1, batch_bytes // max(1, int(counts.max(initial=1)) * 2 * int(np.prod(shape))))
    read = _shard_reader(store) or (lambda a, b: np.asarray(store.images[a:b]))
    for first in range(0, rows.size, per_batch):
        batch = rows[first:first + per_batch]
        parts, run_start, run_end = [], None, None
        for row in batch:  # join consecutive subjects into one read
            a, b = int(starts[row]), int(starts[row] + counts[row])
            if run_end == a:
                run_end = b
                continue
            if run_start is not None:
                parts.append(read(run_start, run_end))
            run_start, run_end = a, b
        if run_start is not None:
            parts.append(read(run_start, run_end))
        images = np.concatenate(parts) if parts else np.zeros((0, *shape), np.uint16)
        yield batch, images, counts[batch]


def _shard_reader(store: Any) -> Callable[[int, int], np.ndarray] | None:
    """read(a, b) -> slices a..b-1 straight from the shard files, or None when the store is
    remote or not in create_image_array's layout."""
    from data_prep.store.shards import decode_shard, is_participant_sharded, shard_key

    if not isinstance(store.path, Path) or not is_participant_sharded(store.images, store.recipe):
        return None
    n, (rows, cols) = int(store.recipe.n_slices), store.recipe.size
    folder = store.path / "images"

    def read(a: int, b: int) -> np.ndarray:
        if b <= a:
            return np.zeros((0, rows, cols), np.uint16)
        shards = []
        for k in range(a // n, (b - 1) // n + 1):
            try:
                shards.append(decode_shard((folder / shard_key(k)).read_bytes(), n, rows, cols))
            except FileNotFoundError:  # a shard never written reads as the fill value, as in zarr
                shards.append(np.zeros((n, rows, cols), np.uint16))
        return np.concatenate(shards)[a - (a // n) * n:b - (a // n) * n]

    return read
