"""Per-cell results as a table and a plot: test accuracy with its 95% CI beside the baseline,
the test against that baseline (raw, Holm and BH adjusted p), and, for strata, the pooled
model scored on the stratum's own test subjects with the paired difference."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pandas as pd

from study.multiplicity import adjust_cells

TABLE_COLUMNS = ["cell", "n_train", "n_val", "n_test", "best_val_acc", "test_baseline_acc",
                 "test_acc", "test_acc_ci_low", "test_acc_ci_high", "test_vs_baseline_diff",
                 "test_vs_baseline_diff_ci_low", "test_vs_baseline_diff_ci_high", "test_vs_baseline_p",
                 "test_vs_baseline_p_holm", "test_vs_baseline_p_bh", "test_auroc", "test_auroc_ci_low",
                 "test_auroc_ci_high", "pooled_test_acc", "pooled_test_auroc", "stratum_minus_pooled_acc",
                 "stratum_minus_pooled_acc_ci_low", "stratum_minus_pooled_acc_ci_high", "stratum_minus_pooled_acc_p",
                 "stratum_minus_pooled_auroc", "stratum_minus_pooled_auroc_p", "size_age_test_acc",
                 "cnn_minus_size_age_acc", "cnn_minus_size_age_auroc", "status"]


def results_table(results: list[dict], *, family_by: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per cell. Cells run under the seed-replication protocol report validation
    subjects (also used for selection); their numbers fill the test columns, flagged in
    `reported_partition`. Holm / BH columns are computed here (family: `family_by`, see
    study.multiplicity) when the results do not carry them already."""
    rows = []
    for r in results:
        r = dict(r)
        if r.get("reported_partition") == "val":
            for key in list(r):
                if key.startswith("val_"):
                    r["test_" + key[len("val_"):]] = r[key]
                elif key.startswith("size_age_val_"):
                    r["size_age_test_" + key[len("size_age_val_"):]] = r[key]
        rows.append(r)
    if rows and not any("test_vs_baseline_p_holm" in r for r in rows) and all(
            a in r for r in rows for a in family_by):
        rows = adjust_cells(rows, p_key="test_vs_baseline_p", family_by=family_by)
    df = pd.DataFrame(rows)
    if "reported_partition" not in df:
        df["reported_partition"] = "test"
    for col in TABLE_COLUMNS:
        if col not in df:
            df[col] = float("nan") if col != "status" else ""
    return df


def _f(value, spec: str, width: int) -> str:
    """A number formatted, or a dash when missing (NaN/None): strata only, failed parts."""
    try:
        if value is None or math.isnan(float(value)):
            return f"{'-':>{width}}"
    except (TypeError, ValueError):
        return f"{'-':>{width}}"
    return f"{format(float(value), spec):>{width}}"


def _p(value) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(v) else ("<0.001" if v < 0.001 else f"{v:.3f}")


