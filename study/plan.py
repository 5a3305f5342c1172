"""Grid + store → one checked plan per cell (subjects, labels, subject-level split), before Ray.

    from study.plan import plan_cells
    plans = plan_cells(grid, store)          # PlanError lists every problem at once
    plan.split["test"], plan.labels["test"], plan.threshold, plan.counts()
    plan.outer_folds[k].split["train" | "test" | "fold0" ...]      # protocol nested_cv

Each cohort is split once (study/splits.py); a cell's train/val/test are that split
intersected with the cell's subjects (the cohort's subjects in its sex x BMI stratum who have
the measure). Thresholds: `threshold: cohort` is one median per (cohort, measure), over the
cohort's training subjects (`threshold_fit: train`) or all its subjects (`all`), shared by
every stratum of that cohort and measure; `threshold: stratum` is the stratum's own median over
its own training (or all) subjects. A value equal to the threshold counts as low function;
such ties are counted (`n_ties`) and the realised class balance is recorded (`counts()`).

Refused at planning, with the counts: too few subjects (`min_subjects_per_cell`), a partition
holding one class, fewer than `min_test_per_class` test subjects in a class (the reported
partition: test, or val under seed_replication) unless `small_cells: nested_cv`, which runs
that cell under nested CV, where every subject is tested once.

Nested CV (`protocol: nested_cv`, or a small cell): `CellPlan.outer_folds` holds k =
`split.outer_folds` OuterFolds. Outer fold j tests the cell's subjects in the cohort's outer
fold j; its "train" is every other subject of the cell; "fold0".."fold{m-1}" (m =
`split.folds`) partition that "train" for selection; its threshold comes from its own training
subjects, so a subject's label can differ between folds where it trains and where it is
tested (each test subject is labelled by the threshold of the fold that tests it). Scoring
pools the outer-fold test predictions (study.metrics.pooled_outer_summary). A nested-CV plan's
own `split`/`labels`/`threshold` are outer fold 0's, with an empty "val" (what the plan print
shows); study/search.py runs one search per entry of `outer_folds`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from study.cell_axes import cell_train
from study.grid_schema import SAME_COHORT, Cell, GridConfig, TrainConfig
from study.data import (MEASURE_DIRECTIONS, check_disjoint, function_threshold, high_function_labels,
                        stratum_rows)
from study.labels import Covariates, residualise
from study.metrics import majority_class
from study.splits import CohortSplit, inner_folds, split_cohort
from study.transfer import transfer_problems

CLASSES = ("low", "high")  # label 0, label 1


class PlanError(ValueError):
    """The grid cannot run on this store; the message lists every problem found."""


@dataclass
class OuterFold:
    """One outer fold of nested CV for one cell.

    Attributes:
        index: j in 0..k-1 (the cohort's outer fold j are its test subjects).
        split: "train" (all non-test subjects of the cell), "test", and "fold0".."fold{m-1}",
            the inner validation folds partitioning "train" (store rows, sorted).
        labels: 0/1 per entry of each split, by this fold's threshold.
        threshold, threshold_rule: the median this fold's labels use, and how it was taken.
        n_ties: the cell's subjects whose value equals this threshold (labelled low).
    """

    index: int
    split: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    threshold: float
    threshold_rule: str
    n_ties: int


@dataclass
class CellPlan:
    """A cell's subjects, labels and split, fixed before any trial runs.

    Attributes:
        split: partition -> store rows ("train", "val", "test"; nested CV: outer fold 0's
            "train", "val" (empty), "test", "fold0"..).
        labels: partition -> 0/1 per subject (1 = high function), aligned with split.
        threshold, threshold_rule, direction: the median, how it was taken, "higher"/"lower".
        train: the cell's fixed training settings (study.cell_axes.cell_train).
        protocol: this cell's protocol ("holdout", "seed_replication", "nested_cv"); a small
            cell under `small_cells: nested_cv` is "nested_cv" in a holdout grid.
        n_ties: subjects of the cell whose value equals the threshold (labelled low).
        outer_folds: nested CV only, the k OuterFolds.
    """

    cell: Cell
    split: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    threshold: float
    threshold_rule: str
    direction: str
    protocol: str = "holdout"
    n_ties: int = 0
    outer_folds: list[OuterFold] = field(default_factory=list)
    train: TrainConfig | None = None  # the grid's train: with the cell's freeze / input_size axes applied

    @property
    def n(self) -> int:
        return int(len(np.unique(np.concatenate(list(self.split.values())))))

    @property
    def majority_class(self) -> int:
        """The training subjects' majority class (ties -> 0, low): the baseline's prediction."""
        return majority_class(self.labels["train"])

    def counts(self) -> dict[str, float]:
        """Subjects per partition and class, ties and the realised share of "high" (MLflow metrics)."""
        out: dict[str, float] = {"n": self.n}
        for part, y in self.labels.items():
            if part.startswith("fold"):
                continue  # inner CV folds partition "train"
            out[f"n_{part}"] = int(len(y))
            out[f"n_{part}_high"] = int(np.sum(y == 1))
        every = np.concatenate([self.labels[p] for p in ("train", "val", "test")])
        out["n_ties"] = self.n_ties
        out["high_fraction"] = float(np.mean(every)) if every.size else float("nan")
        if self.outer_folds:
            tested = np.concatenate([f.labels["test"] for f in self.outer_folds])
            out.update(n_outer_folds=len(self.outer_folds), n_tested=int(tested.size),
                       n_tested_high=int(tested.sum()))
        return out

    def model_metadata(self) -> dict[str, object]:
        """What a logged model needs to label and baseline new subjects like its training ones."""
        y = self.labels["train"]
        return {"threshold": self.threshold, "threshold_rule": self.threshold_rule,
                "direction": self.direction, "n_ties": self.n_ties,
                "train_majority": CLASSES[self.majority_class],
                "train_high_fraction": float(np.mean(y)) if y.size else float("nan")}


def measure_direction(store, measure: str) -> str:
    measures = getattr(store, "measures", None) or {}
    info = measures.get(measure)
    if isinstance(info, dict) and info.get("direction") in ("higher", "lower"):
        return info["direction"]
    return MEASURE_DIRECTIONS[measure]


@dataclass
class _Labeller:
    """How one scope's subjects are labelled: values (the measure, or its residual after
    adjust_for; per store row, NaN outside the scope) above `threshold` are high (or below,
    for lower-is-better measures)."""

    threshold: float
    rule: str
    values: np.ndarray


class _Launch:
    """The launch-wide state every cell plan shares: each cohort's split, and one labeller
    per (cohort or stratum, measure, label, outer fold) computed once."""

    def __init__(self, grid: GridConfig, subjects: pd.DataFrame, store) -> None:
        self.grid, self.subjects, self.store = grid, subjects, store
        n = len(subjects)
        self.partition = np.full(n, "", dtype=object)
        self.outer_fold = np.full(n, -1, dtype=np.int64)
        self.order = np.full(n, -1, dtype=np.int64)
        self.splits: dict[str, CohortSplit] = {}
        self._labellers: dict[tuple, _Labeller] = {}
        self.covariates = Covariates(store)
        store_cohorts = sorted(set(subjects["cohort"].dropna().astype(str)))
        wanted = [*grid.grid.get("cohort", ()), *(c for c in grid.grid.get("eval_cohort", ()) if c != SAME_COHORT)]
        for cohort in store_cohorts if "all" in wanted else [c for c in store_cohorts if c in wanted]:
            cs = split_cohort(subjects, cohort, val=grid.split.val if grid.protocol != "nested_cv" else 0.0,
                              test=grid.split.test, seed=grid.split.seed, outer_folds=grid.split.outer_folds,
                              stratify_sex=grid.split.stratify_sex, stratify_bmi=grid.split.stratify_bmi,
                              stratify_label=self._stratify_label(cohort))
            self.splits[cohort] = cs
            self.partition[cs.rows], self.outer_fold[cs.rows], self.order[cs.rows] = cs.partition, cs.outer_fold, cs.order

    def _stratify_label(self, cohort: str) -> np.ndarray | None:
        measure = self.grid.split.stratify_measure
        if not measure:
            return None
        rows = stratum_rows(self.subjects, cohort=cohort, measure=measure)
        out = np.full(len(self.subjects), -1, dtype=np.int64)
        if rows.size:  # provisional: orders the dealing only, never labels a subject
            median = function_threshold(self.subjects, measure=measure, rows=rows)
            values = self.subjects[measure].to_numpy(dtype=float)[rows]
            out[rows] = high_function_labels(values, direction=measure_direction(self.store, measure),
                                             threshold=median)
        return out

    def labeller(self, cell: Cell, cell_rows: np.ndarray, fold: int | None) -> _Labeller:
        """The cell's labelling (of its training cohort); `fold` None for holdout, else the outer
        fold it labels. A label "adjusted" cell's residual regression is fitted on the same
        subjects as its threshold: the scope's training subjects."""
        grid = self.grid
        if (cell.threshold_scope if cell.threshold_scope != "grid" else grid.threshold) == "cohort":
            scope_key = ("cohort", cell.cohort)
            scope = stratum_rows(self.subjects, cohort=cell.cohort, measure=cell.measure)
            population = f"cohort {cell.cohort}"
        else:
            scope_key = ("stratum", cell.cohort, cell.sex, cell.bmi)
            scope, population = cell_rows, f"stratum sex={cell.sex}, bmi={cell.bmi} of cohort {cell.cohort}"
        key = (*scope_key, cell.measure, cell.label, grid.threshold_fit, fold)
        if key not in self._labellers:
            ref, whose = scope, "subjects"
            if grid.threshold_fit == "train":  # held-out subjects' measures never move their own labels
                ref = scope[self.partition[scope] == "train"] if fold is None else scope[self.outer_fold[scope] != fold]
                whose = "training subjects" if fold is None else f"training subjects of outer fold {fold}"
            values, what = self.subjects[cell.measure].to_numpy(dtype=float, na_value=np.nan), cell.measure
            if cell.label == "adjusted":
                res = residualise(self.subjects, self.covariates, measure=cell.measure, fit_rows=ref,
                                  apply_rows=scope, adjust_for=grid.adjust_for)
                values, what = res.values, f"the {res.rule}"
            value = (float(np.median(values[ref])) if cell.label == "adjusted" and len(ref)
                     else function_threshold(self.subjects, measure=cell.measure, rows=ref))
            self._labellers[key] = _Labeller(value, f"median of {what} over {len(ref)} {whose} of {population}",
                                             values)
        return self._labellers[key]


