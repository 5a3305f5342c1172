"""The launch's study report: one self-contained HTML file (every figure embedded as base64).

    path = write_report(client, out_dir, grid=grid, df=df, launch_id=..., experiment_id=...,
                        tracking_uri=..., figures={"accuracy_by_stratum.png": path, ...})

It holds the question, the launch's settings (store and its content hash, code commit, the
resolved grid), the Figure-3 plot per stratum and the accuracy-vs-baseline plot, the results
table (accuracy with its 95% CI beside the majority-class and size+age baselines; the exact
McNemar p against the baseline raw, Holm- and BH-adjusted), the measure comparisons, and per
cell: a link to its MLflow run, its ROC curve, confusion matrix and Optuna figures (read back
from the cell run's `figures/` artifacts, so cells kept by --resume are in it too), the
reasons for figures not drawn, and how to open its Optuna journal in optuna-dashboard.
Like everything logged, it carries no subject identifier: counts, metrics and figures only.
"""

from __future__ import annotations

import base64
import html
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from study.figures import FIGURES_DIR, SKIP_TAG
from study.report import _p

REPORT_FILE = "report.html"
# per cell, in this order; other figures of the cell follow
CELL_FIGURE_ORDER = ("roc_test", "confusion_test", "roc_val", "confusion_val", "optimization_history",
                     "param_importances", "slice")
