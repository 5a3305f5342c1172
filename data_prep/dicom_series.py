"""Find the axial thigh series in a DICOM tree and load it as an ordered float32 volume.

The only module in the project that imports pydicom. Files in the common format
(uncompressed little endian, one greyscale frame) are read by data_prep/dicom_fast.py, which
gives pydicom's values and pixels about 3x cheaper (0.23 vs 0.8 ms per 256x512 slice) and
hands anything else back to pydicom. PHI read from headers (PatientID, names, UIDs) stays in
memory in the returned objects; nothing here prints or stores it.

    from data_prep.dicom_series import read_thigh_volume
    volume, geometry, selection = read_thigh_volume("dicom/00m/9000099", ["AX_T1_THIGH"])

Slice order comes from ImagePositionPatient projected on the slice normal
(row direction x column direction), never from file names or InstanceNumber.

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

from data_prep import dicom_fast

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


# Problem categories (the same words as data_prep/store.py REASONS, so ingest reports count
# them directly). Series-level rejections in `Selection.rejected` add `localizer` and
# `description_mismatch`, which are normal (other series of the study), not problems.
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


@dataclass(frozen=True)
class Geometry:
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) in mm
    slice_spacing: float  # mm between consecutive ordered slices
    normal: tuple[float, float, float]
    orientation: tuple[float, ...]
    positions: tuple[float, ...]  # slice positions along the normal, increasing
    shape: tuple[int, int, int]
    # (slope, intercept) still to apply to the volume load_volume returned: the series' own
    # rescale for stored values (stored_values=True), else the identity
    rescale: tuple[float, float] = (1.0, 0.0)


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


def load_volume(series: SeriesInfo, *, stored_values: bool = False
                ) -> tuple[np.ndarray, Geometry]:
    """Read the pixel data of `series` into float32 (n, rows, cols) ordered along its normal.

    RescaleSlope/RescaleIntercept are applied per file. With `stored_values`, a series whose
    files share one rescale (the usual case) comes back as its stored integers instead, with
    that rescale in `Geometry.rescale` (no float copy; `apply_recipe(volume, recipe,
    rescale=geometry.rescale)` gives the float volume's result bit for bit). Raises DicomSeriesError with a `reason` from REASONS when a file is truncated,
    has no pixel data, cannot be decoded or is not a single greyscale frame, when sizes,
    pixel spacing or orientation differ between files, when two slices share a position,
    or when slice spacing is uneven.
    """
    if not series.files:
        raise DicomSeriesError("series has no files", "no_pixel_data")
    with _quiet_pydicom():
        # pop: each kept dataset (pixel bytes) is released once its slice is decoded
        slices = [_read_slice(path, series.datasets.pop(path, None)) for path in series.files]
    return _assemble(slices, stored_values)


# (7FE0,0010) Pixel Data tag as written in little- and big-endian files.
_PIXEL_DATA_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")


def _read_dataset(path: Path, ds: pydicom.Dataset | None = None) -> pydicom.Dataset:
    """Parse `path` (unless `ds`, its whole dataset, was parsed already) and check that it
    has pixel data."""
    name = path.name
    if ds is None:
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError as exc:
            raise DicomSeriesError(f"file {name}: not a DICOM file", "not_dicom") from exc
        except EOFError as exc:
            raise DicomSeriesError(f"file {name}: ends inside the header", "truncated") from exc
        except Exception as exc:  # noqa: BLE001 - any parse failure is a file problem
            raise DicomSeriesError(f"file {name}: cannot be read ({type(exc).__name__})",
                                   "truncated") from exc
    if "PixelData" not in ds:
        # pydicom drops an element whose value runs past the end of the file with only a
        # warning: a Pixel Data tag in the bytes but not in the dataset means truncation.
        with open(path, "rb") as fh:
            raw = fh.read()
        if any(tag in raw for tag in _PIXEL_DATA_TAGS):
            raise DicomSeriesError(f"file {name}: ends inside the pixel data", "truncated")
        raise DicomSeriesError(f"file {name}: no pixel data (not an image)", "no_pixel_data")
    if ds.get("PixelData") in (None, b""):
        raise DicomSeriesError(f"file {name}: pixel data element is empty", "no_pixel_data")
    return ds


def _decode(ds: pydicom.Dataset, name: str) -> np.ndarray:
    try:
        return ds.pixel_array
    except (KeyboardInterrupt, SystemExit):
        raise
    # BaseException: pylibjpeg-rle reports corrupt data as a Rust panic (PanicException),
    # which is not an Exception subclass.
    except BaseException as exc:  # noqa: BLE001 - decoder errors vary by transfer syntax
        text = str(exc)
        reason = "truncated" if "less than expected" in text else "undecodable"
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        syntax_name = getattr(syntax, "name", str(syntax))
        raise DicomSeriesError(
            f"file {name}: pixel data ({syntax_name}) cannot be decoded "
            f"({type(exc).__name__}: {' '.join(text.split())[:400]})", reason) from exc


def decode_file(path: str | os.PathLike) -> np.ndarray:
    """The stored pixel values of one DICOM file (no rescale), through the same checks as
    `load_volume`: raises DicomSeriesError with reason truncated / no_pixel_data /
    undecodable / unreadable instead of crashing or returning an empty image."""
    path = Path(path)
    with _quiet_pydicom():
        return _decode(_read_dataset(path), path.name)


def _read_slice(path: Path, kept: Any = None) -> dict:
    """One file -> stored pixels, rescale and geometry; DicomSeriesError if unusable.

    `kept` is what scan_tree read already: a pydicom Dataset, or (FastHeader, pixels) from
    dicom_fast (a file it reads is a single greyscale frame with pixel data, checked there).
    """
    try:
        return _slice_record(path, kept)
    except DicomSeriesError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged header value (unknown VR, bad number)
        raise DicomSeriesError(f"file {path.name}: unreadable DICOM header value "
                               f"({type(exc).__name__})", "undecodable") from exc


def _slice_record(path: Path, kept: Any) -> dict:
    name = path.name
    if isinstance(kept, tuple):
        ds, pixels = kept
    else:
        ds = _read_dataset(path, kept)
        if int(ds.get("SamplesPerPixel", 1) or 1) > 1:
            raise DicomSeriesError(f"file {name}: {ds.SamplesPerPixel} samples per pixel "
                                   f"({ds.get('PhotometricInterpretation')})", "undecodable")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise DicomSeriesError(f"file {name}: {ds.NumberOfFrames} frames in one file",
                                   "undecodable")
        pixels = _decode(ds, name)
    if pixels.ndim != 2:
        raise DicomSeriesError(f"file {name}: expected one 2-D frame, got shape {pixels.shape}",
                               "undecodable")
    orientation = ds.get("ImageOrientationPatient")
    position = ds.get("ImagePositionPatient")
    spacing = ds.get("PixelSpacing")
    if orientation is None or position is None:
        raise DicomSeriesError(f"file {name}: missing ImageOrientationPatient/PositionPatient",
                               "inconsistent_geometry")
    return {
        "name": name,
        "pixels": pixels,
        "slope": float(ds.get("RescaleSlope", 1) or 1),
        "intercept": float(ds.get("RescaleIntercept", 0) or 0),
        "orientation": np.array([float(v) for v in orientation]),
        "position": np.array([float(v) for v in position]),
        "spacing": tuple(float(v) for v in spacing) if spacing else (1.0, 1.0),
    }


def _rescale(pixels: np.ndarray, slope: float, intercept: float,
             out: np.ndarray | None = None) -> np.ndarray:
    """float32 of stored values x slope + intercept (into `out` when given)."""
    values = out if out is not None else np.empty(pixels.shape, np.float32)
    values[...] = pixels
    if slope != 1.0 or intercept != 0.0:  # x * 1 + 0 == x: skip two passes in the usual case
        values *= np.float32(slope)
        values += np.float32(intercept)
    return values


def _assemble(slices: list[dict], stored_values: bool = False) -> tuple[np.ndarray, Geometry]:
    ref = slices[0]
    for s in slices[1:]:
        if s["pixels"].shape != ref["pixels"].shape:
            raise DicomSeriesError(
                f"inconsistent image size: {s['name']} is {s['pixels'].shape}, "
                f"{ref['name']} is {ref['pixels'].shape}", "inconsistent_geometry")
    # all slices at once (np.isclose's tolerance rule, as np.allclose per slice would)
    orientations = np.array([s["orientation"] for s in slices])
    spacings = np.array([s["spacing"] for s in slices], dtype=np.float64)
    for what, values, tol in (("orientation", orientations, {"atol": ORIENTATION_ATOL}),
                              ("pixel spacing", spacings, {"rtol": SPACING_RTOL})):
        if values.shape[1:] != values[0].shape:  # e.g. 5 orientation values in one file
            raise DicomSeriesError(f"inconsistent {what}: value counts differ",
                                   "inconsistent_geometry")
        bad = ~np.isclose(values, values[0], **tol).all(axis=1)
        if bad.any():
            s = slices[int(np.flatnonzero(bad)[0])]
            detail = (f"{s['name']} differs from {ref['name']}" if what == "orientation"
                      else f"{s['name']} {s['spacing']} vs {ref['spacing']}")
            raise DicomSeriesError(f"inconsistent {what}: {detail}", "inconsistent_geometry")

    row, col = ref["orientation"][:3], ref["orientation"][3:]
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    proj = np.array([s["position"] for s in slices]) @ normal
    order = np.argsort(proj, kind="stable")
    proj = proj[order]
    if len(proj) > 1:
        gaps = np.diff(proj)
        if np.any(gaps < 1e-3):
            raise DicomSeriesError("two or more slices share the same position along the "
                                   "normal", "inconsistent_geometry")
        median = float(np.median(gaps))
        if np.any(np.abs(gaps - median) > SPACING_RTOL * median):
            raise DicomSeriesError(
                f"uneven slice spacing: gaps {np.round(gaps, 3).tolist()} mm "
                "(missing slice or mixed stacks)", "inconsistent_geometry")
        slice_spacing = median
    else:
        slice_spacing = 0.0
    ordered = [slices[i] for i in order]
    rescale = (ref["slope"], ref["intercept"])
    if stored_values and all((s["slope"], s["intercept"]) == rescale
                             and s["pixels"].dtype.kind in "iu" for s in ordered):
        volume = np.stack([s["pixels"] for s in ordered])
    else:
        rescale = (1.0, 0.0)
        volume = np.empty((len(ordered), *ref["pixels"].shape), np.float32)
        for i, s in enumerate(ordered):
            _rescale(s["pixels"], s["slope"], s["intercept"], out=volume[i])
    geometry = Geometry(
        pixel_spacing=ref["spacing"],
        slice_spacing=slice_spacing,
        normal=tuple(float(v) for v in normal),
        orientation=tuple(float(v) for v in ref["orientation"]),
        positions=tuple(float(v) for v in proj),
        shape=tuple(int(v) for v in volume.shape),
        rescale=rescale,
    )
    return volume, geometry


def read_thigh_volume(
    folder: str | os.PathLike, description_patterns: Sequence[str] = (r"THIGH",)
) -> tuple[np.ndarray, Geometry, Selection]:
    """One participant's folder -> (ordered float32 volume, geometry, selection).

    For prediction on new subjects; pass the cohort spec's description patterns.
    Raises DicomSeriesError when no axial thigh series is found or it cannot be loaded.
    """
    scan = scan_tree(folder, keep_patterns=description_patterns)
    selection = select_thigh_series(scan.series, description_patterns)
    if selection.series is None:
        raise DicomSeriesError(f"{Path(folder).name}: {selection.note}", selection.reason)
    volume, geometry = load_volume(selection.series)
    return volume, geometry, selection