def _labels(labeller: _Labeller, split: dict[str, np.ndarray], direction: str) -> dict[str, np.ndarray]:
    return {p: high_function_labels(labeller.values[r], direction=direction, threshold=labeller.threshold)
            for p, r in split.items()}


def _class_counts(y: np.ndarray) -> str:
    c = np.bincount(np.asarray(y, dtype=np.int64), minlength=2)
    return f"{c[0]} low / {c[1]} high"


def _holdout(launch: _Launch, cell: Cell, rows: np.ndarray, direction: str, protocol: str) -> CellPlan:
    split = {p: rows[launch.partition[rows] == p] for p in ("train", "val", "test")}
    lab = launch.labeller(cell, rows, None)
    labels = _labels(lab, split, direction)
    threshold, rule, values = lab.threshold, lab.rule, lab.values[rows]
    if cell.is_transfer:  # tested on the evaluation cohort's test subjects, by its own labelling
        home = Cell(**{**cell.axes, "cohort": cell.eval_cohort, "eval_cohort": SAME_COHORT})
        eval_rows = stratum_rows(launch.subjects, cohort=home.cohort, measure=cell.measure, sex=cell.sex, bmi=cell.bmi)
        split["test"] = eval_rows[launch.partition[eval_rows] == "test"]
        eval_lab = launch.labeller(home, eval_rows, None)
        labels["test"] = _labels(eval_lab, {"test": split["test"]}, direction)["test"]
        rule = (f"train/val: {rule} = {threshold:.4g}; test subjects of {home.cohort}, labelled by their "
                f"cohort's own {eval_lab.rule} = {eval_lab.threshold:.4g}")
        values = np.concatenate([values, eval_lab.values[split["test"]]])
    check_disjoint(split, launch.subjects["subject_id"].to_numpy())
    for part in ("train", "val", "test"):
        if protocol == "seed_replication" and part == "test":
            continue  # the seed's protocol has no test partition
        if len(np.unique(labels[part])) < 2:
            raise PlanError(f"cell {cell.name}: the {part} partition ({len(labels[part])} subjects, "
                            f"{_class_counts(labels[part])}) holds one class only; use more subjects "
                            f"or a larger split.{part}")
    return CellPlan(cell=cell, split=split, labels=labels, threshold=float(threshold), threshold_rule=rule,
                    direction=direction, protocol=protocol, n_ties=int(np.sum(values == threshold)))


