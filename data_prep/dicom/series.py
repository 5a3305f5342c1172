"""Find the axial thigh series among a participant's DICOM files (loading it: volume.py).

With volume.py and participants.py, the only modules in the project that import pydicom.
Files in the common format (uncompressed little endian, one greyscale frame) are read by
data_prep/dicom/fast.py, which gives pydicom's values and pixels about 3x cheaper (0.23 vs
0.8 ms per 256x512 slice) and hands anything else back to pydicom. PHI read from headers
(PatientID, names, UIDs) stays in memory in the returned objects; nothing here prints or
stores it.

    from data_prep.dicom.series import scan_tree, select_thigh_series
    scan = scan_tree("dicom/00m/0.C.2/9000099", keep_patterns=["AX_T1_THIGH"])
    selection = select_thigh_series(scan.series, ["AX_T1_THIGH"], min_slices=15)

Every failure carries a category (`DicomSeriesError.reason`, `Selection.rejected` reasons)
so the ingest report can count problems by kind; REASONS lists them. Compressed transfer
syntaxes (JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE, deflate) decode through
pydicom with pylibjpeg + pylibjpeg-libjpeg/-openjpeg/-rle (tests/data_prep/test_decoders.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

import data_prep.dicom.fast as dicom_fast

# |cos| between the slice normal and the patient z axis above which a series counts as axial
# (0.9 allows about 25 degrees of oblique tilt, far more than a thigh prescription uses).
AXIAL_MIN_COS = 0.9
# Relative tolerance for "consistent" slice spacing, pixel spacing and orientation.
SPACING_RTOL = 0.05
ORIENTATION_ATOL = 1e-3
# scan_tree(keep_patterns=...) parses files up to this size whole (pixel bytes included, not
# decoded) and keeps those of matching series, so load_volume need not parse them again.
# Larger files (multi-frame, not a thigh slice) get a header-only read.
MAX_KEPT_FILE_BYTES = 32 * 1024 * 1024


# Problem categories (the same words as data_prep/store/schema.py REASONS, so ingest
# reports count them directly). Series-level rejections in `Selection.rejected` add
# `localizer` and `description_mismatch`, which are normal (other series of the study).
REASONS = {
    "not_dicom": "file is not DICOM",
    "truncated": "file ends early (inside the header or the pixel data)",
    "no_pixel_data": "no (or empty) PixelData element, or DICOM without image geometry",
    "undecodable": "pixel data cannot be decoded (codec missing, data corrupt, colour or "
                   "multi-frame image)",
    "inconsistent_geometry": "size, pixel spacing, orientation or slice positions differ "
                             "between files, or a slice has no position",
    "wrong_orientation": "a series matching the description is not axial (coronal/sagittal)",
    "too_few_slices": "fewer slices than the recipe keeps",
    "no_thigh_series": "no series matches the description patterns",
}
SERIES_REJECTIONS = ("localizer", "description_mismatch", "wrong_orientation", "too_few_slices")


class DicomSeriesError(ValueError):
    """A series that cannot be turned into a volume; the message says what and where.

    `reason` is one of REASONS (a category for reports); the message has the detail.
    """

    def __init__(self, message: str, reason: str = "undecodable") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class SkippedFile:
    path: Path
    reason: str
    category: str = "not_dicom"  # one of REASONS: not_dicom, truncated, no_pixel_data


@dataclass
class SeriesInfo:
    """Header summary of one series (grouped by SeriesInstanceUID). Holds PHI in memory only."""

    uid: str
    description: str
    series_number: int | None
    orientation: tuple[float, ...] | None  # ImageOrientationPatient, 6 values
    image_type: tuple[str, ...]
    patient_key: str  # PatientID = the cohort table key
    files: list[Path] = field(default_factory=list)
    # SeriesDate + SeriesTime (or AcquisitionDate/Time) as "YYYYMMDDHHMMSS.ffffff"; "" unknown
    series_time: str = ""
    # what scan_tree(keep_patterns=...) already read of each file, by path: a whole pydicom
    # Dataset, or (dicom_fast.FastHeader, stored pixels) from the fast reader; load_volume
    # uses (and releases) them instead of reading the files again
    datasets: dict[Path, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_files(self) -> int:
        return len(self.files)

    @property
    def normal(self) -> np.ndarray | None:
        if self.orientation is None or len(self.orientation) != 6:
            return None
        row, col = np.array(self.orientation[:3]), np.array(self.orientation[3:])
        n = np.cross(row, col)
        norm = np.linalg.norm(n)
        return n / norm if norm > 0 else None

    @property
    def is_localizer(self) -> bool:
        return _is_localizer(self.image_type)

    @property
    def is_axial(self) -> bool:
        n = self.normal
        return n is not None and abs(n[2]) >= AXIAL_MIN_COS


def _is_localizer(image_type: Iterable[Any]) -> bool:
    return any(str(t).upper() == "LOCALIZER" for t in image_type)


@dataclass
class ScanResult:
    series: list[SeriesInfo]
    skipped: list[SkippedFile]


@dataclass
class Selection:
    """Outcome of `select_thigh_series`: the chosen series (or None) and why."""

    series: SeriesInfo | None
    candidates: list[SeriesInfo]
    rejected: list[tuple[SeriesInfo, str]]  # (series, one of SERIES_REJECTIONS)
    note: str

    @property
    def reason(self) -> str | None:
        """None when a series was chosen; else the category of the closest miss:
        `too_few_slices` (an axial thigh series, but short), then `wrong_orientation` (a
        thigh series that is not axial), else `no_thigh_series`."""
        if self.series is not None:
            return None
        found = {r for _, r in self.rejected}
        for reason in ("too_few_slices", "wrong_orientation"):
            if reason in found:
                return reason
        return "no_thigh_series"


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings and log records: they quote element values (names, UIDs)."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def list_files(root: str | os.PathLike) -> list[Path]:
    """Every file under `root` (recursively, symlinks followed, each folder once), sorted."""
    found: list[Path] = []
    seen: set[str] = set()
    stack = [os.fspath(root)]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:  # a symlink loop, or two links to one folder
            continue
        seen.add(real)
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir():
                    stack.append(entry.path)
                elif entry.is_file():
                    found.append(Path(entry.path))
    return sorted(found)


def scan_tree(root: str | os.PathLike, keep_patterns: Sequence[str] | None = None, *,
              files: list[Path] | None = None) -> ScanResult:
    """Read every file's header under `root` (recursively, any or no extension).

    Files that are not DICOM, or are DICOM without image geometry (e.g. DICOMDIR,
    structured reports), are returned in `skipped` with the reason; scanning goes on.

    With `keep_patterns` (the description patterns of select_thigh_series), each file is
    parsed whole once and the datasets of non-localizer series whose description matches
    are kept in `SeriesInfo.datasets`, so load_volume reads every file only once.
    `files`: `list_files(root)` when the caller has it already.
    """
    root = Path(root)
    by_uid: dict[str, SeriesInfo] = {}
    skipped: list[SkippedFile] = []
    paths = list_files(root) if files is None else files
    regexes = [re.compile(p, re.IGNORECASE) for p in keep_patterns or ()]
    with _quiet_pydicom():
        _scan_files(paths, by_uid, skipped, regexes)
    series = sorted(by_uid.values(), key=lambda s: (s.patient_key, s.series_number or 0, s.uid))
    return ScanResult(series=series, skipped=skipped)


def _scan_files(paths: list[Path], by_uid: dict[str, SeriesInfo],
                skipped: list[SkippedFile], keep: list[re.Pattern]) -> None:
    def wanted(header: dicom_fast.FastHeader) -> bool:  # pixels of a series load_volume reads
        return not _is_localizer(header.get("ImageType") or ()) and any(
            r.search(header.get("SeriesDescription") or "") for r in keep)

    for path in paths:
        whole = None
        # the common file (uncompressed little endian greyscale) through the fast reader;
        # anything else, and every problem file, through pydicom
        fast = dicom_fast.read_file(path, wanted if keep else None)
        if fast is not None:
            whole = fast if fast[1] is not None else None
            ds = fast[0]
        elif keep and path.stat().st_size <= MAX_KEPT_FILE_BYTES:
            try:
                whole = pydicom.dcmread(path)
            except Exception:  # noqa: BLE001 - the header-only read below classifies it
                whole = None
        try:
            if fast is None:
                ds = whole if whole is not None else pydicom.dcmread(path,
                                                                     stop_before_pixels=True)
        except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
            if isinstance(exc, InvalidDicomError):
                skipped.append(SkippedFile(path, "not a DICOM file", "not_dicom"))
            else:
                skipped.append(SkippedFile(
                    path, f"unreadable DICOM header ({type(exc).__name__})", "truncated"))
            continue
        try:
            uid = str(ds.get("SeriesInstanceUID", "") or "")
            if not uid or "ImagePositionPatient" not in ds:
                skipped.append(SkippedFile(path, "DICOM without series UID or image position",
                                           "no_pixel_data"))
                continue
            info = by_uid.get(uid) or _series_info(ds, uid)
        except Exception as exc:  # noqa: BLE001 - a damaged value (unknown VR, bad number)
            skipped.append(SkippedFile(
                path, f"unreadable DICOM header value ({type(exc).__name__})", "undecodable"))
            continue
        by_uid[uid] = info
        info.files.append(path)
        if whole is not None and not info.is_localizer and any(
                r.search(info.description) for r in keep):
            info.datasets[path] = whole


def _series_info(ds: Any, uid: str) -> SeriesInfo:
    """The series summary from one file's header (a pydicom Dataset or a FastHeader)."""
    orientation = ds.get("ImageOrientationPatient")
    number = ds.get("SeriesNumber")
    return SeriesInfo(
        uid=uid,
        description=str(ds.get("SeriesDescription", "") or ""),
        series_number=int(number) if number not in (None, "") else None,
        orientation=tuple(float(v) for v in orientation) if orientation else None,
        image_type=tuple(str(v) for v in (ds.get("ImageType") or ())),
        patient_key=str(ds.get("PatientID", "") or "").strip(),
        series_time=_series_time(ds),
    )


