"""Load a selected thigh series as an ordered volume (series.py finds and selects it).

    from data_prep.dicom.series import scan_tree, select_thigh_series
    from data_prep.dicom.volume import load_volume, read_thigh_volume
    scan = scan_tree("dicom/00m/0.C.2/9000099", keep_patterns=["AX_T1_THIGH"])
    series = select_thigh_series(scan.series, ["AX_T1_THIGH"], min_slices=15).series
    volume, geometry = load_volume(series)            # float32 (n, rows, cols), rescaled
    stored, geometry = load_volume(series, stored_values=True)  # ingest: integers + rescale
    volume, geometry, selection = read_thigh_volume(participant.paths(), ["AX_T1_THIGH"])

Slice order comes from ImagePositionPatient projected on the slice normal (row direction x
column direction), never from file names or InstanceNumber. Files scan_tree already read
(kept pydicom datasets or dicom_fast pixels) are not read again. Every failure is a
DicomSeriesError with a `reason` (series.REASONS). `read_thigh_volume` does find, select
and load in one call for prediction on new participants.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from data_prep.dicom.series import (ORIENTATION_ATOL, SPACING_RTOL, DicomSeriesError,
                                    SeriesInfo, Selection, _quiet_pydicom, scan_tree,
                                    select_thigh_series)
from data_prep.preprocess import rescale_stored


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


def load_volume(series: SeriesInfo, *, stored_values: bool = False
                ) -> tuple[np.ndarray, Geometry]:
    """Read the pixel data of `series` into float32 (n, rows, cols) ordered along its normal.

    RescaleSlope/RescaleIntercept are applied per file. With `stored_values`, a series whose
    files share one rescale (the usual case) comes back as its stored integers instead, with
    that rescale in `Geometry.rescale` (no float copy; `apply_recipe(volume, recipe,
    rescale=geometry.rescale)` gives the float volume's result bit for bit). Raises
    DicomSeriesError with a `reason` from REASONS when a file is truncated, has no pixel
    data, cannot be decoded or is not a single greyscale frame, when sizes, pixel spacing or
    orientation differ between files, when two slices share a position, or when slice
    spacing is uneven.
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
            rescale_stored(s["pixels"], s["slope"], s["intercept"], out=volume[i])
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
    source: str | os.PathLike | Sequence[str | os.PathLike],
    description_patterns: Sequence[str] = (r"THIGH",),
) -> tuple[np.ndarray, Geometry, Selection]:
    """One participant's files -> (ordered float32 volume, geometry, selection).

    For prediction on new participants. `source` is a folder holding only that participant
    or the participant's files (`Participant.paths()` from data_prep.dicom.participants);
    pass the cohort spec's description patterns. Raises DicomSeriesError when no axial
    thigh series is found or it cannot be loaded.
    """
    if isinstance(source, (str, os.PathLike)):
        scan = scan_tree(source, keep_patterns=description_patterns)
    else:
        files = sorted(Path(p) for p in source)
        scan = scan_tree(files[0].parent if files else ".", keep_patterns=description_patterns,
                         files=files)
    selection = select_thigh_series(scan.series, description_patterns)
    if selection.series is None:
        raise DicomSeriesError(selection.note, selection.reason)
    volume, geometry = load_volume(selection.series)
    return volume, geometry, selection
