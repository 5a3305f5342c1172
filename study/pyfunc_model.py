"""The registered thigh model as an MLflow pyfunc built from code: series folder in, class out.

    import mlflow
    model = mlflow.pyfunc.load_model("models:/thigh-leg_strength@champion")
    model.predict(pd.DataFrame({"path": ["/scans/volunteer-3/AX_T1"]}))
    #   p_high  predicted  verdict  reasons          n_slices
    #   0.71    high       warn     pixel spacing... 15

This file is what MLflow's models-from-code stores beside the weights (study/model_package.py logs
it): it runs wherever the logged requirements are installed (torch, torchvision, numpy, scipy,
pydicom, pandas, mlflow), with no import of this repository. So it holds its own copies of
  - the network (study/model.py ThighResNet: resnet18, grey -> 3 ImageNet-normalised channels),
    loaded from a `state_dict` with `torch.load(weights_only=True)` (no pickled code);
  - the DICOM reading of data_prep/dicom (series selection by description, localizer and
    orientation; ordering along the slice normal; modality rescale) and the acquisition values
    of data_prep/dicom/acquisition.py;
  - the preprocessing recipe (data_prep/preprocess.py apply_recipe) and the model-input
    conversion (study/data.py central_slices, to_model_input).
tests/study/test_pyfunc_model.py checks these copies against the originals bit for bit.

Input: a DataFrame with `path` (a DICOM folder holding one participant's visit, or a `.npy`
stack already preprocessed by the recipe: uint16 (n, rows, cols)) and optional `sex`
("male"/"female") and `bmi` (kg/m^2) for the stratum check (else read from the header when
there). Params: `strict` (bool): a warning refuses; `series_description`: a regular
expression for the thigh series' description (default: the training cohort's). Output: one row per input row with
`p_high` (mean over slices of P(high)), `predicted` ("high"/"low"; "" when refused),
`verdict` ("accept", "warn", "refuse"), `reasons` ("; "-joined) and `n_slices`.
Nothing in the output or in an error names a file, folder or header identity.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models import resnet18

WEIGHTS_ARTIFACT = "weights"  # artifacts key: torch.save(model.state_dict())
CONFIG_ARTIFACT = "config"  # artifacts key: the JSON made by study/model_package.py
UINT16_MAX = 65535
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AXIAL_MIN_COS = 0.9  # data_prep/dicom/series.py: |normal . z| above which a series is axial
RANGE_RTOL = 0.05  # a numeric acquisition value within 5% of the training range is inside it
VERDICTS = ("accept", "warn", "refuse")
FIELD_NAMES = {  # acquisition field -> words for reasons
    "acq_rows": "matrix rows", "acq_cols": "matrix columns",
    "acq_pixel_spacing_row_mm": "pixel spacing (rows, mm)",
    "acq_pixel_spacing_col_mm": "pixel spacing (columns, mm)",
    "acq_slice_thickness_mm": "slice thickness (mm)", "acq_slice_spacing_mm": "slice spacing (mm)",
    "acq_repetition_time_ms": "TR (ms)", "acq_echo_time_ms": "TE (ms)",
    "acq_field_strength_t": "field strength (T)", "acq_orientation": "orientation",
    "acq_series_description": "series description",
}


class InputRefused(ValueError):
    """An input that cannot be predicted; the message names no file (reason for the row)."""


# --- the network (study/model.py ThighResNet, same state_dict keys) ---------------------------

class ThighNet(nn.Module):
    """resnet18 on one-channel slices in [0, 1], repeated to 3 ImageNet-normalised channels."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.backbone = resnet18(weights=None)
        self.backbone.fc = nn.Linear(self.backbone.fc.in_features, num_classes)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        return self.backbone(x)


# --- preprocessing (data_prep/preprocess.py, float path of apply_recipe) ----------------------