def format_table(df: pd.DataFrame) -> str:
    """Fixed-width text table for the terminal: accuracy vs the majority-class baseline with CI,
    the exact McNemar test against it (raw, Holm, BH), AUROC, the pooled model on a stratum's
    test subjects (stratum - pooled), and the size+age baseline."""
    lines = [f"{'cell':<44} {'n tr/va/te':>12} {'val acc':>7} {'base':>5} {'test acc [95% CI]':>22} "
             f"{'p base':>7} {'Holm':>7} {'BH':>7} {'AUROC':>5} {'pooled':>6} {'strat-pooled [95% CI]':>23} "
             f"{'size+age':>8} {'CNN-size':>8}"]
    for _, r in df.iterrows():
        if r["status"] != "ok":
            lines.append(f"{r['cell']:<44} {r['status']}")
            continue
        n = f"{int(r['n_train'])}/{int(r['n_val'])}/{int(r['n_test'])}"
        ci = f"{r['test_acc']:.3f} [{r['test_acc_ci_low']:.2f}, {r['test_acc_ci_high']:.2f}]"
        if r["reported_partition"] == "val":
            ci = "VAL* " + ci
        strat = "-"
        if pd.notna(r["stratum_minus_pooled_acc"]):
            strat = (f"{r['stratum_minus_pooled_acc']:+.3f} [{r['stratum_minus_pooled_acc_ci_low']:+.2f}, "
                     f"{r['stratum_minus_pooled_acc_ci_high']:+.2f}]")
        elif pd.notna(r["stratum_minus_pooled_auroc"]):
            strat = f"AUROC {r['stratum_minus_pooled_auroc']:+.3f}"
        lines.append(f"{r['cell']:<44} {n:>12} {_f(r['best_val_acc'], '.3f', 7)} {_f(r['test_baseline_acc'], '.3f', 5)} "
                     f"{ci:>22} {_p(r['test_vs_baseline_p']):>7} {_p(r['test_vs_baseline_p_holm']):>7} "
                     f"{_p(r['test_vs_baseline_p_bh']):>7} {_f(r['test_auroc'], '.3f', 5)} "
                     f"{_f(r['pooled_test_acc'], '.3f', 6)} {strat:>23} {_f(r['size_age_test_acc'], '.3f', 8)} "
                     f"{_f(r['cnn_minus_size_age_acc'], '+.3f', 8)}")
    lines.append("p base: exact McNemar test of the model against the majority-class predictor on the same "
                 "subjects (one-sided); Holm: family-wise, BH: false-discovery-rate adjusted over the cells")
    lines.append("pooled: the cohort's pooled model on this stratum's own test subjects; strat-pooled: paired "
                 "accuracy difference (AUROC only where the stratum has its own threshold)")
    if (df["reported_partition"] == "val").any():
        lines.append("VAL*: seed-replication protocol; validation subjects, also used for selection (optimistic)")
    return "\n".join(lines)


