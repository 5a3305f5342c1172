"""After a launch's cells: the statistics that need every cell at once.

    from study.launch_stats import close_statistics
    rows, pairs = close_statistics(client, launch_id, grid, plans, rows)

A single cell cannot know how many other cells were tested beside it, nor score another
cell's model on its subjects. Once the runner is done (or stopped), this:
- adjusts every cell's test against the baseline for multiplicity across the launch
  (Holm and Benjamini-Hochberg over the family the grid names, study/multiplicity.py) and
  logs `test_vs_baseline_p_holm`, `_bh` and the family on each cell run;
- scores the pooled cell's model on each stratum cell's test subjects and logs the paired
  difference (stratum - pooled) on the stratum cell's run (study/compare.py), read back from
  the per-subject predictions each cell logged (`test_predictions.json`); a stratum run under
  nested CV beside a holdout pooled cell has no paired subjects (tag `comparisons_skipped`);
- compares the measures of one cohort and stratum on the test subjects they share, logged
  on the launch run as `measure_differences.csv`.
It runs on every cell with a result, including cells kept from before a --resume, so the
adjusted numbers always cover the launch's whole family (a resumed launch recomputes them).
Cells without a result (failed, unfinished) are not in any family and get nothing.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from study import tracking
from study.config import GridConfig
from study.plan import CellPlan

PAIRS_FILE = "measure_differences.csv"
PAIR_COLUMNS = ["cohort", "sex", "bmi", "measure_a", "measure_b", "n_shared", "acc_a", "acc_b",
                "a_minus_b_acc", "a_minus_b_acc_ci_low", "a_minus_b_acc_ci_high", "a_minus_b_acc_p",
                "a_minus_b_acc_p_holm"]


def _p_key(row: dict[str, Any]) -> str:
    return "val_vs_baseline_p" if row.get("reported_partition") == "val" else "test_vs_baseline_p"


def _finite(values: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in values.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[k] = f
    return out


def adjust_rows(rows: list[dict[str, Any]], family_by: tuple[str, ...]) -> list[dict[str, Any]]:
    """Holm and BH across the cells that have a test against the baseline (stale adjusted
    values from an earlier, partial launch are dropped first)."""
    from study.multiplicity import adjust_cells

    fresh = [{k: v for k, v in r.items() if not (k.endswith("_p_holm") or k.endswith("_p_bh")
                                                 or k.startswith("multiplicity_family"))} for r in rows]
    keys = {_p_key(r) for r in fresh if r.get("status") == "ok"} or {"test_vs_baseline_p"}
    for key in sorted(keys):  # one protocol per launch: in practice one key
        fresh = adjust_cells(fresh, p_key=key, family_by=family_by)
    return fresh


def close_statistics(client, launch_id: str, grid: GridConfig, plans: list[CellPlan],
                     rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Multiplicity and paired comparisons across the launch's cells, logged to MLflow.

    Args:
        rows: the results-table rows in plan order (cell, axes, status, cell_run_id, metrics).

    Returns:
        (the rows with the adjusted p-values and the stratum comparisons added, the
        measure-pair comparisons).
    """
    from study.compare import launch_comparisons, pooled_cell
    from study.evaluation import load_predictions

    by_name = {p.cell.name: p for p in plans}
    predictions = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("cell_run_id") and r["cell"] in by_name:
            got = load_predictions(client, r["cell_run_id"])
            if got is not None:
                predictions[by_name[r["cell"]].cell] = got
    # a stratum run under nested CV (small_cells: nested_cv) tests all its subjects, its pooled
    # cell (holdout) only its test set: no paired comparison exists; the cell run says so
    protocol = {p.cell: p.protocol for p in plans}
    apart = {c for c in predictions if protocol[c] != protocol.get(pooled_cell(c), protocol[c])}
    for cell in apart:
        run_id = next(r["cell_run_id"] for r in rows if r["cell"] == cell.name)
        client.set_tag(run_id, "comparisons_skipped",
                       f"{protocol[cell]} stratum beside a {protocol[pooled_cell(cell)]} pooled cell: "
                       "their test subjects are not paired")
    per_cell, pairs = launch_comparisons({c: v for c, v in predictions.items() if c not in apart},
                                         seed=grid.split.seed)
    rows = [{**r, **per_cell.get(r["cell"], {})} for r in rows]
    rows = adjust_rows(rows, grid.multiplicity_family)
    for r in rows:
        if r.get("status") != "ok" or not r.get("cell_run_id"):
            continue
        key = _p_key(r)
        tracking.log_metrics(client, r["cell_run_id"], _finite(
            {k: r.get(k) for k in (f"{key}_holm", f"{key}_bh", "multiplicity_family_size")}
            | per_cell.get(r["cell"], {})))
        tracking.set_tags(client, r["cell_run_id"], {"multiplicity_family": r["multiplicity_family"]})
    if pairs:
        with tempfile.TemporaryDirectory() as tmp:
            pairs_table(pairs).to_csv(Path(tmp) / PAIRS_FILE, index=False)
            tracking.log_file(client, launch_id, Path(tmp) / PAIRS_FILE)
    return rows, pairs


def pairs_table(pairs: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(pairs)
    return df[[c for c in PAIR_COLUMNS if c in df] + [c for c in df if c not in PAIR_COLUMNS]]


def format_pairs(pairs: list[dict[str, Any]]) -> str:
    """Which measure is predicted best: paired accuracy differences on shared test subjects."""
    if not pairs:
        return ""
    lines = ["measures compared on the test subjects they share (accuracy, each on its own labels; "
             "exact McNemar, two-sided, Holm over the pairs):"]
    for r in pairs:
        lines.append(f"  {r['cohort']} sex={r['sex']} bmi={r['bmi']}: {r['measure_a']} - {r['measure_b']} = "
                     f"{r['a_minus_b_acc']:+.3f} [{r['a_minus_b_acc_ci_low']:+.3f}, {r['a_minus_b_acc_ci_high']:+.3f}] "
                     f"on {int(r['n_shared'])}, p={r['a_minus_b_acc_p']:.3f} (Holm {r['a_minus_b_acc_p_holm']:.3f})"
                     if r["n_shared"] else f"  {r['cohort']} {r['measure_a']} - {r['measure_b']}: no shared test subject")
    return "\n".join(lines)