def central_window(n_available: int, k: int) -> slice:
    """The central k of n slices (extra slice, if odd, goes low); InputRefused if n < k."""
    if n_available < k:
        raise InputRefused(f"the series has {n_available} slices, the model needs {k}")
    start = (n_available - k) // 2
    return slice(start, start + k)


def resize_slice(image: np.ndarray, size: tuple[int, int], version: int) -> np.ndarray:
    """data_prep.preprocess.resize_slice: block mean (version 2, whole factors), else Gaussian
    prefilter + linear zoom with pixel-edge alignment."""
    image = np.asarray(image, dtype=np.float64)
    if image.shape == tuple(size):
        return image.copy()
    if version >= 2 and all(image.shape[i] % size[i] == 0 for i in range(2)):
        fr, fc = image.shape[0] // size[0], image.shape[1] // size[1]
        return image.reshape(size[0], fr, size[1], fc).mean(axis=(1, 3))
    from scipy import ndimage

    factors = [image.shape[i] / size[i] for i in range(2)]
    sigma = [max(0.0, (f - 1.0) / 2.0) for f in factors]
    if any(s > 0 for s in sigma):
        image = ndimage.gaussian_filter(image, sigma=sigma, mode="nearest")
    zoom = [size[i] / image.shape[i] for i in range(2)]
    return ndimage.zoom(image, zoom, order=1, mode="nearest", grid_mode=True)


def apply_recipe(volume: np.ndarray, recipe: dict[str, Any]) -> np.ndarray:
    """float32 (n, H, W) modality values -> uint16 (recipe n_slices, rows, cols)."""
    stack = np.asarray(volume)[central_window(len(volume), int(recipe["n_slices"]))]
    if not np.all(np.isfinite(stack)):
        raise InputRefused("the series holds NaN or infinite values")
    lo, hi = (float(v) for v in np.percentile(stack.astype(np.float64),
                                              [recipe["p_low"], recipe["p_high"]]))
    values = stack.astype(np.float64)
    scaled = (np.clip(values, lo, hi) - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    size = tuple(int(v) for v in recipe["size"])
    out = np.empty((len(stack), *size), dtype=np.uint16)
    for i, image in enumerate(scaled):
        resized = resize_slice(image, size, int(recipe.get("version", 1)))
        out[i] = np.rint(np.clip(resized, 0.0, 1.0) * UINT16_MAX).astype(np.uint16)
    return out


def model_input(images: np.ndarray, slices_per_subject: int | None,
                input_size: list[int] | None) -> torch.Tensor:
    """study.data central_slices + to_model_input: uint16 -> float32 (k, 1, h, w) in [0, 1]."""
    if slices_per_subject is not None:
        images = images[central_window(len(images), int(slices_per_subject))]
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1) / 65535.0
    if input_size and tuple(input_size) != tuple(images.shape[1:]):
        x = F.interpolate(x, size=tuple(int(s) for s in input_size), mode="bilinear",
                          antialias=True, align_corners=False).clamp_(0.0, 1.0)
    return x.contiguous()


# --- DICOM (data_prep/dicom: series.py selection, volume.py ordering, acquisition.py) -----------

def orientation_text(cosines) -> str:
    """Six direction cosines as "1.000,0.000,0.000,0.000,1.000,0.000" (no negative zero)."""
    return ",".join(f"{round(float(v), 3) + 0.0:.3f}" for v in cosines)


def _number(ds, keyword: str) -> float | None:
    value = ds.get(keyword)
    if value in (None, ""):
        return None
    try:
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0]
        return float(value)
    except (TypeError, ValueError):
        return None


def _series_of(files: list[Path]) -> tuple[dict[str, list], int]:
    """{SeriesInstanceUID: [(path, dataset)]} of the image files; count of unreadable files."""
    import pydicom

    series: dict[str, list] = {}
    unreadable = 0
    for path in sorted(files):
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # noqa: BLE001 - not DICOM or truncated: counted, never named
            unreadable += 1
            continue
        if "PixelData" not in ds or "ImagePositionPatient" not in ds:
            continue
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
    return series, unreadable


