"""Body-size baseline ("size+age"): does imaging add anything beyond BMI, sex, age and thigh areas?

Usage::

    from study.body_size import size_baseline, size_comparison, thigh_areas

    areas = thigh_areas(store, rows)                  # muscle / fat / total area per subject
    size = size_baseline(store, ctx.split, ctx.labels, seed=0)
    size["acc"], size["acc_ci_low"], size["auroc"]    # study.metrics.summarize keys
    cmp = size_comparison(y_test, cnn_probs, size["test_probs"], seed=0)
    cmp["cnn_minus_size_age_acc"], cmp["cnn_minus_size_age_auroc"], cmp["cnn_minus_size_age_auroc_p"]

Age is a feature because MRI encodes it too (fat infiltration of muscle rises with age, and
strength falls with it): a CNN that only read age off the image must not look like imaging
adding something. The baseline is named for what it holds, "size+age" (metric prefix
`size_age_`, SIZE_MODEL_NAME).

Areas come from intensity thresholds of the stored images, which the recipe already scaled
to 0..1 between the series' 0.5th and 99.5th percentiles: air is near 0, and the brightest
tissue, fat (T1 relative signal ~0.74), sits near 1, so muscle (~0.25) lands near 0.3-0.35
(DOMAIN.md "Tissue appearance"). Fixed fractions of that range are therefore enough; no
per-image fitting. On the synthetic phantom every area correlates with the truth at r > 0.99
(tests/study/test_body_size.py).
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from study import size_cache

# Stored intensity (0..1 of the recipe's window) below which a pixel is air: halfway between
# air (~0) and muscle (~0.3). Above T_FAT a pixel is fat: halfway between muscle and fat (~0.9).
T_BACKGROUND = 0.15
T_FAT = 0.6
# what the cached areas were measured with (study/size_cache.py key): bump AREAS_VERSION when
# tissue_masks or pixel_areas change
AREAS_VERSION = 1
AREAS_CODE = f"areas v{AREAS_VERSION}; T_BACKGROUND={T_BACKGROUND}; T_FAT={T_FAT}"
FEATURES = ("bmi", "sex", "age", "muscle_area", "fat_area", "total_area")
SIZE_MODEL_NAME = "size+age"  # what the baseline holds; MLflow metric keys use METRIC_PREFIX
METRIC_PREFIX = "size_age_"
SPACING_COLUMNS = ("pixel_spacing_row_mm", "pixel_spacing_col_mm")
# the size model sees no hyperparameter search, so the CNN's selection partition is fair to use
DEFAULT_FIT_ON = ("train", "val")
CS = np.logspace(-2, 3, 11)  # inverse L2 strengths tried by the inner cross-validation
CV_FOLDS = 5


def _l2_cv_args() -> dict[str, Any]:
    """LogisticRegressionCV arguments for plain L2 in this scikit-learn, without its warnings:
    from 1.8 an L2 path is asked for as l1_ratios=(0,) and attributes lose the legacy shape;
    older releases have neither argument (L2 is their default)."""
    params = inspect.signature(LogisticRegressionCV).parameters
    args: dict[str, Any] = {}
    if "use_legacy_attributes" in params:
        args["use_legacy_attributes"] = False
    if isinstance(params["l1_ratios"].default, str):  # the "warn" sentinel: None is deprecated
        args["l1_ratios"] = (0.0,)
    return args


_L2_CV_ARGS = _l2_cv_args()

# in-plane 4-connectivity, nothing across slices: each slice is filled / eroded on its own
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def tissue_masks(images: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean tissue masks of stored slices, each (n, rows, cols).

    Args:
        images: uint16 store slices (n, rows, cols), or floats already in [0, 1].

    Returns:
        thigh: everything inside the skin (holes such as the dark femoral cortex filled).
        muscle: mid-intensity pixels not on the thigh's outer edge (edge pixels are air/fat
            partial volumes that would otherwise read as muscle).
        fat: bright pixels in the thigh: subcutaneous and intermuscular fat, plus the marrow,
            which T1 intensity alone cannot tell from fat.
        periphery: the thigh outside the muscle compartment (the compartment = the muscle
            mask with its holes filled), i.e. subcutaneous fat and skin.
    """
    v = np.asarray(images)
    if v.ndim == 2:
        v = v[None]
    if v.ndim != 3:
        raise ValueError(f"tissue_masks expects (n, rows, cols) slices, got shape {v.shape}")
    v = v.astype(np.float32) / 65535.0 if v.dtype == np.uint16 else v.astype(np.float32)
    thigh = ndimage.binary_fill_holes(v > T_BACKGROUND, structure=_IN_PLANE)
    inner = ndimage.binary_erosion(thigh, structure=_IN_PLANE)
    muscle = inner & (v < T_FAT)
    fat = thigh & (v >= T_FAT)
    compartment = ndimage.binary_fill_holes(
        ndimage.binary_closing(muscle, structure=_IN_PLANE), structure=_IN_PLANE)
    return {"thigh": thigh, "muscle": muscle, "fat": fat, "periphery": thigh & ~compartment}


