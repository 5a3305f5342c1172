"""One subject-level split per cohort, shared by every cell of a launch.

Usage::

    from study.splits import split_cohort

    cs = split_cohort(store.subjects, "oai", val=0.15, test=0.15, outer_folds=5, seed=0)
    cs.partition[row]          # "train" | "val" | "test" for holdout and seed_replication
    cs.outer_fold[row]         # 0 .. outer_folds-1 for nested_cv (every subject tested once)
    cs.rows_in("test")         # store rows of the cohort's test subjects

A cohort's subjects are split once; every cell of that cohort (any measure, any sex or BMI
stratum) takes its train/val/test as the intersection of this split with its own subjects.
So a stratum's test subjects are a subset of the pooled cell's test subjects, two measures'
cells share the test subjects who have both measures, and the pooled model can be scored on
a stratum's test subjects (study/compare.py).

How subjects are dealt (implicitly stratified systematic sampling, as in survey sampling):
the cohort's subjects are ordered by sex, then BMI group, then optionally a measure's
provisional label, then a random key; walking down that list, every 1/test-th subject goes
to test (from a random start), and among the rest every (1 - test)/val-th to val. Each
contiguous block of the list - every sex x BMI stratum, and within it every label - therefore
gets its share to within one subject, including strata of one or two subjects, where
sklearn's stratified splitters refuse. Nested CV deals the same list round-robin into
`outer_folds` folds with the same random start, so outer fold 0 is exactly holdout's test set
when test = 1/outer_folds: the two protocols agree for one split.seed.

The random keys come from numpy's generator seeded by (split.seed, crc32(cohort)), drawn in
the order of the subjects' pseudonymous ids: the split of a cohort depends on its subjects
and the seed, not on the store's row order or on which other cohorts are in the grid. Rows
sharing a subject id (one person stored twice) are dealt as one subject.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pandas as pd

from study.data import BMI_STRATA, check_disjoint

# resolution of the random start of a systematic pass, per unit of the sampling interval
_START_GRID = 1 << 20
# a fraction becomes p/q with q at most this (0.15 -> 3/20); keeps integer arithmetic exact
_MAX_DENOMINATOR = 10_000
PARTITIONS = ("train", "val", "test")


@dataclass(frozen=True)
class CohortSplit:
    """A cohort's subjects split once for a launch.

    Attributes:
        cohort: the cohort's name in the store.
        rows: store rows of the cohort (sorted).
        partition: "train" / "val" / "test" per entry of rows (holdout, seed_replication).
        outer_fold: nested-CV outer fold per entry of rows (0 .. outer_folds-1).
        order: position of each entry of rows in the dealing order (for inner folds).
    """

    cohort: str
    rows: np.ndarray
    partition: np.ndarray
    outer_fold: np.ndarray
    order: np.ndarray

    def rows_in(self, partition: str) -> np.ndarray:
        """Store rows of one holdout partition."""
        return self.rows[self.partition == partition]

    def fold_rows(self, fold: int) -> np.ndarray:
        """Store rows of one outer fold (the test subjects of outer fold `fold`)."""
        return self.rows[self.outer_fold == fold]


def bmi_group(bmi: np.ndarray) -> np.ndarray:
    """BMI stratum name per subject (study.data.BMI_STRATA without "all"); "missing" for NaN."""
    bmi = np.asarray(bmi, dtype=float)
    out = np.full(bmi.shape, "missing", dtype=object)
    for name, (low, high) in BMI_STRATA.items():
        if name == "all":
            continue
        keep = ~np.isnan(bmi)
        if low is not None:
            keep &= bmi >= low
        if high is not None:
            keep &= bmi < high
        out[keep] = name
    return out


def systematic_pick(n: int, fraction: float | Fraction, start: int) -> np.ndarray:
    """Every 1/fraction-th of n positions, from a random start: a boolean mask.

    Position i is picked when floor(u + (i + 1) f) > floor(u + i f), u = start / (q * grid)
    the random start, f = p/q the fraction. Exact integer arithmetic, so the picks do not
    depend on floating-point rounding. Picks floor(u + n f) positions: n f rounded down or up.

    Args:
        n: number of positions.
        fraction: share to pick, in [0, 1].
        start: integer in [0, q * _START_GRID), q the fraction's denominator.
    """
    f = Fraction(fraction).limit_denominator(_MAX_DENOMINATOR)
    if not 0 <= f <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    scale = f.denominator * _START_GRID
    i = np.arange(n + 1, dtype=np.int64)
    cum = (start % scale + i * f.numerator * _START_GRID) // scale
    return np.diff(cum) > 0


def _start_range(fraction: float) -> int:
    return Fraction(fraction).limit_denominator(_MAX_DENOMINATOR).denominator * _START_GRID


def split_cohort(subjects: pd.DataFrame, cohort: str, *, val: float, test: float, seed: int,
                 outer_folds: int = 5, stratify_sex: bool = True, stratify_bmi: bool = True,
                 stratify_label: np.ndarray | None = None) -> CohortSplit:
    """Split one cohort's subjects for holdout (train/val/test) and nested CV (outer folds).

    Args:
        subjects: the store's subjects table (row i = store row i).
        cohort: a value of subjects["cohort"].
        val: share of subjects for validation (selection), in [0, 1).
        test: share for the untouched test set, in [0, 1) (0: seed_replication).
        seed: split.seed.
        outer_folds: k of nested CV (>= 2).
        stratify_sex, stratify_bmi: order the dealing by sex / BMI group.
        stratify_label: optional provisional 0/1 label per store row (-1 = no label), e.g.
            above/below the cohort median of one measure; orders the dealing within sex x BMI.

    Returns:
        The CohortSplit; partitions are disjoint by row and by subject id (checked).

    Raises:
        ValueError: cohort absent, fractions out of range, or too few subjects for a
            non-empty training partition.
    """
    problems = []
    if not 0 <= test < 1:
        problems.append(f"test must be in [0, 1), got {test}")
    if not 0 <= val < 1 or val + test >= 1:
        problems.append(f"val must be in [0, 1) with val + test < 1, got val={val}, test={test}")
    if isinstance(outer_folds, bool) or not isinstance(outer_folds, int) or outer_folds < 2:
        problems.append(f"outer_folds must be an integer >= 2, got {outer_folds!r}")
    rows = np.flatnonzero((subjects["cohort"] == cohort).to_numpy(dtype=bool, na_value=False)).astype(np.int64)
    if rows.size == 0:
        problems.append(f"cohort {cohort!r} has no subjects in the store")
    if problems:
        raise ValueError(f"cannot split cohort {cohort!r}: " + "; ".join(problems))

    ids = subjects["subject_id"].astype(str).to_numpy()[rows]
    unique_ids, first, member = np.unique(ids, return_index=True, return_inverse=True)
    rng = np.random.default_rng([int(seed), zlib.crc32(cohort.encode())])
    random_key = rng.random(unique_ids.size)  # drawn in sorted-id order: independent of row order
    test_start = int(rng.integers(0, _start_range(test))) if test > 0 else 0
    # round-robin folds with holdout's start: fold 0 = holdout's test set when test = 1/k
    same = test > 0 and Fraction(test).limit_denominator(_MAX_DENOMINATOR) == Fraction(1, outer_folds)
    fold_offset = (test_start if same else int(rng.integers(0, outer_folds * _START_GRID))) // _START_GRID
    val_start = int(rng.integers(0, _start_range(val / (1 - test)))) if val > 0 else 0

    first_rows = rows[first]
    n = unique_ids.size
    sex = (subjects["sex"].astype(object).to_numpy()[first_rows] if stratify_sex and "sex" in subjects
           else np.full(n, "", dtype=object))
    sex = np.array(["unknown" if s is None or (isinstance(s, float) and np.isnan(s)) else str(s) for s in sex])
    bmi = (bmi_group(subjects["bmi"].to_numpy(dtype=float, na_value=np.nan)[first_rows])
           if stratify_bmi and "bmi" in subjects else np.full(n, "", dtype=object)).astype(str)
    label = (np.asarray(stratify_label)[first_rows] if stratify_label is not None
             else np.zeros(n, dtype=np.int64))
    # np.lexsort sorts by the last key first: sex, then BMI group, then label, then the random key
    order = np.lexsort((random_key, label, bmi, sex))

    is_test_dealt = systematic_pick(n, test, test_start) if test > 0 else np.zeros(n, bool)
    rest = np.flatnonzero(~is_test_dealt)
    is_val_rest = systematic_pick(rest.size, val / (1 - test), val_start) if val > 0 else np.zeros(rest.size, bool)
    dealt = np.full(n, "train", dtype=object)
    dealt[is_test_dealt] = "test"
    dealt[rest[is_val_rest]] = "val"
    fold_dealt = (np.arange(n) + 1 + fold_offset) % outer_folds

    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)  # subject -> place in the dealing order
    partition = dealt[position][member].astype(str)
    outer_fold = fold_dealt[position][member].astype(np.int64)
    if n - int(is_test_dealt.sum()) - int(is_val_rest.sum()) < 1:
        raise ValueError(f"cannot split cohort {cohort!r}: {n} subjects leave no training subject "
                         f"with val={val}, test={test}")
    split = CohortSplit(cohort=cohort, rows=rows, partition=partition, outer_fold=outer_fold,
                        order=position[member])
    all_ids = subjects["subject_id"].astype(str).to_numpy()
    check_disjoint({p: split.rows_in(p) for p in PARTITIONS}, all_ids)
    check_disjoint({f"outer fold {k}": split.fold_rows(k) for k in range(outer_folds)}, all_ids)
    return split


def inner_folds(rows: np.ndarray, labels: np.ndarray, order: np.ndarray, k: int) -> list[np.ndarray]:
    """k inner folds over one cell's outer-training subjects, each holding both classes
    in proportion: dealt round-robin along (label, cohort dealing order).

    Args:
        rows: the cell's outer-training store rows.
        labels: their 0/1 labels (aligned with rows).
        order: their positions in the cohort's dealing order (CohortSplit.order).
        k: number of inner folds.

    Returns:
        k sorted arrays of store rows that partition rows.

    Raises:
        ValueError: a class has fewer than k subjects (some fold would miss it).
    """
    rows, labels, order = (np.asarray(a) for a in (rows, labels, order))
    counts = np.bincount(labels.astype(np.int64), minlength=2)
    if counts.min() < k:
        raise ValueError(f"{rows.size} outer-training subjects ({counts[0]} low, {counts[1]} high) "
                         f"cannot fill {k} inner folds with both classes; lower split.folds")
    dealing = np.lexsort((order, labels))
    fold = np.empty(rows.size, dtype=np.int64)
    fold[dealing] = np.arange(rows.size) % k
    return [np.sort(rows[fold == i]) for i in range(k)]
