"""Labels beyond body size: the measure's residual after sex, age, BMI and thigh areas.

    from study.labels import Covariates, residualise
    cov = Covariates(store)                              # thigh areas measured once per launch
    res = residualise(store.subjects, cov, measure="leg_strength", fit_rows=train_rows,
                      apply_rows=cell_rows, adjust_for=("sex", "age", "bmi", "muscle_area"))
    res.values          # residual per store row (NaN outside apply_rows); threshold it like the measure
    res.coef, res.rule  # the fitted coefficients; a sentence for the plan and MLflow

Why: a CNN that reads thigh size off the image predicts strength at about 72% (DOMAIN.md)
without learning anything body size does not already say. Labelling each subject high or
low by the part of the measure that size does *not* explain asks "does thigh MRI tell high
from low function among people of the same size?"; a model that only sees size then scores
its majority-class baseline.

The regression is ordinary least squares (scikit-learn LinearRegression) fitted on the
training subjects only and applied unchanged to validation and test subjects, so held-out
measures never shape their own labels. Missing covariates (age, BMI, sex) are imputed with
the training median inside the same pipeline (counted in `rule`). The covariates are
study/body_size.py's size features (the thigh areas from fixed intensity thresholds of the
stored slices; "fat_area" holds subcutaneous and intermuscular fat and marrow).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LinearRegression
from sklearn.pipeline import make_pipeline

from study.body_size import FEATURES, size_features, thigh_areas
from study.grid_schema import ADJUST_FOR

AREAS = ("muscle_area", "fat_area", "total_area")
assert set(ADJUST_FOR) <= set(FEATURES), "every adjust_for covariate must be a body-size feature"


class Covariates:
    """Body-size features of store rows, thigh areas measured from the images once per row."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self._areas: pd.DataFrame | None = None

    def frame(self, rows: np.ndarray, names: tuple[str, ...]) -> pd.DataFrame:
        """The `names` columns (ADJUST_FOR) for `rows`, indexed by store row."""
        rows = np.asarray(rows, dtype=np.int64)
        if any(n in AREAS for n in names):
            known = self._areas.index if self._areas is not None else pd.Index([], dtype=np.int64)
            missing = np.setdiff1d(rows, known.to_numpy())
            if missing.size:
                new = thigh_areas(self.store, missing)
                self._areas = new if self._areas is None else pd.concat([self._areas, new]).sort_index()
                self._areas.attrs["unit"] = new.attrs.get("unit", "px")
            areas = self._areas
        else:  # no image is read when only table covariates are asked for
            areas = pd.DataFrame(np.nan, index=pd.Index(rows, name="row"), columns=list(AREAS))
        return size_features(self.store, rows, areas)[list(names)]


@dataclass
class Residuals:
    """The measure's residual after the covariates.

    Attributes:
        values: residual per store row (NaN outside apply_rows), in the measure's units.
        coef: {covariate: OLS coefficient per unit} and "intercept".
        r2_train: share of the training subjects' variance the covariates explain.
        rule: one sentence saying what was regressed on what, over which subjects.
    """

    values: np.ndarray
    coef: dict[str, float]
    r2_train: float
    rule: str


def residualise(subjects: pd.DataFrame, covariates: Covariates, *, measure: str, fit_rows: np.ndarray,
                apply_rows: np.ndarray, adjust_for: tuple[str, ...]) -> Residuals:
    """Fit measure ~ adjust_for on fit_rows (OLS, median imputation) and return the residuals of apply_rows.

    Args:
        subjects: the store's subjects table.
        covariates: the launch's Covariates.
        measure: a measure column.
        fit_rows: the training subjects whose values fit the regression.
        apply_rows: rows to residualise (include fit_rows).
        adjust_for: covariate names (ADJUST_FOR).

    Raises:
        ValueError: unknown covariate, or fewer training subjects than coefficients + 2.
    """
    unknown = [a for a in adjust_for if a not in ADJUST_FOR]
    if unknown:
        raise ValueError(f"adjust_for: unknown covariate(s) {unknown}; allowed: {', '.join(ADJUST_FOR)}")
    fit_rows, apply_rows = (np.asarray(r, dtype=np.int64) for r in (fit_rows, apply_rows))
    if fit_rows.size < len(adjust_for) + 3:
        raise ValueError(f"{fit_rows.size} training subjects cannot fit {measure} on {len(adjust_for)} "
                         "covariates (need at least covariates + 3)")
    y = subjects[measure].to_numpy(dtype=float, na_value=np.nan)
    x_fit = covariates.frame(fit_rows, adjust_for).to_numpy(dtype=float)
    x_apply = covariates.frame(apply_rows, adjust_for).to_numpy(dtype=float)
    model = make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), LinearRegression())
    model.fit(x_fit, y[fit_rows])
    values = np.full(len(subjects), np.nan)
    values[apply_rows] = y[apply_rows] - model.predict(x_apply)
    lr = model.named_steps["linearregression"]
    coef = {**dict(zip(adjust_for, map(float, lr.coef_))), "intercept": float(lr.intercept_)}
    resid = values[fit_rows]
    r2 = 1.0 - float(np.sum(resid**2) / np.sum((y[fit_rows] - y[fit_rows].mean()) ** 2))
    n_missing = int(np.isnan(x_apply).sum())
    rule = (f"residual of {measure} after OLS on {', '.join(adjust_for)} fitted on {fit_rows.size} training "
            f"subjects (R2 {r2:.2f}" + (f"; {n_missing} missing covariate values set to the training median"
                                        if n_missing else "") + ")")
    return Residuals(values=values, coef=coef, r2_train=r2, rule=rule)
