"""How a thigh series was acquired: the protocol values a model's training range is made of.

    from data_prep.dicom.acquisition import read_acquisition
    acq = read_acquisition(series, geometry)   # after load_volume(series)
    acq["acq_repetition_time_ms"], acq["acq_orientation"], ...

Ingest stores these per subject (the `acq_*` columns of the store's subjects table,
ARCHITECTURE.md "Zarr store"); study/model_package.py turns the training subjects' values into
the ranges a registered model carries, and the model (study/pyfunc_model.py, its own copy of
this reading) compares a new series with them before predicting. Values come from the first
file of the series in path order (the protocol is one per series) and from the loaded
geometry; a tag the file lacks is None, never a default (a missing PixelSpacing is not 1 mm).
No PHI: protocol values and the series description only.
"""

from __future__ import annotations

from typing import Any

import pydicom

from data_prep.dicom.series import SeriesInfo, _quiet_pydicom
from data_prep.dicom.volume import Geometry

# The subjects-table columns, in order (floats, then the two strings).
ACQUISITION_FLOAT_FIELDS = (
    "acq_rows", "acq_cols",  # matrix of the acquired (not resized) images
    "acq_pixel_spacing_row_mm", "acq_pixel_spacing_col_mm",  # PixelSpacing as acquired
    "acq_slice_thickness_mm",  # SliceThickness
    "acq_slice_spacing_mm",  # distance between ordered slice positions (the loaded geometry)
    "acq_repetition_time_ms", "acq_echo_time_ms",  # RepetitionTime, EchoTime
    "acq_field_strength_t",  # MagneticFieldStrength
)
ACQUISITION_STRING_FIELDS = (
    "acq_orientation",  # ImageOrientationPatient, six cosines to 3 decimals, comma-separated
    "acq_series_description",  # SeriesDescription
)
ACQUISITION_FIELDS = (*ACQUISITION_FLOAT_FIELDS, *ACQUISITION_STRING_FIELDS)


def orientation_text(cosines) -> str:
    """Six direction cosines as "1.000,0.000,0.000,0.000,1.000,0.000" (no negative zero)."""
    return ",".join(f"{round(float(v), 3) + 0.0:.3f}" for v in cosines)


def _number(ds: Any, keyword: str) -> float | None:
    value = ds.get(keyword)
    if value in (None, ""):
        return None
    try:
        if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            value = value[0]  # e.g. several echo times: the first echo's
        return float(value)
    except (TypeError, ValueError):
        return None


def read_acquisition(series: SeriesInfo, geometry: Geometry) -> dict[str, Any]:
    """The `acq_*` values of a loaded series (see ACQUISITION_FIELDS).

    Args:
        series: the selected thigh series (its files, in path order).
        geometry: what load_volume returned for it (matrix, slice spacing).

    Returns:
        {field: float, str or None}; None where the header lacks the value.
    """
    with _quiet_pydicom():
        ds = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    spacing = ds.get("PixelSpacing")
    spacing = [float(v) for v in spacing] if spacing and len(spacing) == 2 else [None, None]
    orientation = ds.get("ImageOrientationPatient")
    return {
        "acq_rows": float(geometry.shape[1]), "acq_cols": float(geometry.shape[2]),
        "acq_pixel_spacing_row_mm": spacing[0], "acq_pixel_spacing_col_mm": spacing[1],
        "acq_slice_thickness_mm": _number(ds, "SliceThickness"),
        "acq_slice_spacing_mm": float(geometry.slice_spacing) if geometry.shape[0] > 1 else None,
        "acq_repetition_time_ms": _number(ds, "RepetitionTime"),
        "acq_echo_time_ms": _number(ds, "EchoTime"),
        "acq_field_strength_t": _number(ds, "MagneticFieldStrength"),
        "acq_orientation": orientation_text(orientation) if orientation and len(orientation) == 6 else None,
        "acq_series_description": series.description or None,
    }
