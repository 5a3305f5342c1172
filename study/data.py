"""From a slice store to labelled, subject-split tensors.

Usage::

    from data_prep.store import open_store
    from study import data

    store = open_store("store.zarr")
    rows = data.stratum_rows(store.subjects, cohort="oai", measure="leg_strength", sex="female")
    threshold = data.function_threshold(store.subjects, measure="leg_strength", rows=rows)
    values = store.subjects["leg_strength"].to_numpy()[rows]
    labels = data.high_function_labels(values, direction="higher", threshold=threshold)
    split = data.split_subjects(rows, labels, val=0.1, test=0.1, seed=0)
    train = data.SliceDataset(store, split["train"], labels[np.searchsorted(rows, split["train"])])

Splits are always by subject: slice-level splits put slices of one person on both sides and
inflate accuracy from ~50% to ~96% on random labels (Yagis et al. 2021).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

# Used when a store carries no `.measures` attribute (see ARCHITECTURE.md).
MEASURE_DIRECTIONS = {
    "leg_strength": "higher",
    "gait_speed_short": "higher",
    "gait_400m": "lower",
    "chair_stand": "lower",
}
DIRECTIONS = ("higher", "lower")

# name -> (lower bound inclusive, upper bound exclusive); None = unbounded
BMI_STRATA: dict[str, tuple[float | None, float | None]] = {
    "all": (None, None),
    "<25": (None, 25.0),
    "25-30": (25.0, 30.0),
    ">=30": (30.0, None),
}
SEXES = ("all", "male", "female")

# subjects-table columns that are identifiers or covariates, never a function measure
NON_MEASURE_COLUMNS = ("subject_id", "cohort", "sex", "age", "bmi", "slice_start", "slice_count")


def measure_directions(store: Any) -> dict[str, str]:
    """{measure: "higher"|"lower"} from ``store.measures``, else MEASURE_DIRECTIONS."""
    measures = getattr(store, "measures", None)
    if not measures:
        return dict(MEASURE_DIRECTIONS)
    return {name: spec["direction"] for name, spec in measures.items()}


def _measure_columns(subjects: pd.DataFrame) -> list[str]:
    return [c for c in subjects.columns if c not in NON_MEASURE_COLUMNS]


def stratum_rows(
    subjects: pd.DataFrame, *, cohort: str, measure: str, sex: str = "all", bmi: str = "all"
) -> np.ndarray:
    """Store rows of the subjects in one stratum that have the measure.

    Args:
        subjects: the store's subjects table (row i = store subject i).
        cohort: a value of ``subjects.cohort``, or "all" for every cohort pooled.
        measure: a measure column (e.g. "leg_strength").
        sex: one of SEXES.
        bmi: one of BMI_STRATA; subjects without BMI only count in "all".

    Returns:
        Sorted int64 positions into ``subjects``.

    Raises:
        ValueError: any argument outside its allowed values (all problems listed).
    """
    cohorts = sorted(str(c) for c in subjects["cohort"].dropna().unique())
    measures = _measure_columns(subjects)
    problems = []
    if cohort != "all" and cohort not in cohorts:
        problems.append(f"cohort {cohort!r} is not one of {['all', *cohorts]}")
    if measure not in measures:
        problems.append(f"measure {measure!r} is not one of {measures}")
    if sex not in SEXES:
        problems.append(f"sex {sex!r} is not one of {list(SEXES)}")
    if bmi not in BMI_STRATA:
        problems.append(f"bmi {bmi!r} is not one of {list(BMI_STRATA)}")
    if problems:
        raise ValueError("invalid stratum: " + "; ".join(problems))

    keep = subjects[measure].notna().to_numpy().copy()  # pandas may hand out read-only views
    if cohort != "all":
        keep &= (subjects["cohort"] == cohort).to_numpy()
    if sex != "all":
        keep &= (subjects["sex"] == sex).to_numpy(dtype=bool, na_value=False)
    low, high = BMI_STRATA[bmi]
    if bmi != "all":
        values = subjects["bmi"].to_numpy(dtype=float, na_value=np.nan)
        keep &= ~np.isnan(values)
        if low is not None:
            keep &= values >= low
        if high is not None:
            keep &= values < high
    return np.flatnonzero(keep).astype(np.int64)


def function_threshold(subjects: pd.DataFrame, *, measure: str, rows: np.ndarray) -> float:
    """Median of ``measure`` over ``rows`` (the high/low split point)."""
    if measure not in subjects.columns:
        raise ValueError(f"measure {measure!r} is not one of {_measure_columns(subjects)}")
    values = subjects[measure].to_numpy(dtype=float, na_value=np.nan)[np.asarray(rows)]
    if values.size == 0 or np.isnan(values).any():
        raise ValueError(
            f"cannot take the {measure} median over {values.size} rows with "
            f"{int(np.isnan(values).sum())} missing values; pass rows from stratum_rows"
        )
    return float(np.median(values))


def high_function_labels(values: np.ndarray, *, direction: str, threshold: float) -> np.ndarray:
    """1 = high function (strictly better than threshold in ``direction``), 0 = low.

    A value equal to the threshold (the median itself) counts as low function.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"Invalid direction {direction!r}. Only {', '.join(DIRECTIONS)} are supported.")
    values = np.asarray(values, dtype=float)
    if np.isnan(values).any():
        raise ValueError(f"{int(np.isnan(values).sum())} of {values.size} values are missing")
    better = values > threshold if direction == "higher" else values < threshold
    return better.astype(np.int64)


