"""The grid axes that change how a cell trains or what it tests, beyond its stratum.

    from study.cell_axes import cell_train, check_axis_settings
    train = cell_train(grid.train, cell)       # the cell's TrainConfig (freeze / input_size axes)

Axes (study/grid_schema.py GRID_AXES; ablations/README.md "Grid axes"):
    eval_cohort  "same" (default) or a cohort of the store: train on `cohort`, test on the other
                 cohort's test subjects (study/transfer.py)
    freeze       "train" (default: `train.freeze` or the searched value) or fc/layer4/layer3/none:
                 the cell's fixed freeze, so the modes are compared cell against cell on the same
                 test subjects instead of being one searched hyperparameter
    input_size   "train" (default: `train.input_size`), "stored", or "RxC" such as "64x128"
    label        "raw" (default) or "adjusted": high/low of the measure's residual after the
                 grid's `adjust_for` covariates (study/labels.py)

Checked here, before any compute, with the other grid keys (study/config.py calls
check_axis_settings); cohort names are checked against the store at planning.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from study.grid_schema import (ADJUST_FOR, FROM_TRAIN, SAME_COHORT, Cell, SearchParam,  # noqa: F401
                               TrainConfig)

_SIZE = re.compile(r"^([1-9][0-9]*)x([1-9][0-9]*)$")


def parse_input_size(value: str) -> tuple[int, int] | None:
    """"64x128" -> (64, 128); "stored" -> None (the store's own size).

    Raises:
        ValueError: anything else.
    """
    if value == "stored":
        return None
    m = _SIZE.match(value)
    if not m:
        raise ValueError(f"input_size {value!r}: expected 'train', 'stored' or ROWSxCOLS such as '64x128'")
    return int(m.group(1)), int(m.group(2))


def cell_train(base: TrainConfig, cell: Cell) -> TrainConfig:
    """The cell's fixed training settings: the grid's `train:` with the cell's freeze and
    input_size axis values applied (a searched freeze is never also an axis: refused)."""
    changes: dict[str, Any] = {}
    if cell.freeze != FROM_TRAIN:
        changes["freeze"] = cell.freeze
    if cell.input_size != FROM_TRAIN:
        changes["input_size"] = parse_input_size(cell.input_size)
    return dataclasses.replace(base, **changes) if changes else base


def check_axis_settings(raw: dict, grid: dict[str, tuple[str, ...]], search: tuple[SearchParam, ...],
                        protocol: str, errors: list[str]) -> dict[str, Any]:
    """Check the axes above and their top-level keys; return adjust_for and
    transfer_spacing_tolerance as GridConfig keyword arguments. Problems go to `errors`."""
    out: dict[str, Any] = {}
    adjust = raw.get("adjust_for", [])
    if isinstance(adjust, str):
        adjust = [adjust]
    if not isinstance(adjust, list) or any(a not in ADJUST_FOR for a in adjust):
        bad = [a for a in adjust if a not in ADJUST_FOR] if isinstance(adjust, list) else adjust
        errors.append(f"adjust_for: unknown covariate(s) {bad!r}; allowed: {', '.join(ADJUST_FOR)} "
                      "(a list, e.g. [sex, age, bmi, muscle_area])")
        adjust = []
    elif len(set(adjust)) != len(adjust):
        errors.append(f"adjust_for: duplicate covariates in {adjust!r}")
    out["adjust_for"] = tuple(adjust)
    if "adjusted" in grid.get("label", ()) and not adjust:
        errors.append("grid.label: 'adjusted' needs the covariates to adjust for: set adjust_for, e.g. "
                      f"adjust_for: [{', '.join(ADJUST_FOR)}]")
    if grid.get("label") and adjust and grid["label"] == ("raw",):
        errors.append("adjust_for is set but grid.label is only 'raw': no cell would use it; "
                      "add 'adjusted' to grid.label or drop adjust_for")

    if "freeze" in grid and any(p.name == "freeze" for p in search):
        errors.append("grid.freeze and search.freeze: freeze is either a grid axis (one cell per mode, compared "
                      "on the same test subjects) or searched (chosen per cell on validation), not both")
    for value in grid.get("input_size", ()):
        if value == FROM_TRAIN:
            continue
        try:
            parse_input_size(value)
        except ValueError as exc:
            errors.append(f"grid.input_size: {exc}")

    evals = [v for v in grid.get("eval_cohort", ()) if v != SAME_COHORT]
    if evals:
        if protocol != "holdout":
            errors.append(f"grid.eval_cohort: a transfer cell is tested on another cohort's test subjects, "
                          f"which needs protocol: holdout, got {protocol!r}")
        if "all" in evals or "all" in grid.get("cohort", ()):
            errors.append("grid.eval_cohort: 'all' cannot take part in cohort transfer; name the cohorts")
        if raw.get("threshold_fit", "train") != "train":
            errors.append("grid.eval_cohort: transfer cells label the evaluation cohort by its training "
                          "subjects' median; use threshold_fit: train")
    tol = raw.get("transfer_spacing_tolerance", 0.05)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or not 0 <= tol < 1:
        errors.append(f"transfer_spacing_tolerance: expected a fraction in [0, 1) (relative difference of the "
                      f"cohorts' median stored pixel spacing), got {tol!r}")
        tol = 0.05
    out["transfer_spacing_tolerance"] = float(tol)
    return out
