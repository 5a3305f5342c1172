"""Per-cell results as a table and a plot: test accuracy with its 95% CI beside the baseline."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pandas as pd

TABLE_COLUMNS = ["cell", "n_train", "n_val", "n_test", "best_val_acc", "test_baseline_acc",
                 "test_acc", "test_acc_ci_low", "test_acc_ci_high", "test_auroc", "test_perm_p",
                 "size_test_acc", "cnn_minus_size_acc", "status"]


def results_table(results: list[dict]) -> pd.DataFrame:
    """One row per cell. Cells run under the seed-replication protocol report validation
    subjects (also used for selection); their numbers fill the test columns, flagged in `reported`."""
    rows = []
    for r in results:
        r = dict(r)
        if r.get("reported_partition") == "val":
            for key in list(r):
                if key.startswith("val_"):
                    r["test_" + key[len("val_"):]] = r[key]
                elif key.startswith("size_val_"):
                    r["size_test_" + key[len("size_val_"):]] = r[key]
        rows.append(r)
    df = pd.DataFrame(rows)
    if "reported_partition" not in df:
        df["reported_partition"] = "test"
    for col in TABLE_COLUMNS:
        if col not in df:
            df[col] = float("nan") if col != "status" else ""
    return df


def format_table(df: pd.DataFrame) -> str:
    """Fixed-width text table for the terminal: accuracy vs the majority-class baseline, with CI."""
    lines = [f"{'cell':<44} {'n tr/va/te':>12} {'val acc':>8} {'baseline':>9} {'test acc [95% CI]':>22} "
             f"{'AUROC':>6} {'perm p':>7} {'size acc':>8} {'CNN-size':>8}"]
    for _, r in df.iterrows():
        if r["status"] != "ok":
            lines.append(f"{r['cell']:<44} {r['status']}")
            continue
        n = f"{int(r['n_train'])}/{int(r['n_val'])}/{int(r['n_test'])}"
        ci = f"{r['test_acc']:.3f} [{r['test_acc_ci_low']:.2f}, {r['test_acc_ci_high']:.2f}]"
        if r["reported_partition"] == "val":
            ci = "VAL* " + ci
        lines.append(f"{r['cell']:<44} {n:>12} {r['best_val_acc']:>8.3f} {r['test_baseline_acc']:>9.3f} "
                     f"{ci:>22} {r['test_auroc']:>6.3f} {r['test_perm_p']:>7.3f} "
                     f"{r['size_test_acc']:>8.3f} {r['cnn_minus_size_acc']:>+8.3f}")
    if (df["reported_partition"] == "val").any():
        lines.append("VAL*: seed-replication protocol; validation subjects, also used for selection (optimistic)")
    return "\n".join(lines)


def plot_accuracy(df: pd.DataFrame, out: Path, title: str) -> Path:
    """Dot-and-whisker plot of test accuracy (95% bootstrap CI) per cell, baseline as a red tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = df[df["status"] == "ok"].reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(9, 0.6 * max(len(ok), 2) + 2.6))
    y = range(len(ok))
    if len(ok):
        err = [ok["test_acc"] - ok["test_acc_ci_low"], ok["test_acc_ci_high"] - ok["test_acc"]]
        ax.errorbar(ok["test_acc"], y, xerr=err, fmt="o", color="C0", capsize=4, label="test accuracy (95% CI)")
        ax.scatter(ok["test_baseline_acc"], y, marker="|", s=400, color="C3", label="majority-class baseline")
        ax.scatter(ok["best_val_acc"], y, marker="x", color="grey", label="validation accuracy (selection)")
        if ok["size_test_acc"].notna().any():
            ax.scatter(ok["size_test_acc"], y, marker="D", color="C2", s=25, label="body-size baseline (test)")
    ax.axvline(0.5, color="lightgrey", lw=1, zorder=0)
    ax.set_yticks(list(y), ok["cell"].tolist() if len(ok) else [])
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("subject-level accuracy")
    ax.set_title(textwrap.fill(title, 70), fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
