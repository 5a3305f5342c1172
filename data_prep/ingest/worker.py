"""The ingest workers' side of data_prep/build_store.py: one participant folder per job.

    from data_prep.ingest_worker import ordered_results, process_participant
    for result in ordered_results(jobs, workers=2):   # jobs: (folder, patterns, recipe, staged)
        ...

A job scans the folder (every file read once: data_prep/dicom_series.py, dicom_fast.py),
selects and loads the thigh series (dicom_volume.py, stored values), applies the recipe,
hashes each slice and, for a sharded store, writes the participant's shard file into the
store's staging folder (shards.write_shard), so the builder only renames it. Results come
back in job order with at most 2 x workers jobs in flight (bounded memory). A result holds
PHI (folder name, PatientIDs) in memory only; the builder turns it into pseudonyms.
"""

from __future__ import annotations

import ctypes
import itertools
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.dicom.series import DicomSeriesError, list_files, scan_tree, select_thigh_series
from data_prep.dicom.volume import load_volume
from data_prep.preprocess import Recipe, apply_recipe
from data_prep.store.schema import slice_digests
from data_prep.store.shards import write_shard


@dataclass
class ParticipantResult:
    """What a worker returns for one participant folder. Holds PHI in memory only."""

    folder: str  # folder name under the DICOM root (PHI: in memory only)
    key: str | None  # PatientID of the chosen series, else None (PHI: in memory only)
    keys_seen: list[str] = field(default_factory=list)  # every PatientID in the folder (PHI)
    images: np.ndarray | None = None
    stats: dict[str, Any] | None = None
    spacing: tuple[float, float] | None = None  # stored pixel spacing (row, col), mm
    digests: list[str] | None = None  # sha256 per stored slice (hashing off the writer)
    staged: str | None = None  # shard file written by the worker (then images is None)
    # problems: reason (one of store.REASONS), detail, file (index into the folder's sorted
    # file list, or None for the participant), fatal (participant skipped)
    problems: list[dict[str, Any]] = field(default_factory=list)


def classify_series_error(message: str) -> str:
    """A reason category (store.REASONS) for an error that carries no `.reason` (e.g. the
    NaN check of apply_recipe); DicomSeriesError and TooFewSlicesError carry one."""
    m = message.lower()
    if "less than expected" in m or "truncat" in m or "cannot be read" in m:
        return "truncated"
    if "no pixel data" in m:
        return "no_pixel_data"
    if "cannot be decoded" in m or "nan or infinite" in m:
        return "undecodable"
    if "the recipe needs" in m:
        return "too_few_slices"
    return "inconsistent_geometry"  # size, orientation, spacing, positions, frames


def process_participant(folder: Path, patterns: list[str], recipe: Recipe) -> ParticipantResult:
    """Scan one participant's folder, pick and load the thigh series, apply the recipe."""
    files = list_files(folder)
    scan = scan_tree(folder, keep_patterns=patterns, files=files)  # each file read once
    index = {p: i for i, p in enumerate(files)}
    result = ParticipantResult(folder=folder.name, key=None,
                               keys_seen=sorted({s.patient_key for s in scan.series
                                                 if s.patient_key}))
    for s in scan.skipped:
        result.problems.append({"reason": s.category, "detail": s.reason,
                                "file": index.get(s.path), "fatal": False})
    selection = select_thigh_series(scan.series, patterns, min_slices=recipe.n_slices)
    if selection.series is None:
        result.problems.append({"reason": selection.reason, "detail": selection.note,
                                "file": None, "fatal": True})
        return result
    series = selection.series
    result.key = series.patient_key or folder.name
    try:
        volume, geometry = load_volume(series, stored_values=True)
        result.images, result.stats = apply_recipe(volume, recipe, rescale=geometry.rescale)
        result.digests = slice_digests(result.images)
        rows, cols = geometry.shape[1:]
        result.spacing = (geometry.pixel_spacing[0] * rows / recipe.size[0],
                          geometry.pixel_spacing[1] * cols / recipe.size[1])
    except (DicomSeriesError, ValueError) as exc:
        detail, bad_file = str(exc), None
        for path in sorted(series.files, key=lambda p: -len(p.name)):  # names may embed UIDs
            if path.name in detail:
                bad_file = index.get(path) if bad_file is None else bad_file
                detail = detail.replace(path.name, f"file#{index.get(path)}")
        reason = getattr(exc, "reason", None) or classify_series_error(str(exc))
        result.problems.append({"reason": reason, "detail": detail, "file": bad_file,
                                "fatal": True})
    return result


def run_job(args: tuple[Path, list[str], Recipe, Path | None]) -> ParticipantResult:
    """One job, run in a worker. With a `staged` path (StoreWriter.staged_path: sharded
    stores) the worker writes the participant's shard file there and returns no images, so
    the main process only renames the file (StoreWriter.add(staged=...))."""
    folder, patterns, recipe, staged = args
    result = process_participant(folder, patterns, recipe)
    if staged is not None and result.images is not None:
        write_shard(result.images, staged)
        result.staged, result.images = str(staged), None
    return result


def _worker_init() -> None:
    """Ingest worker setup: let glibc keep freed large buffers for the next participant.

    By default each slice-sized buffer (>= 128 KiB) is a fresh mmap that page-faults on
    first touch and is returned to the OS when freed: about 1 ms per 4 MiB stack on a small
    VM, i.e. 10-20% of a participant's work. Raising the mmap and trim thresholds keeps a
    worker's heap at its high-water mark (a few tens of MiB) instead. No effect (and no
    harm) without glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def ordered_results(jobs: list[tuple], workers: int) -> Iterator[ParticipantResult]:
    """Results in job order; at most 2 x workers participants in flight (bounded memory)."""
    if workers <= 1:
        yield from map(run_job, jobs)
        return
    window = 2 * workers
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_worker_init)
    try:
        pending: deque = deque()
        it = iter(jobs)
        for job in itertools.islice(it, window):
            pending.append(pool.submit(run_job, job))
        while pending:
            result = pending.popleft().result()
            for job in itertools.islice(it, 1):
                pending.append(pool.submit(run_job, job))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
