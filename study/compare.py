"""Paired comparisons between the cells of one launch, on the test subjects they share.

    from study.compare import launch_comparisons

    # per cell: its selected model's test predictions {"rows", "labels", "probs"} (store rows,
    # 0/1 labels of that cell, probabilities of "high"); nested CV: all outer folds pooled
    per_cell, measure_pairs = launch_comparisons({plan.cell: predictions, ...}, seed=0)
    per_cell["oai__leg_strength__sex-female__bmi-all"]["stratum_minus_pooled_auroc"]

Two questions a single cell cannot answer:
- Does the signal survive within a stratum? Each stratum cell (sex or BMI not "all") is
  compared with the pooled cell of its cohort and measure (sex=all, bmi=all) on the
  stratum's own test subjects. With one split per cohort (study/splits.py) those are a subset
  of the pooled cell's test subjects, so the pooled model's predictions for them exist: the
  difference is paired, and not confounded by a different test set.
- Which measure is predicted best? Cells of one cohort and stratum that differ only in the
  measure are compared on the test subjects who have both measures.

Labels. Under `threshold: cohort` a subject has the same label in the stratum and the pooled
cell (one median per cohort and measure), so accuracy and AUROC are compared directly.
Under `threshold: stratum` the stratum's labels use the stratum's median while the pooled
model was trained (and its 0.5 cut placed) for the cohort median: its accuracy against the
stratum's labels would measure the shifted cut, not the signal. There only the AUROC
(threshold-free: does the pooled model rank the stratum's subjects as well?) is compared,
against the stratum's labels; the accuracy keys are NaN and `pooled_n_label_differs` says
how many test subjects the two cells label differently. Measures have different labels by
nature: each model is scored against its own measure's labels (accuracy: how often each
gets its own target right on the same people), so only accuracies are compared there.

Tests are two-sided (no direction is hypothesised); methods in study/paired.py. Each kind of
comparison is one Holm family within the launch (`*_p_holm`).
"""

from __future__ import annotations

import dataclasses

import math
from itertools import combinations

import numpy as np

from study.config import Cell
from study.engine import SUBJECT_THRESHOLD
from study.metrics import accuracy, auroc
from study.multiplicity import adjust
from study.paired import accuracy_difference, auroc_difference

STRATUM_KEYS = ("pooled_n_test", "pooled_n_label_differs", "pooled_test_acc", "pooled_test_auroc",
                "stratum_minus_pooled_acc", "stratum_minus_pooled_acc_ci_low", "stratum_minus_pooled_acc_ci_high",
                "stratum_minus_pooled_acc_p", "stratum_minus_pooled_auroc", "stratum_minus_pooled_auroc_ci_low",
                "stratum_minus_pooled_auroc_ci_high", "stratum_minus_pooled_auroc_p")


def pooled_cell(cell: Cell) -> Cell:
    """The cell of the same cohort, measure (and other axes) over every sex and BMI."""
    return dataclasses.replace(cell, sex="all", bmi="all")