def _normal(ds) -> np.ndarray | None:
    cos = ds.get("ImageOrientationPatient")
    if not cos or len(cos) != 6:
        return None
    n = np.cross(np.asarray(cos[:3], float), np.asarray(cos[3:], float))
    return n / np.linalg.norm(n)


def read_series(source: Path | list[Path], patterns: list[str]
                ) -> tuple[np.ndarray, dict[str, Any], dict, list[str]]:
    """The axial thigh series under a folder (or among files) -> (float32 volume along the normal, acquisition
    values, header facts {"sex", "bmi"} for the stratum check, warnings). Raises InputRefused.

    The series is chosen as ingest chooses it (data_prep/dicom/series.py): no localizer, axial,
    description matching `patterns`, then most files and highest SeriesNumber. When no
    description matches but exactly one axial image series is there, that one is used with a
    warning (another site's protocol name for the same series).
    """
    paths = sorted(p for p in source.rglob("*") if p.is_file()) if isinstance(source, Path) else list(source)
    groups, unreadable = _series_of(paths)
    regexes = [re.compile(p, re.IGNORECASE) for p in patterns]
    axial, candidates = [], []
    warnings = [f"{unreadable} file(s) that are not readable DICOM were skipped"] if unreadable else []
    for group in groups.values():
        first = group[0][1]
        image_type = [str(v).upper() for v in (first.get("ImageType") or [])]
        normal = _normal(first)
        if "LOCALIZER" in image_type or normal is None or abs(normal[2]) < AXIAL_MIN_COS:
            continue
        axial.append(group)
        if any(r.search(str(first.get("SeriesDescription", ""))) for r in regexes):
            candidates.append(group)
    if not candidates and len(axial) == 1:
        candidates = axial
        warnings.append(f"series description matches none of {patterns}; the only axial series was used")
    if not candidates:
        raise InputRefused(f"no axial series whose description matches {patterns} "
                           f"among {len(groups)} image series ({len(axial)} axial)")
    files = max(candidates, key=lambda f: (len(f), int(f[0][1].get("SeriesNumber") or 0)))
    first = files[0][1]
    normal = _normal(first)
    proj = np.array([np.asarray(ds.ImagePositionPatient, float) @ normal for _, ds in files])
    order = np.argsort(proj, kind="stable")
    shapes = {(int(ds.Rows), int(ds.Columns)) for _, ds in files}
    if len(shapes) > 1:
        raise InputRefused(f"the slices of the series differ in size: {sorted(shapes)}")
    volume = np.empty((len(files), *shapes.pop()), np.float32)
    for i, k in enumerate(order):
        ds = files[k][1]
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - codec missing, corrupt data
            raise InputRefused(f"pixel data cannot be decoded ({type(exc).__name__})") from None
        volume[i] = pixels
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        if slope != 1.0 or intercept != 0.0:  # float32 arithmetic, as data_prep's load_volume
            volume[i] *= np.float32(slope)
            volume[i] += np.float32(intercept)
    gaps = np.diff(proj[order])
    if len(gaps) and np.any(gaps < 1e-3):
        raise InputRefused("two or more slices share the same position")
    if len(gaps) and np.any(np.abs(gaps - np.median(gaps)) > 0.05 * np.median(gaps)):  # as volume.py
        raise InputRefused("uneven slice spacing (a missing slice or mixed stacks)")
    spacing = first.get("PixelSpacing")
    spacing = [float(v) for v in spacing] if spacing and len(spacing) == 2 else [None, None]
    acq = {
        "acq_rows": float(volume.shape[1]), "acq_cols": float(volume.shape[2]),
        "acq_pixel_spacing_row_mm": spacing[0], "acq_pixel_spacing_col_mm": spacing[1],
        "acq_slice_thickness_mm": _number(first, "SliceThickness"),
        "acq_slice_spacing_mm": float(np.median(gaps)) if len(gaps) else None,
        "acq_repetition_time_ms": _number(first, "RepetitionTime"),
        "acq_echo_time_ms": _number(first, "EchoTime"),
        "acq_field_strength_t": _number(first, "MagneticFieldStrength"),
        "acq_orientation": orientation_text(first.ImageOrientationPatient),
        "acq_series_description": str(first.get("SeriesDescription", "")) or None,
    }
    sex = {"M": "male", "F": "female"}.get(str(first.get("PatientSex", "")).strip().upper())
    height, weight = _number(first, "PatientSize"), _number(first, "PatientWeight")
    bmi = weight / height ** 2 if height and weight and height > 0.5 else None
    return volume, acq, {"sex": sex, "bmi": bmi}, warnings


