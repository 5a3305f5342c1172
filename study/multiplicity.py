"""Multiplicity across the cells of a launch: Holm (family-wise) and Benjamini-Hochberg (FDR).

    from study.multiplicity import adjust_cells
    results = adjust_cells(results)                  # list of per-cell dicts, e.g. launch results
    r["test_vs_baseline_p_holm"], r["test_vs_baseline_p_bh"], r["multiplicity_family"]

A launch tests many cells; "the best stratum" is a maximum over them, so each cell's raw p is
shown beside its Holm-adjusted p (controls the chance of any false "better than baseline"
in the family) and its BH-adjusted p (controls the expected share of false ones among those
called). The family is every cell of the launch with a p-value, or, when the grid names axes
(`multiplicity_family: [cohort]`), the cells sharing their values on those axes. Cells
without a p-value (failed, or no test partition) are not in any family and get NaN.
Adjustment: statsmodels.stats.multitest.multipletests ("holm", "fdr_bh").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from statsmodels.stats.multitest import multipletests

METHODS = {"holm": "holm", "bh": "fdr_bh"}  # suffix -> statsmodels method


def adjust(pvalues: Sequence[float], method: str) -> np.ndarray:
    """Adjusted p-values ("holm" or "bh"), NaN where the input is NaN (left out of the family)."""
    if method not in METHODS:
        raise ValueError(f"Invalid method {method!r}. Only {', '.join(METHODS)} are supported.")
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, math.nan)
    keep = ~np.isnan(p)
    if keep.any():
        out[keep] = multipletests(p[keep], method=METHODS[method])[1]
    return out


def family_name(axes: dict[str, str], family_by: Sequence[str]) -> str:
    """The family a cell belongs to: "launch", or e.g. "cohort=oai,measure=leg_strength"."""
    return ",".join(f"{a}={axes[a]}" for a in family_by) if family_by else "launch"


def adjust_cells(results: list[dict], *, p_key: str = "test_vs_baseline_p",
                 family_by: Sequence[str] = ()) -> list[dict]:
    """Copies of the per-cell results with Holm and BH adjusted p-values added.

    Args:
        results: one dict per cell holding the cell's axes (cohort, measure, sex, bmi) and,
            when it has one, the raw p-value under p_key (NaN or absent: not tested).
        p_key: the raw p-value's key; seed-replication results may use "val_vs_baseline_p".
        family_by: grid axes defining the families (GridConfig.multiplicity_family); empty:
            one family of every cell.

    Returns:
        New dicts with f"{p_key}_holm", f"{p_key}_bh", "multiplicity_family" and
        "multiplicity_family_size" (cells with a p-value in that family).
    """
    missing = [a for a in family_by for r in results if a not in r]
    if missing:
        raise ValueError(f"multiplicity family axes {sorted(set(missing))} missing from some cell results")
    out = [dict(r) for r in results]
    families: dict[str, list[int]] = {}
    for i, r in enumerate(out):
        r["multiplicity_family"] = family_name(r, family_by)
        families.setdefault(r["multiplicity_family"], []).append(i)
    for members in families.values():
        p = [float(out[i].get(p_key, math.nan)) for i in members]
        holm, bh = adjust(p, "holm"), adjust(p, "bh")
        size = int(np.sum(~np.isnan(p)))
        for i, h, b in zip(members, holm, bh):
            out[i].update({f"{p_key}_holm": float(h), f"{p_key}_bh": float(b), "multiplicity_family_size": size})
    return out