def _pixel_area_cm2(subjects: pd.DataFrame, rows: np.ndarray,
                    pixel_spacing_mm: tuple[float, float] | None) -> tuple[np.ndarray, str]:
    """cm² per stored pixel for each row, or 1.0 each and unit "px" when spacing is unknown."""
    if pixel_spacing_mm is not None:
        return np.full(rows.size, pixel_spacing_mm[0] * pixel_spacing_mm[1] / 100.0), "cm2"
    if all(c in subjects.columns for c in SPACING_COLUMNS):
        dr, dc = (subjects[c].to_numpy(dtype=float, na_value=np.nan)[rows] for c in SPACING_COLUMNS)
        if np.isfinite(dr).all() and np.isfinite(dc).all():
            return dr * dc / 100.0, "cm2"
    return np.ones(rows.size), "px"


def thigh_areas(store: Any, rows: np.ndarray, *, pixel_spacing_mm: tuple[float, float] | None = None,
                cache: bool = True) -> pd.DataFrame:
    """Muscle, fat and total thigh cross-sectional area of each subject.

    Each area is the mean over all of the subject's stored slices (more robust than the
    central slice alone, and what "mid-thigh area" in the 15-slice OAI stack means) of the
    whole slice, i.e. both thighs together when both are imaged.

    Args:
        store: opened store (``.images``, ``.subjects``, ``.content_hash``).
        rows: store rows of the subjects.
        pixel_spacing_mm: (row, col) spacing of the *stored* pixels; default: the subjects
            table's pixel_spacing_row_mm / pixel_spacing_col_mm columns when present (read as
            the spacing of the stored, resized pixels), else areas stay in pixels.
        cache: take the pixel areas from the node's table of every subject of this store
            (study/size_cache.py: measured once per store and AREAS_CODE, the same numbers);
            False measures `rows` now.

    Returns:
        DataFrame indexed by store row with muscle_area, fat_area, total_area; ``df.attrs
        ["unit"]`` is "cm2" or "px".
    """
    rows = np.asarray(rows, dtype=np.int64)
    if cache and store.content_hash:
        every = np.arange(len(store.subjects))
        pixels = size_cache.cached_subject_table(store, "areas", AREAS_CODE,
                                                 lambda: pixel_areas(store, every))[rows]
    else:
        pixels = pixel_areas(store, rows)
    scale, unit = _pixel_area_cm2(store.subjects, rows, pixel_spacing_mm)
    df = pd.DataFrame(pixels * scale[:, None], index=pd.Index(rows, name="row"),
                      columns=["muscle_area", "fat_area", "total_area"])
    df.attrs["unit"] = unit
    return df


def pixel_areas(store: Any, rows: np.ndarray) -> np.ndarray:
    """float64 (len(rows), 3): mean muscle, fat and thigh pixels per stored slice of each row.

    Subjects are measured a batch at a time (size_cache.subject_blocks): tissue_masks works
    slice by slice (_IN_PLANE), so a batch gives each slice the masks it gets alone.
    """
    rows = np.asarray(rows, dtype=np.int64)
    out = np.zeros((rows.size, 3))
    done = 0
    for batch, images, counts in size_cache.subject_blocks(store, rows):
        if images.shape[0]:
            masks = tissue_masks(images)
            per_slice = np.stack([masks[k].sum(axis=(1, 2)) for k in ("muscle", "fat", "thigh")], axis=1)
            bounds = np.concatenate([[0], np.cumsum(counts)])
            for j in range(batch.size):
                out[done + j] = per_slice[bounds[j]:bounds[j + 1]].sum(axis=0) / max(1, int(counts[j]))
        done += batch.size
    return out


def size_features(store: Any, rows: np.ndarray, areas: pd.DataFrame | None = None) -> pd.DataFrame:
    """FEATURES per subject: BMI (NaN if missing), sex (1 = male, 0 = female, NaN unknown), age
    in years (NaN if missing), areas."""
    rows = np.asarray(rows, dtype=np.int64)
    areas = thigh_areas(store, rows) if areas is None else areas.loc[rows]
    subjects = store.subjects.iloc[rows]
    sex = subjects["sex"].map({"male": 1.0, "female": 0.0}).to_numpy(dtype=float, na_value=np.nan)
    age = (subjects["age"].to_numpy(dtype=float, na_value=np.nan) if "age" in subjects
           else np.full(rows.size, np.nan))
    df = pd.DataFrame({"bmi": subjects["bmi"].to_numpy(dtype=float, na_value=np.nan), "sex": sex, "age": age},
                      index=pd.Index(rows, name="row"))
    df = df.join(areas[["muscle_area", "fat_area", "total_area"]])
    df.attrs["unit"] = areas.attrs.get("unit", "px")
    return df[list(FEATURES)]