# --- checks against the training data ---------------------------------------------------------

def _fmt(v: float) -> str:
    return f"{v:.4g}"


def check_acquisition(acq: dict[str, Any], training: dict[str, Any]) -> list[str]:
    """Warnings where a series' acquisition lies outside the training subjects' values.

    `training` is the config's "acquisition": {"numeric": {field: {"min", "max"}},
    "categorical": {field: [values]}}; fields the training store did not record are skipped,
    and a model with none recorded (an older store) gets one warning saying so.
    """
    if not training.get("n_recorded", 1):  # a store built before ingest recorded acquisitions
        return ["the model's training acquisitions were not recorded: protocol not checked"]
    warnings = []
    for field, rng in (training.get("numeric") or {}).items():
        value = acq.get(field)
        if rng is None or rng.get("min") is None:
            continue
        name = FIELD_NAMES.get(field, field)
        if value is None:
            warnings.append(f"{name} missing from the header (training {_fmt(rng['min'])}-{_fmt(rng['max'])})")
            continue
        lo, hi = rng["min"], rng["max"]
        if value < lo - RANGE_RTOL * abs(lo) or value > hi + RANGE_RTOL * abs(hi):
            warnings.append(f"{name} {_fmt(value)} outside training range {_fmt(lo)}-{_fmt(hi)}")
    for field, values in (training.get("categorical") or {}).items():
        if not values:
            continue
        value = acq.get(field)
        if value not in values:
            shown = value if field == "acq_orientation" else "differs"
            warnings.append(f"{FIELD_NAMES.get(field, field)} {shown} not among the training "
                            f"series ({', '.join(map(str, values[:3]))})")
    return warnings