def _nested(launch: _Launch, cell: Cell, rows: np.ndarray, direction: str) -> CellPlan:
    grid = launch.grid
    folds = []
    for j in range(grid.split.outer_folds):
        in_test = launch.outer_fold[rows] == j
        train, test = rows[~in_test], rows[in_test]
        lab = launch.labeller(cell, rows, j)
        threshold, rule, values = lab.threshold, lab.rule, lab.values
        y_train = high_function_labels(values[train], direction=direction, threshold=threshold)
        try:
            inner = inner_folds(train, y_train, launch.order[train], grid.split.folds)
        except ValueError as exc:
            raise PlanError(f"cell {cell.name}, outer fold {j}: {exc}") from exc
        split = {"train": train, "test": test, **{f"fold{i}": f for i, f in enumerate(inner)}}
        check_disjoint({k: v for k, v in split.items() if k != "train"}, launch.subjects["subject_id"].to_numpy())
        folds.append(OuterFold(index=j, split=split, labels=_labels(lab, split, direction),
                               threshold=float(threshold), threshold_rule=rule,
                               n_ties=int(np.sum(values[rows] == threshold))))
    tested = np.concatenate([f.split["test"] for f in folds])
    assert np.array_equal(np.sort(tested), rows), f"cell {cell.name}: outer folds must test every subject once"
    first = folds[0]
    split = {"train": first.split["train"], "val": rows[:0], "test": first.split["test"],
             **{k: v for k, v in first.split.items() if k.startswith("fold")}}
    labels = {k: (first.labels[k] if k != "val" else np.zeros(0, dtype=np.int64)) for k in split}
    return CellPlan(cell=cell, split=split, labels=labels, threshold=first.threshold,
                    threshold_rule=first.threshold_rule, direction=direction, protocol="nested_cv",
                    n_ties=first.n_ties, outer_folds=folds)