def _check(name: str, p: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows, labels, probs = (np.asarray(p[k]) for k in ("rows", "labels", "probs"))
    if not (rows.shape == labels.shape == probs.shape) or rows.ndim != 1:
        raise ValueError(f"{name}: rows, labels and probs must be equal 1-D arrays, got "
                         f"{rows.shape}, {labels.shape}, {probs.shape}")
    if np.unique(rows).size != rows.size:
        raise ValueError(f"{name}: a store row appears twice among the test predictions")
    return rows.astype(np.int64), labels.astype(np.int64), probs.astype(float)


def _at(rows: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Positions in `rows` of each of `wanted` (all present)."""
    order = np.argsort(rows)
    return order[np.searchsorted(rows, wanted, sorter=order)]


def stratum_vs_pooled(stratum: dict, pooled: dict, *, n_boot: int = 2000, seed: int = 0,
                      alpha: float = 0.05) -> dict[str, float]:
    """The pooled model scored on the stratum's test subjects, and stratum minus pooled.

    Args:
        stratum, pooled: {"rows", "labels", "probs"} of each cell's test subjects.

    Returns:
        STRATUM_KEYS (see the module docstring for which are NaN under threshold: stratum).

    Raises:
        ValueError: a stratum test subject has no pooled prediction (the cells were not
            split together).
    """
    s_rows, y, s_probs = _check("stratum", stratum)
    p_rows, p_labels, p_probs = _check("pooled", pooled)
    missing = np.setdiff1d(s_rows, p_rows)
    if missing.size:
        raise ValueError(f"{missing.size} of the stratum's {s_rows.size} test subjects are not among the pooled "
                         "cell's test subjects; strata and pooled cell must share one split per cohort")
    at = _at(p_rows, s_rows)
    pooled_probs, pooled_own = p_probs[at], p_labels[at]
    differs = int(np.sum(pooled_own != y))
    s_pred = (s_probs >= SUBJECT_THRESHOLD).astype(np.int64)
    p_pred = (pooled_probs >= SUBJECT_THRESHOLD).astype(np.int64)
    out = dict.fromkeys(STRATUM_KEYS, math.nan)
    out.update(pooled_n_test=float(s_rows.size), pooled_n_label_differs=float(differs),
               pooled_test_auroc=auroc(y, pooled_probs))
    if differs == 0:
        acc = accuracy_difference(s_pred == y, p_pred == y, n_boot=n_boot, seed=seed, alpha=alpha)
        out.update(pooled_test_acc=accuracy(y, p_pred), stratum_minus_pooled_acc=acc["diff"],
                   stratum_minus_pooled_acc_ci_low=acc["ci_low"], stratum_minus_pooled_acc_ci_high=acc["ci_high"],
                   stratum_minus_pooled_acc_p=acc["p"])
    roc = auroc_difference(y, s_probs, pooled_probs, n_boot=n_boot, seed=seed, alpha=alpha)
    out.update(stratum_minus_pooled_auroc=roc["diff"], stratum_minus_pooled_auroc_ci_low=roc["ci_low"],
               stratum_minus_pooled_auroc_ci_high=roc["ci_high"], stratum_minus_pooled_auroc_p=roc["p"])
    return out


def measure_difference(a: dict, b: dict, *, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05
                       ) -> dict[str, float]:
    """Two measures' models on the test subjects who have both: each scored on its own labels.

    Returns:
        n_shared, acc_a, acc_b, auroc_a, auroc_b, a_minus_b_acc, a_minus_b_acc_ci_low,
        a_minus_b_acc_ci_high, a_minus_b_acc_p (exact McNemar, two-sided); NaN when no
        subject is shared.
    """
    a_rows, a_y, a_probs = _check("measure a", a)
    b_rows, b_y, b_probs = _check("measure b", b)
    shared = np.intersect1d(a_rows, b_rows)
    out = {"n_shared": float(shared.size)}
    if shared.size == 0:
        return {**out, **dict.fromkeys(("acc_a", "acc_b", "auroc_a", "auroc_b", "a_minus_b_acc", "a_minus_b_acc_ci_low",
                                         "a_minus_b_acc_ci_high", "a_minus_b_acc_p"), math.nan)}
    ia, ib = _at(a_rows, shared), _at(b_rows, shared)
    ya, yb, pa, pb = a_y[ia], b_y[ib], a_probs[ia], b_probs[ib]
    ca, cb = (pa >= SUBJECT_THRESHOLD) == ya, (pb >= SUBJECT_THRESHOLD) == yb
    d = accuracy_difference(ca, cb, n_boot=n_boot, seed=seed, alpha=alpha)
    return {**out, "acc_a": float(ca.mean()), "acc_b": float(cb.mean()), "auroc_a": auroc(ya, pa),
            "auroc_b": auroc(yb, pb), "a_minus_b_acc": d["diff"], "a_minus_b_acc_ci_low": d["ci_low"],
            "a_minus_b_acc_ci_high": d["ci_high"], "a_minus_b_acc_p": d["p"]}


def launch_comparisons(predictions: dict[Cell, dict], *, n_boot: int = 2000, seed: int = 0,
                       alpha: float = 0.05) -> tuple[dict[str, dict[str, float]], list[dict]]:
    """Every stratum-vs-pooled and measure-vs-measure comparison a launch allows.

    Args:
        predictions: each cell with a selected model -> its test predictions {"rows",
            "labels", "probs"} (cells that failed are simply absent).

    Returns:
        (per stratum cell name -> STRATUM_KEYS plus "stratum_minus_pooled_acc_p_holm" and
        "stratum_minus_pooled_auroc_p_holm" (Holm over the launch's stratum cells); a stratum
        whose pooled cell is absent from the grid or failed gets nothing),
        (one dict per measure pair: cohort, sex, bmi, measure_a, measure_b, cell_a, cell_b,
        measure_difference()'s keys, and "a_minus_b_acc_p_holm" over all pairs).
    """
    per_cell: dict[str, dict[str, float]] = {}
    for cell, preds in predictions.items():
        pooled = pooled_cell(cell)
        if cell != pooled and pooled in predictions:
            per_cell[cell.name] = stratum_vs_pooled(preds, predictions[pooled], n_boot=n_boot, seed=seed, alpha=alpha)
    for key in ("stratum_minus_pooled_acc_p", "stratum_minus_pooled_auroc_p"):
        names = list(per_cell)
        for name, p in zip(names, adjust([per_cell[n][key] for n in names], "holm")):
            per_cell[name][f"{key}_holm"] = float(p)

    pairs = []
    groups: dict[tuple[str, str, str], list[Cell]] = {}
    for cell in predictions:  # cells that differ in the measure only (ablation axes equal)
        groups.setdefault(dataclasses.replace(cell, measure=""), []).append(cell)
    for key, cells in sorted(groups.items(), key=lambda kv: kv[0].name):
        cohort, sex, bmi = key.cohort, key.sex, key.bmi
        for a, b in combinations(sorted(cells, key=lambda c: c.measure), 2):
            d = measure_difference(predictions[a], predictions[b], n_boot=n_boot, seed=seed, alpha=alpha)
            pairs.append({"cohort": cohort, "sex": sex, "bmi": bmi, "measure_a": a.measure, "measure_b": b.measure,
                          "cell_a": a.name, "cell_b": b.name, **d})
    for pair, p in zip(pairs, adjust([r["a_minus_b_acc_p"] for r in pairs], "holm")):
        pair["a_minus_b_acc_p_holm"] = float(p)
    return per_cell, pairs