def check_stratum(sex: str | None, bmi: float | None, stratum: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(refusals, warnings) for a participant against the model's stratum {"sex", "bmi": [lo, hi)}."""
    refusals, warnings = [], []
    want_sex = stratum.get("sex")
    if want_sex not in (None, "all"):
        if sex is None:
            warnings.append(f"sex unknown: the model was trained on {want_sex} participants only")
        elif sex != want_sex:
            refusals.append(f"sex outside the model's stratum (trained on {want_sex} only)")
    bounds = stratum.get("bmi")
    if bounds:
        lo, hi = (-math.inf if bounds[0] is None else bounds[0]), (math.inf if bounds[1] is None else bounds[1])
        if bmi is None or not math.isfinite(bmi):
            warnings.append(f"BMI unknown: the model was trained on BMI {stratum.get('bmi_label')} only")
        elif not lo <= bmi < hi:
            refusals.append(f"BMI outside the model's stratum (trained on BMI {stratum.get('bmi_label')} only)")
    return refusals, warnings


def verdict(refusals: list[str], warnings: list[str], strict: bool) -> str:
    """refuse on any refusal (or any warning with strict), else warn on a warning, else accept."""
    if refusals or (strict and warnings):
        return "refuse"
    return "warn" if warnings else "accept"


def _sex(value: str | None) -> str | None:
    """"M"/"male"/... -> "male"/"female"; None when unknown."""
    v = (value or "").strip().lower()
    return {"m": "male", "male": "male", "f": "female", "female": "female"}.get(v)


# --- the pyfunc -------------------------------------------------------------------------------

class ThighModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: reads, checks, preprocesses and classifies each input row."""

    def load_context(self, context) -> None:
        self.config = json.loads(Path(context.artifacts[CONFIG_ARTIFACT]).read_text())
        state = torch.load(context.artifacts[WEIGHTS_ARTIFACT], map_location="cpu", weights_only=True)
        self.net = ThighNet(num_classes=len(self.config["classes"]))
        self.net.load_state_dict(state, strict=True)
        self.net.eval()

    def predict_one(self, source: str | list[Path], sex: str | None, bmi: float | None, strict: bool,
                    patterns: list[str] | None = None) -> dict[str, Any]:
        """One participant: `source` a folder, a .npy stack, or the participant's files."""
        cfg = self.config
        refusals, warnings, images = [], [], None
        try:
            target = Path(source) if isinstance(source, (str, Path)) else None
            if target is not None and target.suffix == ".npy" and target.is_file():
                images = np.load(target, allow_pickle=False)
                expected = (int(cfg["recipe"]["n_slices"]), *map(int, cfg["recipe"]["size"]))
                if images.dtype != np.uint16 or images.shape != expected:
                    raise InputRefused(f"a preprocessed stack must be uint16 {expected}, "
                                       f"got {images.dtype} {images.shape}")
                warnings.append("preprocessed stack: acquisition not checked")
            elif target is None or target.is_dir():
                volume, acq, header, found = read_series(target or list(source),
                                                         patterns or cfg["series_description"])
                warnings += found + check_acquisition(acq, cfg.get("acquisition") or {})
                sex = sex or header["sex"]
                bmi = bmi if bmi is not None else header["bmi"]
                images = apply_recipe(volume, cfg["recipe"])
            else:
                raise InputRefused("the path is neither a folder nor a .npy stack")
        except InputRefused as exc:
            refusals.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - any other reading failure: its kind, never a path
            refusals.append(f"the series cannot be read ({type(exc).__name__})")
        stratum_refusals, stratum_warnings = check_stratum(sex, bmi, cfg.get("stratum") or {})
        refusals += stratum_refusals
        warnings += stratum_warnings
        row = {"p_high": float("nan"), "predicted": "", "verdict": verdict(refusals, warnings, strict),
               "reasons": "; ".join(refusals + warnings), "n_slices": 0}
        if images is not None and row["verdict"] != "refuse":
            x = model_input(images, cfg.get("slices_per_subject"), cfg.get("input_size"))
            with torch.no_grad():
                probs = torch.softmax(self.net(x), dim=1)[:, 1].numpy()
            p_high = float(np.mean(probs))  # the evaluation's rule: mean over slices
            row.update(p_high=p_high, n_slices=int(len(probs)),
                       predicted=cfg["classes"][1] if p_high >= cfg.get("threshold", 0.5) else cfg["classes"][0])
        return row

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        strict = bool((params or {}).get("strict", False))
        described = str((params or {}).get("series_description") or "")
        patterns = [described] if described else None  # one regex ("a|b" alternates)
        frame = pd.DataFrame(model_input)
        if "path" not in frame:
            raise ValueError(f"input needs a 'path' column; got columns {list(frame.columns)}")
        rows = []
        for _, r in frame.iterrows():
            sex = r.get("sex") if isinstance(r.get("sex"), str) and r.get("sex") else None
            bmi = r.get("bmi")
            bmi = float(bmi) if bmi is not None and pd.notna(bmi) else None
            rows.append(self.predict_one(str(r["path"]), _sex(sex), bmi, strict, patterns))
        return pd.DataFrame(rows, columns=["p_high", "predicted", "verdict", "reasons", "n_slices"])


mlflow.models.set_model(ThighModel())