def _reported(plan: CellPlan) -> tuple[str, np.ndarray]:
    """(what is reported, its labels): test; val under seed_replication; every subject in nested CV."""
    if plan.protocol == "nested_cv":
        return "outer-fold test", np.concatenate([f.labels["test"] for f in plan.outer_folds])
    part = "val" if plan.protocol == "seed_replication" else "test"
    return part, plan.labels[part]


def plan_cell(launch: _Launch, cell: Cell, direction: str) -> CellPlan:
    grid = launch.grid
    rows = stratum_rows(launch.subjects, cohort=cell.cohort, measure=cell.measure, sex=cell.sex, bmi=cell.bmi)
    if len(rows) < grid.min_subjects_per_cell:
        raise PlanError(f"cell {cell.name}: {len(rows)} subjects with {cell.measure} "
                        f"(min_subjects_per_cell is {grid.min_subjects_per_cell})")
    if grid.protocol == "nested_cv":
        plan = _nested(launch, cell, rows, direction)
    else:
        plan = _holdout(launch, cell, rows, direction, grid.protocol)
    what, y = _reported(plan)
    short = np.bincount(y.astype(np.int64), minlength=2).min() < grid.min_test_per_class
    if short and plan.protocol == "holdout" and grid.small_cells == "nested_cv" and not cell.is_transfer:
        plan = _nested(launch, cell, rows, direction)  # every subject tested once: more test subjects per class
        what, y = _reported(plan)
        short = np.bincount(y.astype(np.int64), minlength=2).min() < grid.min_test_per_class
    if short:
        raise PlanError(f"cell {cell.name}: {what} subjects {_class_counts(y)}; min_test_per_class is "
                        f"{grid.min_test_per_class} (a 95% CI of accuracy narrower than +-0.25); use more "
                        "subjects, a larger split.test, small_cells: nested_cv, or a lower min_test_per_class")
    plan.train = cell_train(grid.train, cell)
    return plan


def plan_cells(grid: GridConfig, store) -> list[CellPlan]:
    """Plan every cell; raise PlanError listing all problems at once."""
    subjects = store.subjects
    errors: list[str] = []
    cohorts = sorted(set(subjects["cohort"].dropna().astype(str)))
    for cohort in grid.grid.get("cohort", ()):
        if cohort not in cohorts and cohort != "all":
            errors.append(f"grid.cohort: {cohort!r} is not in the store {grid.store}; it holds: {', '.join(cohorts) or 'none'}")
    for measure in {*grid.grid.get("measure", ()), *([grid.split.stratify_measure] if grid.split.stratify_measure else [])}:
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
    for cohort, other in sorted({(c.cohort, c.eval_cohort) for c in grid.cells() if c.is_transfer}):
        if other not in cohorts:
            errors.append(f"grid.eval_cohort: {other!r} is not in the store {grid.store}; it holds: {', '.join(cohorts)}")
        elif cohort in cohorts:
            errors += transfer_problems(store, cohort, other, tolerance=grid.transfer_spacing_tolerance)
    if errors:
        raise PlanError(f"{grid.source}: {len(errors)} problem(s) with the store:\n  - " + "\n  - ".join(errors))
    try:
        launch = _Launch(grid, subjects, store)
    except ValueError as exc:
        raise PlanError(f"{grid.source}: {exc}") from exc
    plans = []
    for cell in grid.cells():
        try:
            plans.append(plan_cell(launch, cell, measure_direction(store, cell.measure)))
        except ValueError as exc:  # includes PlanError and split/stratum errors from study.data
            errors.append(str(exc))
    if errors:
        raise PlanError(f"{grid.source}: {len(errors)} cell(s) cannot run:\n  - " + "\n  - ".join(errors))
    return plans