def fit_size_baseline(features_train: pd.DataFrame | np.ndarray, y_train: np.ndarray) -> Pipeline:
    """Logistic regression of the label on standardised body-size features.

    Missing values (BMI, sex, age) are imputed with the training median (for 0/1 sex: the majority
    sex), inside the pipeline so that test subjects get the training values. The L2 strength is
    chosen by stratified k-fold cross-validation (log loss) inside the training subjects: area,
    sex and BMI are strongly collinear, and a fixed strong penalty spreads the weight over them
    and underfits small cells, which would flatter the CNN.

    Raises:
        ValueError: y_train holds a single class.
    """
    y_train = np.asarray(y_train, dtype=np.int64)
    if np.unique(y_train).size < 2:
        raise ValueError(f"size baseline needs both classes in its training labels, got only {np.unique(y_train)}")
    folds = int(min(CV_FOLDS, np.bincount(y_train).min()))
    head = (LogisticRegressionCV(Cs=CS, cv=folds, scoring="neg_log_loss", max_iter=1000,
                                 **_L2_CV_ARGS) if folds >= 2
            else LogisticRegression(C=1.0, max_iter=1000))  # a class with one subject: no CV
    model = make_pipeline(SimpleImputer(strategy="median"), StandardScaler(), head)
    return model.fit(np.asarray(features_train, dtype=float), y_train)


def size_baseline(store: Any, split: dict[str, np.ndarray], labels: dict[str, np.ndarray], *,
                  seed: int = 0, fit_on: tuple[str, ...] = DEFAULT_FIT_ON, n_boot: int = 2000,
                  pixel_spacing_mm: tuple[float, float] | None = None) -> dict[str, Any]:
    """Fit the size model on ``fit_on`` partitions and evaluate it on the test subjects.

    Default fit_on is train + val: the CNN used val only to select a trial, and the size model
    has no hyperparameters, so giving it val too is fair (and makes "CNN beats size" harder).
    The majority-class baseline inside the summary uses the *train* labels, as for the CNN.

    Returns:
        The study.metrics.summarize keys (acc, acc_ci_low, ..., baseline_acc, vs_baseline_p), plus
        "test_rows", "test_probs" (arrays aligned with split["test"]), "fit_on", "unit",
        "coef" ({feature: standardised coefficient}) and "C" (the chosen inverse L2 strength).
    """
    from study.metrics import summarize

    unknown = [p for p in (*fit_on, "test") if p not in split or p not in labels]
    if unknown:
        raise ValueError(f"partitions {unknown} missing from split/labels; have {sorted(split)}")
    fit_rows = np.concatenate([np.asarray(split[p], dtype=np.int64) for p in fit_on])
    y_fit = np.concatenate([np.asarray(labels[p], dtype=np.int64) for p in fit_on])
    test_rows = np.asarray(split["test"], dtype=np.int64)
    all_rows = np.concatenate([fit_rows, test_rows])
    areas = thigh_areas(store, np.unique(all_rows), pixel_spacing_mm=pixel_spacing_mm)
    model = fit_size_baseline(size_features(store, fit_rows, areas), y_fit)
    probs = model.predict_proba(size_features(store, test_rows, areas).to_numpy(dtype=float))[:, 1]
    out: dict[str, Any] = summarize(labels["test"], probs, train_labels=labels["train"], seed=seed, n_boot=n_boot)
    imputer, lr = model.named_steps["simpleimputer"], model.steps[-1][1]
    kept = [f for f, keep in zip(FEATURES, ~np.isnan(imputer.statistics_)) if keep]
    out.update(test_rows=test_rows, test_probs=probs, fit_on="+".join(fit_on), unit=areas.attrs["unit"],
               coef=dict(zip(kept, lr.coef_[0].tolist())), C=float(np.ravel(lr.C_)[0]) if hasattr(lr, "C_") else float(lr.C))
    return out


def size_comparison(y_true: np.ndarray, cnn_probs: np.ndarray, size_probs: np.ndarray, *,
                    n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict[str, float]:
    """CNN minus the size+age model on the same test subjects: accuracy and AUROC differences.

    Two-sided tests (exact McNemar; DeLong) and paired bootstrap CIs (study/paired.py).

    Returns:
        cnn_minus_size_age_acc, _acc_ci_low, _acc_ci_high, _acc_p, cnn_minus_size_age_auroc,
        _auroc_ci_low, _auroc_ci_high, _auroc_p (all keys start with "cnn_minus_size_age_").
    """
    from study.engine import SUBJECT_THRESHOLD
    from study.paired import accuracy_difference, auroc_difference

    y = np.asarray(y_true).astype(np.int64)
    cnn, size = np.asarray(cnn_probs, float), np.asarray(size_probs, float)
    acc = accuracy_difference((cnn >= SUBJECT_THRESHOLD) == y, (size >= SUBJECT_THRESHOLD) == y,
                              n_boot=n_boot, seed=seed, alpha=alpha)
    roc = auroc_difference(y, cnn, size, n_boot=n_boot, seed=seed, alpha=alpha)
    p = "cnn_minus_size_age_"
    return {f"{p}acc": acc["diff"], f"{p}acc_ci_low": acc["ci_low"], f"{p}acc_ci_high": acc["ci_high"],
            f"{p}acc_p": acc["p"], f"{p}auroc": roc["diff"], f"{p}auroc_ci_low": roc["ci_low"],
            f"{p}auroc_ci_high": roc["ci_high"], f"{p}auroc_p": roc["p"]}
