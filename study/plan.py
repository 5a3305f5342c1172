"""Grid + store → one checked plan per cell (subjects, labels, subject-level split), before Ray.

Every cell's problems (unknown cohort in the store, too few subjects, a class missing from a
partition) are collected and reported together, so a grid never fails an hour into a run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from study.config import Cell, GridConfig
from study.data import (MEASURE_DIRECTIONS, check_disjoint, function_threshold, high_function_labels,
                        split_subjects, stratum_rows)


class PlanError(ValueError):
    """The grid cannot run on this store; the message lists every problem found."""


@dataclass
class CellPlan:
    cell: Cell
    split: dict[str, np.ndarray]  # partition → store rows
    labels: dict[str, np.ndarray]  # partition → 0/1, aligned with split
    threshold: float
    threshold_rule: str
    direction: str

    @property
    def n(self) -> int:
        return int(len(np.unique(np.concatenate(list(self.split.values())))))

    def counts(self) -> dict[str, int]:
        out = {"n": self.n}
        for part, y in self.labels.items():
            if part.startswith("fold"):
                continue  # inner CV folds partition "train"
            out[f"n_{part}"] = int(len(y))
            out[f"n_{part}_high"] = int(np.sum(y == 1))
        return out


def measure_direction(store, measure: str) -> str:
    measures = getattr(store, "measures", None) or {}
    info = measures.get(measure)
    if isinstance(info, dict) and info.get("direction") in ("higher", "lower"):
        return info["direction"]
    return MEASURE_DIRECTIONS[measure]


def plan_cell(grid: GridConfig, subjects: pd.DataFrame, cell: Cell, direction: str) -> CellPlan:
    rows = stratum_rows(subjects, cohort=cell.cohort, measure=cell.measure, sex=cell.sex, bmi=cell.bmi)
    if len(rows) < grid.min_subjects_per_cell:
        raise PlanError(f"cell {cell.name}: {len(rows)} subjects with {cell.measure} "
                        f"(min_subjects_per_cell is {grid.min_subjects_per_cell})")
    if grid.threshold == "cohort":
        # the seed's rule: the median of the whole cohort, also for sex/BMI strata
        ref, population = stratum_rows(subjects, cohort=cell.cohort, measure=cell.measure), f"all {cell.cohort} subjects"
    else:
        ref, population = rows, "the subjects of this stratum"
    values = subjects[cell.measure].to_numpy(dtype=float)
    # a provisional (whole-population) median only stratifies the split by label
    provisional = function_threshold(subjects, measure=cell.measure, rows=ref)
    labels_all = high_function_labels(values[rows], direction=direction, threshold=provisional)
    strata = None
    if grid.split.stratify_sex and cell.sex == "all" and "sex" in subjects:
        strata = subjects["sex"].astype(str).to_numpy()[rows]
    if grid.protocol == "nested_cv":
        split = nested_cv_split(rows, labels_all, test=grid.split.test, folds=grid.split.folds,
                                seed=grid.split.seed, strata=strata)
    else:
        split = split_subjects(rows, labels_all, val=grid.split.val, test=grid.split.test,
                               seed=grid.split.seed, strata=strata)
    # the guard, at every split; inner folds partition "train", so they are checked instead of it
    guarded = {k: v for k, v in split.items() if not (grid.protocol == "nested_cv" and k == "train")}
    check_disjoint(guarded, subjects["subject_id"].to_numpy())
    threshold = provisional
    if grid.threshold_fit == "train":
        # held-out subjects' measures must not move the threshold they are labelled by
        held_out = np.concatenate([split[p] for p in split if p not in ("train",) and not p.startswith("fold")]
                                  + ([split["test"]] if grid.protocol == "nested_cv" else []))
        ref = np.setdiff1d(ref, held_out)
        population = f"training subjects among {population}"
        threshold = function_threshold(subjects, measure=cell.measure, rows=ref)
        labels_all = high_function_labels(values[rows], direction=direction, threshold=threshold)
    rule = f"median of {cell.measure} over {len(ref)} {population}"
    row_to_label = dict(zip(rows.tolist(), labels_all.tolist()))
    labels = {part: np.array([row_to_label[r] for r in split[part]], dtype=np.int64) for part in split}
    for part in labels:
        if len(labels[part]) == 0 and grid.protocol != "holdout":
            continue  # seed_replication has no test partition, nested_cv no fixed val partition
        if len(np.unique(labels[part])) < 2:
            raise PlanError(f"cell {cell.name}: the {part} partition ({len(labels[part])} subjects) "
                            f"holds one class only; use more subjects or a larger split.{part}")
    return CellPlan(cell=cell, split=split, labels=labels, threshold=float(threshold),
                    threshold_rule=rule, direction=direction)


def nested_cv_split(rows: np.ndarray, labels: np.ndarray, *, test: float, folds: int, seed: int,
                    strata: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Outer test subjects + k inner folds over the rest, stratified by label (and sex).

    Returns {"train": all non-test rows (the refit set), "val": empty, "test": ...,
    "fold0" ... "fold{k-1}": the inner validation folds, which partition "train"}.
    """
    from sklearn.model_selection import StratifiedKFold

    outer = split_subjects(rows, labels, val=test, test=0, seed=seed, strata=strata)
    train, test_rows = outer["train"], outer["val"]
    pos = np.searchsorted(rows, train) if np.all(np.diff(rows) > 0) else np.array([np.where(rows == r)[0][0] for r in train])
    y = labels[pos]
    key = y.astype(str) if strata is None else np.char.add(y.astype(str), np.asarray(strata)[pos].astype(str))
    if np.unique(key, return_counts=True)[1].min() < folds:
        key = y.astype(str)  # a sex x label stratum smaller than k: stratify by label only
    if np.unique(key, return_counts=True)[1].min() < folds:
        raise PlanError(f"{len(train)} non-test subjects cannot fill {folds} folds with both classes; "
                        "lower split.folds or use protocol holdout")
    out = {"train": train, "val": train[:0], "test": test_rows}
    for i, (_, val_idx) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(train, key)):
        out[f"fold{i}"] = np.sort(train[val_idx])
    return out