def _series_time(ds: Any) -> str:
    for date_tag, time_tag in (("SeriesDate", "SeriesTime"),
                               ("AcquisitionDate", "AcquisitionTime")):
        date, time = str(ds.get(date_tag, "") or ""), str(ds.get(time_tag, "") or "")
        if date or time:
            return f"{date:0<8}{time}"
    return ""


def select_thigh_series(
    series: Iterable[SeriesInfo], description_patterns: Sequence[str], *, min_slices: int = 1
) -> Selection:
    """Pick the axial thigh series among one participant's series (one visit).

    A series is rejected, with the first reason that applies, as
    `localizer` (ImageType LOCALIZER), `description_mismatch` (SeriesDescription matches none
    of `description_patterns`: regular expressions, case-insensitive `re.search`),
    `wrong_orientation` (slice normal more than ~25 degrees from the patient z axis: a
    coronal or sagittal series, whatever its description says) or `too_few_slices` (fewer
    files than `min_slices`; pass the recipe's n_slices).

    Several candidates left (a repeat after motion, a reconstruction): the rule is most
    files, then highest SeriesNumber, then latest series time -- the scanner numbers series in
    acquisition order, so a repeat outranks the failed first attempt. The note names the
    chosen series number and the rule; the ingest report keeps it.
    """
    regexes = [re.compile(p, re.IGNORECASE) for p in description_patterns]
    candidates: list[SeriesInfo] = []
    rejected: list[tuple[SeriesInfo, str]] = []
    for s in series:
        if s.is_localizer:
            rejected.append((s, "localizer"))
        elif not any(r.search(s.description) for r in regexes):
            rejected.append((s, "description_mismatch"))
        elif not s.is_axial:
            rejected.append((s, "wrong_orientation"))
        elif s.n_files < min_slices:
            rejected.append((s, "too_few_slices"))
        else:
            candidates.append(s)
    if not candidates:
        counts = Counter(r for _, r in rejected)
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(counts.items()))
        detail = "; ".join(f"series {s.series_number} {_describe_rejection(s, r, min_slices)}"
                           for s, r in rejected)
        note = (f"no axial thigh series ({reasons}; {detail})" if rejected
                else "no axial thigh series (no image series found)")
        return Selection(None, [], rejected, note)
    ranked = sorted(candidates, key=lambda s: (s.n_files, s.series_number or 0, s.series_time),
                    reverse=True)
    note = "one candidate"
    if len(ranked) > 1:
        others = ", ".join(f"{s.series_number} ({s.n_files} files)" for s in ranked[1:])
        note = (f"{len(ranked)} candidates; chose series number {ranked[0].series_number} "
                f"({ranked[0].n_files} files) over {others}: most files, then highest series "
                "number, then latest series time")
    return Selection(ranked[0], ranked, rejected, note)


def _describe_rejection(s: SeriesInfo, reason: str, min_slices: int) -> str:
    if reason == "description_mismatch":
        return f"{reason} ({s.description!r})"
    if reason == "wrong_orientation":
        n = s.normal
        return f"{reason} (normal {None if n is None else (np.round(n, 2) + 0.0).tolist()})"
    if reason == "too_few_slices":
        return f"{reason} ({s.n_files} < {min_slices})"
    return reason
