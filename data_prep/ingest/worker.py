"""The ingest workers: one participant (found by header) per job.

    from data_prep.ingest.worker import Job, ordered_results
    for result in ordered_results(jobs, pool):        # jobs: list[Job], in store order
        ...

A job holds one participant's files (data_prep/dicom/participants.py: grouped by PatientID,
in any folders) and the problem files given to it. The worker reads every image file once
(data_prep/dicom/series.py, fast.py), selects and loads the thigh series (volume.py, stored
values), applies the recipe, hashes each slice and, for a sharded store, writes the
participant's shard file into the store's staging folder (store/shards.py), so the builder
only renames it. Results come back in job order with at most 2 x workers jobs in flight
(bounded memory). A result holds PHI (the key) in memory only; the builder turns it into a
pseudonym.
"""

from __future__ import annotations

import ctypes
import itertools
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.dicom.acquisition import read_acquisition
from data_prep.dicom.participants import Participant
from data_prep.dicom.series import DicomSeriesError, scan_tree, select_thigh_series
from data_prep.dicom.volume import load_volume
from data_prep.preprocess import Recipe, apply_recipe
from data_prep.store.schema import slice_digests
from data_prep.store.shards import write_shard


@dataclass
class Job:
    """One participant to ingest. `participant` holds PHI (key, paths): in memory only."""

    participant: Participant
    patterns: list[str]  # the spec's series description regexes
    recipe: Recipe
    staged: Path | None = None  # where to write the shard (StoreWriter.staged_path), or None


@dataclass
class ParticipantResult:
    """What a worker returns for one participant. Holds PHI in memory only."""

    key: str  # the participant's key (PatientID; PHI: in memory only)
    images: np.ndarray | None = None
    stats: dict[str, Any] | None = None
    spacing: tuple[float, float] | None = None  # stored pixel spacing (row, col), mm
    digests: list[str] | None = None  # sha256 per stored slice (hashing off the writer)
    staged: str | None = None  # shard file written by the worker (then images is None)
    acquisition: dict[str, Any] | None = None  # protocol values (dicom/acquisition.py), no PHI
    # problems: reason (one of store.REASONS), detail, file (index into the participant's
    # files in sorted path order, problem files included, or None for the participant),
    # fatal (participant skipped)
    problems: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(p["fatal"] for p in self.problems)


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


def process_participant(participant: Participant, patterns: list[str], recipe: Recipe
                        ) -> ParticipantResult:
    """Read one participant's files, pick and load the thigh series, apply the recipe."""
    images = participant.paths()
    given = {Path(path): (reason, detail) for path, reason, detail in participant.problems}
    index = {p: i for i, p in enumerate(sorted([*images, *given]))}
    result = ParticipantResult(key=participant.key)
    for path, (reason, detail) in sorted(given.items()):
        result.problems.append({"reason": reason, "detail": detail, "file": index[path],
                                "fatal": False})
    root = images[0].parent if images else Path(".")
    scan = scan_tree(root, keep_patterns=patterns, files=images)  # each file read once
    for s in scan.skipped:
        result.problems.append({"reason": s.category, "detail": s.reason,
                                "file": index.get(s.path), "fatal": False})
    selection = select_thigh_series(scan.series, patterns, min_slices=recipe.n_slices)
    if selection.series is None:
        result.problems.append({"reason": selection.reason, "detail": selection.note,
                                "file": None, "fatal": True})
        return result
    if len(selection.candidates) > 1:  # the rule chose one: say which and why
        result.problems.append({"reason": "several_thigh_series", "detail": selection.note,
                                "file": None, "fatal": False})
    series = selection.series
    try:
        volume, geometry = load_volume(series, stored_values=True)
        result.images, result.stats = apply_recipe(volume, recipe, rescale=geometry.rescale)
        result.digests = slice_digests(result.images)
        result.acquisition = read_acquisition(series, geometry)
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


def run_job(job: Job) -> ParticipantResult:
    """One job, run in a worker. With a `staged` path (StoreWriter.staged_path: sharded
    stores) the worker writes the participant's shard file there and returns no images, so
    the main process only renames the file (StoreWriter.add(staged=...))."""
    result = process_participant(job.participant, job.patterns, job.recipe)
    if job.staged is not None and result.images is not None:
        write_shard(result.images, job.staged)
        result.staged, result.images = str(job.staged), None
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


def worker_pool(workers: int) -> ProcessPoolExecutor | None:
    """The process pool of one build (None: work in this process). The builder uses it for
    both the header scan (find_participants) and the participants."""
    if workers <= 1:
        return None
    return ProcessPoolExecutor(max_workers=workers, initializer=_worker_init)


def ordered_results(jobs: list[Job], pool: Executor | None, workers: int = 1
                    ) -> Iterator[ParticipantResult]:
    """Results in job order; at most 2 x workers participants in flight (bounded memory).
    Without a pool, jobs run one by one in this process. Leaving the loop early cancels the
    jobs not started."""
    if pool is None:
        yield from map(run_job, jobs)
        return
    pending: deque = deque()
    it = iter(jobs)
    try:
        for job in itertools.islice(it, 2 * max(1, workers)):
            pending.append(pool.submit(run_job, job))
        while pending:
            result = pending.popleft().result()
            for job in itertools.islice(it, 1):
                pending.append(pool.submit(run_job, job))
            yield result
    finally:
        for future in pending:
            future.cancel()
