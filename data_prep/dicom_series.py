"""Find the axial thigh series in a DICOM tree and load it as an ordered float32 volume.

The only module in the project that imports pydicom. PHI read from headers (PatientID,
names, UIDs) stays in memory in the returned objects; nothing here prints or stores it.

    from data_prep.dicom_series import read_thigh_volume
    volume, geometry, selection = read_thigh_volume("dicom/00m/9000099", ["AX_T1_THIGH"])

Slice order comes from ImagePositionPatient projected on the slice normal
(row direction x column direction), never from file names or InstanceNumber.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

# |cos| between the slice normal and the patient z axis above which a series counts as axial
# (0.9 allows about 25 degrees of oblique tilt, far more than a thigh prescription uses).
AXIAL_MIN_COS = 0.9
# Relative tolerance for "consistent" slice spacing, pixel spacing and orientation.
SPACING_RTOL = 0.05
ORIENTATION_ATOL = 1e-3


class DicomSeriesError(ValueError):
    """A series that cannot be turned into a volume; the message says what and where."""


@dataclass
class SkippedFile:
    path: Path
    reason: str


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
        return any(t.upper() == "LOCALIZER" for t in self.image_type)

    @property
    def is_axial(self) -> bool:
        n = self.normal
        return n is not None and abs(n[2]) >= AXIAL_MIN_COS


@dataclass
class ScanResult:
    series: list[SeriesInfo]
    skipped: list[SkippedFile]


@dataclass
class Selection:
    """Outcome of `select_thigh_series`: the chosen series (or None) and why."""

    series: SeriesInfo | None
    candidates: list[SeriesInfo]
    rejected: list[tuple[SeriesInfo, str]]
    note: str


@dataclass(frozen=True)
class Geometry:
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) in mm
    slice_spacing: float  # mm between consecutive ordered slices
    normal: tuple[float, float, float]
    orientation: tuple[float, ...]
    positions: tuple[float, ...]  # slice positions along the normal, increasing
    shape: tuple[int, int, int]


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


def scan_tree(root: str | os.PathLike) -> ScanResult:
    """Read every file's header under `root` (recursively, any or no extension).

    Files that are not DICOM, or are DICOM without image geometry (e.g. DICOMDIR,
    structured reports), are returned in `skipped` with the reason; scanning goes on.
    """
    root = Path(root)
    by_uid: dict[str, SeriesInfo] = {}
    skipped: list[SkippedFile] = []
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    with _quiet_pydicom():
        _scan_files(paths, by_uid, skipped)
    series = sorted(by_uid.values(), key=lambda s: (s.patient_key, s.series_number or 0, s.uid))
    return ScanResult(series=series, skipped=skipped)


def _scan_files(paths: list[Path], by_uid: dict[str, SeriesInfo],
                skipped: list[SkippedFile]) -> None:
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
            reason = "not a DICOM file" if isinstance(exc, InvalidDicomError) else (
                f"unreadable DICOM header ({type(exc).__name__})")
            skipped.append(SkippedFile(path, reason))
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid or "ImagePositionPatient" not in ds:
            skipped.append(SkippedFile(path, "DICOM without series UID or image position"))
            continue
        info = by_uid.get(uid)
        if info is None:
            orientation = ds.get("ImageOrientationPatient")
            number = ds.get("SeriesNumber")
            info = SeriesInfo(
                uid=uid,
                description=str(ds.get("SeriesDescription", "") or ""),
                series_number=int(number) if number not in (None, "") else None,
                orientation=tuple(float(v) for v in orientation) if orientation else None,
                image_type=tuple(str(v) for v in (ds.get("ImageType") or ())),
                patient_key=str(ds.get("PatientID", "") or "").strip(),
            )
            by_uid[uid] = info
        info.files.append(path)


def select_thigh_series(
    series: Iterable[SeriesInfo], description_patterns: Sequence[str]
) -> Selection:
    """Pick the axial thigh series among one participant's series.

    A candidate is axial (slice normal within ~25 degrees of the patient z axis), not a
    localizer (ImageType), and its SeriesDescription matches one of `description_patterns`
    (regular expressions, case-insensitive `re.search`). Several candidates (repeats,
    reconstructions): take the one with most files, then the highest SeriesNumber (the
    latest acquisition, usually the repeat after a failed one); the note says so.
    """
    regexes = [re.compile(p, re.IGNORECASE) for p in description_patterns]
    candidates, rejected = [], []
    for s in series:
        if s.is_localizer:
            rejected.append((s, "localizer (ImageType)"))
        elif not s.is_axial:
            rejected.append((s, "not axial (slice normal not along z)"))
        elif not any(r.search(s.description) for r in regexes):
            rejected.append((s, f"description {s.description!r} matches no pattern"))
        else:
            candidates.append(s)
    if not candidates:
        reasons = "; ".join(sorted({r for _, r in rejected})) or "no image series found"
        return Selection(None, [], rejected, f"no axial thigh series ({reasons})")
    ranked = sorted(candidates, key=lambda s: (s.n_files, s.series_number or 0), reverse=True)
    note = "one candidate"
    if len(ranked) > 1:
        note = (f"{len(ranked)} candidates; chose series number {ranked[0].series_number} "
                f"({ranked[0].n_files} files): most files, then highest series number")
    return Selection(ranked[0], ranked, rejected, note)


def load_volume(series: SeriesInfo) -> tuple[np.ndarray, Geometry]:
    """Read the pixel data of `series` into float32 (n, rows, cols) ordered along its normal.

    RescaleSlope/RescaleIntercept are applied per file. Raises DicomSeriesError naming the
    problem when a file has no pixel data, when sizes, pixel spacing or orientation differ
    between files, when two slices share a position, or when slice spacing is uneven.
    """
    if not series.files:
        raise DicomSeriesError("series has no files")
    with _quiet_pydicom():
        slices = [_read_slice(path) for path in series.files]
    return _assemble(slices)


def _read_slice(path: Path) -> dict:
    """One file -> pixels (rescaled float32) and geometry; DicomSeriesError if unusable."""
    name = path.name
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - any read failure is a file problem
        raise DicomSeriesError(f"file {name}: cannot be read ({type(exc).__name__})") from exc
    # A truncated file can come back as a dataset without pixel data and only a warning.
    if "PixelData" not in ds or ds.get("PixelData") in (None, b""):
        raise DicomSeriesError(f"file {name}: no pixel data (truncated or not an image)")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoder errors vary by transfer syntax
        raise DicomSeriesError(
            f"file {name}: pixel data cannot be decoded ({type(exc).__name__}: {exc})"
        ) from exc
    if pixels.ndim != 2:
        raise DicomSeriesError(f"file {name}: expected one 2-D frame, got shape {pixels.shape}")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    orientation = ds.get("ImageOrientationPatient")
    position = ds.get("ImagePositionPatient")
    spacing = ds.get("PixelSpacing")
    if orientation is None or position is None:
        raise DicomSeriesError(f"file {name}: missing ImageOrientationPatient/PositionPatient")
    return {
        "name": name,
        "pixels": pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept),
        "orientation": np.array([float(v) for v in orientation]),
        "position": np.array([float(v) for v in position]),
        "spacing": tuple(float(v) for v in spacing) if spacing else (1.0, 1.0),
    }


def _assemble(slices: list[dict]) -> tuple[np.ndarray, Geometry]:
    ref = slices[0]
    for s in slices[1:]:
        if s["pixels"].shape != ref["pixels"].shape:
            raise DicomSeriesError(
                f"inconsistent image size: {s['name']} is {s['pixels'].shape}, "
                f"{ref['name']} is {ref['pixels'].shape}")
        if not np.allclose(s["orientation"], ref["orientation"], atol=ORIENTATION_ATOL):
            raise DicomSeriesError(
                f"inconsistent orientation: {s['name']} differs from {ref['name']}")
        if not np.allclose(s["spacing"], ref["spacing"], rtol=SPACING_RTOL):
            raise DicomSeriesError(
                f"inconsistent pixel spacing: {s['name']} {s['spacing']} vs {ref['spacing']}")

    row, col = ref["orientation"][:3], ref["orientation"][3:]
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    proj = np.array([float(s["position"] @ normal) for s in slices])
    order = np.argsort(proj, kind="stable")
    proj = proj[order]
    if len(proj) > 1:
        gaps = np.diff(proj)
        if np.any(gaps < 1e-3):
            raise DicomSeriesError("two or more slices share the same position along the normal")
        median = float(np.median(gaps))
        if np.any(np.abs(gaps - median) > SPACING_RTOL * median):
            raise DicomSeriesError(
                f"uneven slice spacing: gaps {np.round(gaps, 3).tolist()} mm "
                "(missing slice or mixed stacks)")
        slice_spacing = median
    else:
        slice_spacing = 0.0
    volume = np.stack([slices[i]["pixels"] for i in order]).astype(np.float32)
    geometry = Geometry(
        pixel_spacing=ref["spacing"],
        slice_spacing=slice_spacing,
        normal=tuple(float(v) for v in normal),
        orientation=tuple(float(v) for v in ref["orientation"]),
        positions=tuple(float(v) for v in proj),
        shape=tuple(int(v) for v in volume.shape),
    )
    return volume, geometry


def read_thigh_volume(
    folder: str | os.PathLike, description_patterns: Sequence[str] = (r"THIGH",)
) -> tuple[np.ndarray, Geometry, Selection]:
    """One participant's folder -> (ordered float32 volume, geometry, selection).

    For prediction on new subjects; pass the cohort spec's description patterns.
    Raises DicomSeriesError when no axial thigh series is found or it cannot be loaded.
    """
    scan = scan_tree(folder)
    selection = select_thigh_series(scan.series, description_patterns)
    if selection.series is None:
        raise DicomSeriesError(f"{Path(folder).name}: {selection.note}")
    volume, geometry = load_volume(selection.series)
    return volume, geometry, selection
