"""Cohort transfer: train on one cohort, test on another, only when their images are comparable.

    from study.transfer import transfer_problems
    problems = transfer_problems(store, "oai", "somma", tolerance=0.05)   # [] when compatible

A transfer cell (grid axis `eval_cohort`, study/cell_axes.py) trains and selects on its
cohort's training and validation subjects and is tested on the evaluation cohort's test
subjects (the same subjects that cohort's own cell is tested on, so the two accuracies are a
paired comparison), labelled by the evaluation cohort's own training-subject median: the
cohorts measure function with different instruments and units (OAI: isometric knee extension
in N and a 20 m walk; SOMMA: Keiser leg power in W and a 4 m walk), so "high" can only mean
high within the cohort that was measured, and test subjects' values never set their labels.

What must match for the numbers to mean transfer and not a preprocessing artefact:
- the recipe (stored size, slices kept, intensity window, resize method): one store holds one
  recipe (data_prep/store/writer.py refuses to append a cohort built with another), so two
  cohorts of one store always share it; it is compared anyway for stores merged by hand
  (the per-cohort build summaries' "recipe", when recorded);
- the physical size of a stored pixel: the recipe resizes every series to the same matrix,
  so a cohort scanned with a larger field of view has larger stored pixels and its thighs
  look smaller to the network, which a size-reading CNN would turn into "lower function".
  The medians of the stored pixel spacing (subjects columns pixel_spacing_row_mm /
  pixel_spacing_col_mm) must agree within `transfer_spacing_tolerance` (relative); a store
  without those columns cannot be checked and is refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SPACING_COLUMNS = ("pixel_spacing_row_mm", "pixel_spacing_col_mm")


def _median_spacing(subjects, cohort: str) -> tuple[float, float] | None:
    rows = (subjects["cohort"] == cohort).to_numpy(dtype=bool, na_value=False)
    out = []
    for col in SPACING_COLUMNS:
        v = subjects[col].to_numpy(dtype=float, na_value=np.nan)[rows]
        v = v[np.isfinite(v)]
        if v.size == 0:
            return None
        out.append(float(np.median(v)))
    return out[0], out[1]


def transfer_problems(store: Any, train_cohort: str, eval_cohort: str, *, tolerance: float) -> list[str]:
    """Why a model trained on `train_cohort` cannot be tested on `eval_cohort` of this store ([] = it can)."""
    subjects = store.subjects
    where = f"grid.eval_cohort: {train_cohort} -> {eval_cohort}"
    problems = []
    built = (getattr(store, "attrs", None) or {}).get("cohorts") or {}
    recipes = {c: (built.get(c) or {}).get("recipe") for c in (train_cohort, eval_cohort)}
    if all(recipes.values()) and recipes[train_cohort] != recipes[eval_cohort]:
        problems.append(f"{where}: the cohorts were preprocessed with different recipes "
                        f"({recipes[train_cohort]} vs {recipes[eval_cohort]}); rebuild one with the other's")
    missing = [c for c in SPACING_COLUMNS if c not in subjects.columns]
    if missing:
        return problems + [f"{where}: the store's subjects table lacks {', '.join(missing)}, so the cohorts' "
                           "stored pixel sizes cannot be compared; rebuild the store with data_prep/build_store.py"]
    spacing = {c: _median_spacing(subjects, c) for c in (train_cohort, eval_cohort)}
    for cohort, value in spacing.items():
        if value is None:
            problems.append(f"{where}: cohort {cohort} has no recorded pixel spacing")
    if problems:
        return problems
    a, b = spacing[train_cohort], spacing[eval_cohort]
    worst = max(abs(x - y) / max(x, y) for x, y in zip(a, b))
    if worst > tolerance:
        problems.append(f"{where}: stored pixels are {a[0]:.3g} x {a[1]:.3g} mm in {train_cohort} but "
                        f"{b[0]:.3g} x {b[1]:.3g} mm in {eval_cohort} (median; {worst:.0%} apart, "
                        f"transfer_spacing_tolerance is {tolerance:.0%}): thighs would look "
                        f"{'smaller' if b[0] > a[0] else 'larger'} in {eval_cohort}. Rebuild one cohort with "
                        "a --size that gives the other's pixel size, or raise transfer_spacing_tolerance")
    return problems