CSS = """body{font-family:sans-serif;margin:2em;max-width:1500px;color:#222}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}img{max-width:100%}.figs img{height:300px;max-width:none;margin:4px}
.note{color:#666;font-size:12px}.bad{color:#b00}pre{background:#f6f6f6;padding:8px;font-size:11px;overflow:auto}
section.cell{border-top:1px solid #ddd;margin-top:1.5em}"""


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI (model-training view)."""
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" title="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _num(value, spec: str = ".3f") -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(v) else format(v, spec)


def _ci(r, key: str) -> str:
    if _num(r.get(key)) == "-":
        return "-"
    return f"{_num(r.get(key))} [{_num(r.get(key + '_ci_low'), '.2f')}, {_num(r.get(key + '_ci_high'), '.2f')}]"


def results_html(df: pd.DataFrame, links: dict[str, str]) -> str:
    """The results table: one row per cell, a link to its run."""
    head = ["cell", "status", "n train/val/test", "val acc (selection)", "majority baseline", "test acc [95% CI]",
            "p vs baseline", "Holm", "BH", "AUROC [95% CI]", "size+age acc [95% CI]", "CNN - size+age",
            "pooled model", "stratum - pooled [95% CI]"]
    rows = []
    for _, r in df.iterrows():
        r = r.to_dict()
        ok = r.get("status") == "ok"
        n = "/".join(_num(r.get(k), ".0f") for k in ("n_train", "n_val", "n_test"))
        name = html.escape(str(r["cell"]))
        link = links.get(r["cell"])
        cell = f'<a href="{html.escape(link)}">{name}</a>' if link else name
        strat = "-"
        if _num(r.get("stratum_minus_pooled_acc")) != "-":
            strat = (f"{_num(r['stratum_minus_pooled_acc'], '+.3f')} [{_num(r.get('stratum_minus_pooled_acc_ci_low'), '+.2f')}, "
                     f"{_num(r.get('stratum_minus_pooled_acc_ci_high'), '+.2f')}]")
        acc = _ci(r, "test_acc") + (" (VAL*)" if r.get("reported_partition") == "val" else "")
        values = [cell, html.escape(str(r.get("status"))), n, _num(r.get("best_val_acc")), _num(r.get("test_baseline_acc")),
                  acc, _p(r.get("test_vs_baseline_p")), _p(r.get("test_vs_baseline_p_holm")),
                  _p(r.get("test_vs_baseline_p_bh")), _ci(r, "test_auroc"), _ci(r, "size_age_test_acc"),
                  _num(r.get("cnn_minus_size_age_acc"), "+.3f"), _num(r.get("pooled_test_acc")), strat]
        tds = "".join(f'<td class="l{"" if ok or i != 1 else " bad"}">{v}</td>' if i < 2 else f"<td>{v}</td>"
                      for i, v in enumerate(values))
        rows.append(f"<tr>{tds}</tr>")
    ths = "".join(f'<th class="l">{h}</th>' if i < 2 else f"<th>{h}</th>" for i, h in enumerate(head))
    note = ("p vs baseline: exact McNemar test of the model against the majority-class predictor on the same "
            "subjects (one-sided); Holm: family-wise, BH: false-discovery-rate adjusted over the launch's cells. "
            "Accuracy CIs: Clopper-Pearson; AUROC: Newcombe. size+age: logistic regression on the thigh areas, "
            "sex and age of the same training subjects. pooled: the cohort's pooled model on this stratum's test "
            "subjects (paired difference).")
    if (df.get("reported_partition") == "val").any():
        note += " VAL*: seed-replication protocol, validation subjects that also chose the model (optimistic)."
    return f"<table><tr>{ths}</tr>{''.join(rows)}</table><p class='note'>{html.escape(note)}</p>"


def pairs_html(pairs: list[dict[str, Any]]) -> str:
    if not pairs:
        return ""
    from study.launch_stats import pairs_table

    table = pairs_table(pairs).to_html(index=False, float_format=lambda v: f"{v:.3f}", border=0, na_rep="-")
    return ("<h2>Measures compared on the test subjects they share</h2>" + table
            + "<p class='note'>Accuracy, each measure on its own labels; exact McNemar, two-sided; Holm over the pairs.</p>")


def _cell_figures(client, run_id: str, tmp: Path) -> list[Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        local = client.download_artifacts(run_id, FIGURES_DIR, str(tmp))
    except Exception:  # a cell that failed before its figures
        return []
    files = sorted(Path(local).glob("*.png"))
    rank = {name: i for i, name in enumerate(CELL_FIGURE_ORDER)}
    return sorted(files, key=lambda p: (rank.get(p.stem.split("_outer")[0], len(rank)), p.stem))


def cell_section(client, row: dict[str, Any], link: str | None, tmp: Path) -> str:
    """One cell: link, figures, figures not drawn and why, its Optuna journals."""
    name = html.escape(str(row["cell"]))
    out = [f'<section class="cell"><h3 id="{name}">{name}</h3>']
    if link:
        out.append(f'<p><a href="{html.escape(link)}">MLflow run {html.escape(str(row["cell_run_id"]))}</a></p>')
    if row.get("status") != "ok":
        out.append(f'<p class="bad">no result: {html.escape(str(row.get("status")))}</p>')
    run_id = row.get("cell_run_id")
    if not run_id:
        return "".join(out) + "</section>"
    run = client.get_run(run_id)
    figs = _cell_figures(client, run_id, tmp / str(run_id))
    if figs:
        out.append('<div class="figs">' + "".join(
            f"<figure style='display:inline-block;margin:0'>{_img(p, p.stem)}<figcaption class='note'>"
            f"{html.escape(p.stem)}</figcaption></figure>" for p in figs) + "</div>")
    skipped = {k[len(SKIP_TAG):]: v for k, v in run.data.tags.items() if k.startswith(SKIP_TAG)}
    for fig, why in sorted(skipped.items()):
        out.append(f"<p class='note'>{html.escape(fig)} not drawn: {html.escape(why)}</p>")
    for key in ("figures_error", "study_record_error", "size_saliency_error"):
        if key in run.data.tags:
            out.append(f"<p class='bad'>{key}: {html.escape(run.data.tags[key][:500])}</p>")
    try:
        journals = [a.path for a in client.list_artifacts(run_id, "optuna")]
    except Exception:
        journals = []
    if journals:
        out.append("<p class='note'>Optuna study (journal): " + ", ".join(html.escape(j) for j in journals)
                   + f". Open it: <code>mlflow artifacts download --run-id {html.escape(run_id)} --artifact-path optuna "
                   "-d study_journals</code>, then <code>optuna-dashboard study_journals/optuna/&lt;file&gt;</code>"
                   " (<code>pip install optuna-dashboard</code>).</p>")
    return "".join(out) + "</section>"


def build_html(client, *, grid, df: pd.DataFrame, launch_id: str, experiment_id: str, tracking_uri: str,
               figures: dict[str, Path], settings: dict[str, Any], pairs: list[dict[str, Any]] | None = None) -> str:
    """The report as one HTML string (see the module docstring for its content).

    Args:
        figures: launch-level PNGs by title (embedded in that order).
        settings: the launch's settings shown as a list (store, content hash, commit, ...).
    """
    links = {r["cell"]: run_link(tracking_uri, experiment_id, r["cell_run_id"])
             for _, r in df.iterrows() if isinstance(r.get("cell_run_id"), str)}
    n_ok = int((df["status"] == "ok").sum())
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
             f"<title>{html.escape(grid.name)}: study report</title><style>{CSS}</style></head><body>",
             f"<h1>{html.escape(grid.name)}: study report</h1>",
             f"<p><b>Question.</b> {html.escape(grid.question)}</p>",
             f"<p>{n_ok} of {len(df)} cell(s) with a result. Launch run: "
             f"<a href='{html.escape(run_link(tracking_uri, experiment_id, launch_id))}'>{html.escape(launch_id)}</a>.</p>",
             "<h2>Launch settings</h2><ul>"]
    parts += [f"<li>{html.escape(str(k))}: <code>{html.escape(str(v))}</code></li>" for k, v in settings.items()]
    parts.append("</ul><details><summary>resolved grid</summary><pre>"
                 + html.escape(json.dumps(grid.to_dict(), indent=2, default=str)) + "</pre></details>")
    parts.append("<h2>Accuracy per stratum</h2>")
    parts += [f"<figure>{_img(path, title)}<figcaption class='note'>{html.escape(title)}</figcaption></figure>"
              for title, path in figures.items() if Path(path).exists()]
    parts.append("<h2>Cells</h2>" + results_html(df, links))
    parts.append(pairs_html(pairs or []))
    parts.append("<h2>Per cell</h2><p class='note'>ROC curve and confusion matrix of the reported subjects "
                 "(the trial selected on validation, evaluated once); Optuna's optimization history, parameter "
                 "importances (fANOVA) and slice plot of the cell's study (one per outer fold under nested CV).</p>")
    with tempfile.TemporaryDirectory() as tmp:
        for _, r in df.iterrows():
            parts.append(cell_section(client, r.to_dict(), links.get(r["cell"]), Path(tmp)))
    parts.append(f"<p class='note'>written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}</p></body></html>")
    return "\n".join(parts)


def write_report(client, out_dir: Path, **kwargs) -> Path:
    """build_html written to out_dir/report.html (folders created); returns the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / REPORT_FILE
    path.write_text(build_html(client, **kwargs), encoding="utf-8")
    return path