def plan_cells(grid: GridConfig, store) -> list[CellPlan]:
    """Plan every cell; raise PlanError listing all problems at once."""
    subjects = store.subjects
    errors: list[str] = []
    cohorts = sorted(set(subjects["cohort"].dropna().astype(str)))
    for cohort in grid.grid.get("cohort", ()):
        if cohort not in cohorts:
            errors.append(f"grid.cohort: {cohort!r} is not in the store {grid.store}; it holds: {', '.join(cohorts) or 'none'}")
    for measure in grid.grid.get("measure", ()):
        if measure not in subjects.columns:
            errors.append(f"grid.measure: {measure!r} is not a column of the store's subjects table")
    built = (getattr(store, "attrs", None) or {}).get("cohorts") or {}  # data_prep's build summaries
    for cohort in grid.grid.get("cohort", ()):
        absent = (built.get(cohort) or {}).get("measures_absent") or {}
        for measure in grid.grid.get("measure", ()):
            if measure in absent:
                errors.append(f"grid.measure: {measure!r} is not in cohort {cohort!r}'s release: its tables "
                              f"lack column(s) {', '.join(absent[measure])} (recorded when the store was built)")
    k = grid.train.slices_per_subject
    if k is not None and "slice_count" in subjects and len(subjects) and int(subjects["slice_count"].min()) < k:
        short = int((subjects["slice_count"] < k).sum())
        errors.append(f"train.slices_per_subject: {k}, but {short} subject(s) in the store have fewer slices "
                      f"(fewest: {int(subjects['slice_count'].min())}); use at most that many")
    if errors:
        raise PlanError(f"{grid.source}: {len(errors)} problem(s) with the store:\n  - " + "\n  - ".join(errors))
    plans = []
    for cell in grid.cells():
        try:
            plans.append(plan_cell(grid, subjects, cell, measure_direction(store, cell.measure)))
        except ValueError as exc:  # includes PlanError and split/stratum errors from study.data
            errors.append(str(exc))
    if errors:
        raise PlanError(f"{grid.source}: {len(errors)} cell(s) cannot run:\n  - " + "\n  - ".join(errors))
    return plans