class LeakageError(ValueError):
    """A subject appears in more than one partition of a split."""


def check_disjoint(split: dict[str, np.ndarray], subject_ids: np.ndarray | None = None) -> None:
    """Raise LeakageError if any store row (or subject id) sits in two partitions.

    Args:
        split: {partition name: store rows}.
        subject_ids: optional array indexed by store row giving the pseudonymous id, which
            catches one person stored under two rows.
    """
    names = list(split)
    problems = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            rows_a, rows_b = np.asarray(split[a]), np.asarray(split[b])
            shared = np.intersect1d(rows_a, rows_b)
            if shared.size:
                problems.append(f"{shared.size} rows in both {a!r} and {b!r} (e.g. {shared[:5].tolist()})")
            if subject_ids is not None:
                ids = np.intersect1d(np.asarray(subject_ids)[rows_a], np.asarray(subject_ids)[rows_b])
                if ids.size:
                    problems.append(
                        f"{ids.size} subject ids in both {a!r} and {b!r} (e.g. {ids[:5].tolist()})"
                    )
    if problems:
        raise LeakageError("subject-level split leaks: " + "; ".join(problems))


def split_subjects(
    rows: np.ndarray,
    labels: np.ndarray,
    *,
    val: float,
    test: float,
    seed: int,
    strata: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Split subjects into "train" / "val" / "test", stratified by label (and strata).

    Partition sizes are round(val * n) and round(test * n) (at least 1 when the fraction is
    positive); test=0 gives an empty "test". Stratification uses label x strata; if a
    combination is too small for that, it falls back to label only, then to unstratified
    (with a warning). Deterministic for a given seed.

    Args:
        rows: store rows of the subjects (one per subject).
        labels: 0/1 label per subject, aligned with rows.
        val: fraction of subjects for validation (model selection), in (0, 1).
        test: fraction for the held-out test set, in [0, 1).
        seed: random seed.
        strata: optional extra stratification key per subject (e.g. sex).

    Returns:
        {"train", "val", "test"} -> sorted int64 store rows.

    Raises:
        ValueError: bad fractions, misaligned arrays, or too few subjects for non-empty parts.
    """
    rows = np.asarray(rows, dtype=np.int64)
    labels = np.asarray(labels)
    n = rows.size
    problems = []
    if labels.shape != rows.shape:
        problems.append(f"labels shape {labels.shape} != rows shape {rows.shape}")
    if strata is not None and np.asarray(strata).shape != rows.shape:
        problems.append(f"strata shape {np.asarray(strata).shape} != rows shape {rows.shape}")
    if np.unique(rows).size != n:
        problems.append(f"rows contain {n - np.unique(rows).size} duplicates")
    if not 0 < val < 1:
        problems.append(f"val must be in (0, 1), got {val}")
    if not 0 <= test < 1:
        problems.append(f"test must be in [0, 1), got {test}")
    if problems:
        raise ValueError("cannot split subjects: " + "; ".join(problems))
    n_val = max(1, round(val * n))
    n_test = max(1, round(test * n)) if test > 0 else 0
    if n - n_val - n_test < 1:
        raise ValueError(
            f"n={n} subjects is too small for val={val} ({n_val}) and test={test} ({n_test}) "
            "with a non-empty train partition"
        )

    keys: list[np.ndarray | None] = [labels.astype(str)]
    if strata is not None:
        keys.insert(0, np.char.add(np.char.add(labels.astype(str), "|"), np.asarray(strata).astype(str)))
    keys.append(None)

    index = np.arange(n)
    for level, key in enumerate(keys):
        try:
            rest, test_idx = (index, index[:0])
            if n_test:
                rest, test_idx = train_test_split(
                    index, test_size=n_test, random_state=seed, stratify=key
                )
            train_idx, val_idx = train_test_split(
                rest, test_size=n_val, random_state=seed + 1,
                stratify=None if key is None else key[rest],
            )
        except ValueError:
            continue
        if level > 0:
            what = "label" if key is not None else "nothing"
            warnings.warn(f"a stratum was too small for the requested split of n={n}; stratified by {what}")
        break
    split = {
        "train": np.sort(rows[train_idx]),
        "val": np.sort(rows[val_idx]),
        "test": np.sort(rows[test_idx]),
    }
    check_disjoint(split)
    return split


def to_model_input(images: np.ndarray, input_size: tuple[int, int] | None = None) -> torch.Tensor:
    """uint16 slices (n, H, W) -> float32 (n, 1, h, w) in [0, 1], optionally resized.

    The one conversion used for training and for prediction on new scans. Resizing is bilinear
    with antialiasing (a plain bilinear downsample would alias the fine fat/muscle texture).

    Args:
        images: uint16 array (n, H, W) as stored (0..65535 = the recipe's clipped range).
        input_size: (h, w) for the model, or None to keep (H, W).
    """
    images = np.asarray(images)
    if images.dtype != np.uint16 or images.ndim != 3:
        raise ValueError(
            f"to_model_input expects uint16 (n, H, W) store slices, got {images.dtype} {images.shape}"
        )
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1) / 65535.0
    if input_size is not None and tuple(input_size) != tuple(images.shape[1:]):
        h, w = (int(s) for s in input_size)
        if h < 1 or w < 1:
            raise ValueError(f"input_size must be two positive ints, got {input_size}")
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        x = x.clamp_(0.0, 1.0)
    return x.contiguous()


def central_slices(n: int, k: int | None) -> np.ndarray:
    """Positions of the central k of n slices (all n when k is None)."""
    if k is None:
        return np.arange(n)
    if not 1 <= k <= n:
        raise ValueError(f"cannot take the central {k} of {n} slices; k must be in 1..{n} or None")
    start = (n - k) // 2
    return np.arange(start, start + k)


class SliceDataset(torch.utils.data.Dataset):
    """Slices of the selected subjects, loaded once into memory.

    Each item is ``(x, label, row)``: x float32 (1, h, w) in [0, 1], label int64 of its
    subject, row int64 = the subject's store row (for subject-level aggregation).
    Memory: 4 * n_slices * h * w bytes (3,500 subjects x 15 slices at 128x256: 1.8 GB).

    Args:
        store: object with ``.images`` (n_slices_total, H, W) uint16 and ``.subjects``.
        rows: store rows of the subjects to include.
        labels: one label per subject, aligned with rows.
        input_size: (h, w) to resize to, or None for the stored size.
        slices_per_subject: keep only the central k slices of each subject (None = all).
    """

    def __init__(
        self,
        store: Any,
        rows: np.ndarray,
        labels: np.ndarray,
        *,
        input_size: tuple[int, int] | None = None,
        slices_per_subject: int | None = None,
    ) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != rows.shape:
            raise ValueError(f"labels shape {labels.shape} != rows shape {rows.shape}")
        subjects = store.subjects
        starts = subjects["slice_start"].to_numpy(dtype=np.int64)
        counts = subjects["slice_count"].to_numpy(dtype=np.int64)
        chunks, slice_labels, slice_rows = [], [], []
        for row, label in zip(rows, labels):
            positions = central_slices(int(counts[row]), slices_per_subject)
            first = int(starts[row] + positions[0])
            block = np.asarray(store.images[first : first + positions.size])
            chunks.append(to_model_input(block, input_size))
            slice_labels.append(np.full(positions.size, label, dtype=np.int64))
            slice_rows.append(np.full(positions.size, row, dtype=np.int64))
        self.rows = rows
        self.images = torch.cat(chunks) if chunks else torch.empty(0, 1, *(input_size or (0, 0)))
        self.labels = torch.from_numpy(np.concatenate(slice_labels) if slice_labels else np.empty(0, np.int64))
        self.slice_rows = torch.from_numpy(np.concatenate(slice_rows) if slice_rows else np.empty(0, np.int64))

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i], self.slice_rows[i]