def plot_accuracy(df: pd.DataFrame, out: Path, title: str) -> Path:
    """Dot-and-whisker plot of test accuracy (95% CI) per cell: the baseline as a red tick, the
    pooled model on the stratum's test subjects as an open square, and per cell the test
    against the baseline (raw and Holm-adjusted p) and stratum - pooled in the right margin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = df[df["status"] == "ok"].reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(11, 0.6 * max(len(ok), 2) + 2.6))
    y = range(len(ok))
    if len(ok):
        err = [ok["test_acc"] - ok["test_acc_ci_low"], ok["test_acc_ci_high"] - ok["test_acc"]]
        ax.errorbar(ok["test_acc"], y, xerr=err, fmt="o", color="C0", capsize=4, label="test accuracy (95% CI)")
        ax.scatter(ok["test_baseline_acc"], y, marker="|", s=400, color="C3", label="majority-class baseline")
        ax.scatter(ok["best_val_acc"], y, marker="x", color="grey", label="validation accuracy (selection)")
        if ok["pooled_test_acc"].notna().any():
            ax.scatter(ok["pooled_test_acc"], y, marker="s", facecolors="none", edgecolors="C1", s=50,
                       label="pooled model on the stratum's test subjects")
        if ok["size_age_test_acc"].notna().any():
            ax.scatter(ok["size_age_test_acc"], y, marker="D", color="C2", s=25, label="size+age baseline (test)")
        for i, r in ok.iterrows():
            text = f"p={_p(r['test_vs_baseline_p'])}, Holm {_p(r['test_vs_baseline_p_holm'])}"
            if pd.notna(r["stratum_minus_pooled_acc"]):
                text += f"; vs pooled {r['stratum_minus_pooled_acc']:+.2f} (p={_p(r['stratum_minus_pooled_acc_p'])})"
            ax.annotate(text, xy=(1.01, i), xycoords=("axes fraction", "data"), va="center", fontsize=7)
    ax.axvline(0.5, color="lightgrey", lw=1, zorder=0)
    ax.set_yticks(list(y), ok["cell"].tolist() if len(ok) else [])
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("subject-level accuracy; p: exact McNemar vs the baseline, one-sided")
    ax.set_title(textwrap.fill(title, 70), fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


STRATUM_AXES = ("sex", "bmi")  # a cell's stratum within its cohort and measure (the grid's other axes)
STRATA_PLOT = "accuracy_by_stratum.png"


def _stratum_label(r) -> str:
    parts = [f"{a}={r[a]}" for a in STRATUM_AXES if a in r and pd.notna(r[a])]
    return "\n".join(parts) if parts else str(r["cell"])


def plot_strata(df: pd.DataFrame, out: Path, title: str) -> Path:
    """The seed's Figure 3 for every stratum: one panel per cohort and measure, in it one group
    per stratum (sex x BMI) of three bars: the CNN's test accuracy with its 95% CI, the
    majority-class baseline (the larger training class's share of the test subjects) and the
    size+age baseline (logistic regression on thigh areas, sex and age; its 95% CI), with the
    exact McNemar p against the majority baseline (raw / Holm) above each group. A cell without
    a result keeps its place, with its status instead of bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ok = df.reset_index(drop=True)  # every stratum; one without a result says so in its place
    panel_keys = [a for a in ("cohort", "measure") if a in ok]
    panels = list(ok.groupby(panel_keys, sort=False)) if panel_keys and len(ok) else [((), ok)]
    width = max(6.0, 1.3 * max((len(g) for _, g in panels), default=1) + 2)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 3.4 * len(panels) + 1.2), squeeze=False)
    bars = (("test_acc", "CNN test accuracy (95% CI)", "C0"),
            ("test_baseline_acc", "majority-class baseline", "C3"),
            ("size_age_test_acc", "size+age baseline (95% CI)", "C2"))
    for ax, (key, group) in zip(axes[:, 0], panels):
        group = group.reset_index(drop=True)
        x = np.arange(len(group))
        for k, (col, label, color) in enumerate(bars):
            values = pd.to_numeric(group[col], errors="coerce").to_numpy()
            has = np.isfinite(values)  # a cell without a result (or this baseline) draws nothing
            err = None
            lo, hi = f"{col}_ci_low", f"{col}_ci_high"
            if lo in group and hi in group:
                err = np.nan_to_num(np.vstack([values - pd.to_numeric(group[lo], errors="coerce").to_numpy(),
                                               pd.to_numeric(group[hi], errors="coerce").to_numpy() - values])
                                    .clip(min=0))[:, has]
            ax.bar(x[has] + (k - 1) * 0.27, values[has], 0.27, yerr=err, capsize=3, color=color,
                   label=label, alpha=0.9 if k == 0 else 0.7)
        for i, r in group.iterrows():
            text = (f"p={_p(r['test_vs_baseline_p'])}\nHolm {_p(r['test_vs_baseline_p_holm'])}" if r["status"] == "ok"
                    else "no result:\n" + textwrap.shorten(str(r["status"]), 24, placeholder="..."))
            ax.annotate(text, xy=(i, 1.0), ha="center", va="bottom", fontsize=7,
                        color="black" if r["status"] == "ok" else "C3")
        ax.set_xticks(x, [_stratum_label(r) for _, r in group.iterrows()], fontsize=8)
        ax.set_ylim(0, 1.15)
        ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.axhline(0.5, color="lightgrey", lw=1, zorder=0)
        ax.set_ylabel("subject-level accuracy")
        name = " / ".join(str(v) for v in (key if isinstance(key, tuple) else (key,)))
        ax.set_title(name or "cells", fontsize=9, loc="left")
    axes[0, 0].legend(loc="lower center", bbox_to_anchor=(0.5, 1.12), ncol=3, fontsize=8, frameon=False)
    fig.suptitle(textwrap.fill(title, 90), fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
