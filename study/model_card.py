"""The model card: what a registered model was trained on, how good it is against its
baselines, how it was chosen, what it is for and what it is not.

    from study.model_card import render_card
    text = render_card(config, metrics)   # Markdown

`config` is the pyfunc's model_config.json (study/model_package.py: recipe, acquisition ranges,
stratum, majority, store hash); `metrics` are the cell run's metrics (counts n_*, test_*
with CIs, baseline, body-size baseline, selection score). study/model_package.py stores the card
with the model (`artifacts/model_card.md`); study/promote.py copies it into the registered
version's description. Pseudonymous aggregates only: no subject appears in a card.
"""

from __future__ import annotations

import math
from typing import Any

FIELD_LABELS = {  # acquisition field -> row label of the training-range table
    "acq_rows": "Matrix rows", "acq_cols": "Matrix columns",
    "acq_pixel_spacing_row_mm": "Pixel spacing, rows (mm)", "acq_pixel_spacing_col_mm": "Pixel spacing, columns (mm)",
    "acq_slice_thickness_mm": "Slice thickness (mm)", "acq_slice_spacing_mm": "Slice spacing (mm)",
    "acq_repetition_time_ms": "TR (ms)", "acq_echo_time_ms": "TE (ms)", "acq_field_strength_t": "Field strength (T)",
    "acq_orientation": "Orientation (cosines)", "acq_series_description": "Series description",
}


def _num(metrics: dict[str, float], key: str, fmt: str = ".3f") -> str:
    v = metrics.get(key)
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _with_ci(metrics: dict[str, float], key: str, ci: str | None = None) -> str:
    """"0.700 (0.600-0.800)": the value and its CI (keys `<ci>_ci_low/high`, ci defaults to key)."""
    ci = ci or key
    return f"{_num(metrics, key)} ({_num(metrics, ci + '_ci_low')}-{_num(metrics, ci + '_ci_high')})"


def _counts(metrics: dict[str, float]) -> list[str]:
    rows = ["| Partition | Subjects | High | Low |", "|---|---|---|---|"]
    for part in ("train", "val", "test"):
        n, pos = metrics.get(f"n_{part}"), metrics.get(f"n_{part}_high")  # study/plan.py counts()
        if n is None:
            continue
        high = "n/a" if pos is None else f"{int(pos)}"
        low = "n/a" if pos is None else f"{int(n - pos)}"
        rows.append(f"| {part} | {int(n)} | {high} | {low} |")
    return rows


def _ranges(acq: dict[str, Any]) -> list[str]:
    rows = [f"Acquisition of the {acq.get('n_recorded', 0)} of {acq.get('n_training', 0)} training subjects "
            "recorded at ingest (prediction warns outside these, 5% tolerance):", "",
            "| Parameter | Training range |", "|---|---|"]
    for field, rng in (acq.get("numeric") or {}).items():
        shown = "not recorded" if not rng else (f"{rng['min']:.4g}" if rng["min"] == rng["max"]
                                                 else f"{rng['min']:.4g} - {rng['max']:.4g}")
        rows.append(f"| {FIELD_LABELS.get(field, field)} | {shown} |")
    for field, values in (acq.get("categorical") or {}).items():
        rows.append(f"| {FIELD_LABELS.get(field, field)} | {', '.join(values) or 'not recorded'} |")
    return rows


def render_card(config: dict[str, Any], metrics: dict[str, float]) -> str:
    """The Markdown model card of one cell's model."""
    axes = config.get("axes") or {}
    stratum = config.get("stratum") or {}
    majority = config.get("majority") or {}
    recipe = config.get("recipe") or {}
    threshold = config.get("label_threshold")
    threshold = f"{threshold:.4g}" if isinstance(threshold, (int, float)) else threshold
    test_p = next((k for k in ("test_vs_baseline_p", "test_perm_p") if k in metrics), None)
    lines = [
        f"# Model card: thigh-{config.get('measure')} from cell `{config.get('cell')}`",
        "",
        f"ResNet18 classifying **high vs low {config.get('measure')}** ({config.get('direction', '?')} is better; "
        f"label threshold {threshold} by rule `{config.get('label_threshold_rule')}`) "
        "from axial mid-thigh MRI slices; the participant's probability is the mean over slices.",
        "",
        "## Intended use",
        "",
        "Research only: studying whether thigh MRI carries information about physical function. "
        "**Not a medical device**; not for diagnosis, screening or any decision about a person.",
        "",
        "## Data",
        "",
        f"- Cohort: {axes.get('cohort', '?')}; stratum: sex {stratum.get('sex', 'all')}, "
        f"BMI {stratum.get('bmi_label', 'all')} (prediction refuses participants outside it).",
        f"- Store content hash: `{config.get('store_hash')}`",
        f"- Recipe: {recipe.get('n_slices')} central slices, resized to {recipe.get('size')}, intensities clipped to "
        f"percentiles {recipe.get('p_low')}-{recipe.get('p_high')} (recipe version {recipe.get('version')}); "
        f"the model sees the central {config.get('slices_per_subject') or 'all'} slices at "
        f"{config.get('input_size') or recipe.get('size')}.",
        f"- Thigh series description patterns: {', '.join(config.get('series_description') or [])}",
        "",
        *_counts(metrics),
        "",
        *_ranges(config.get("acquisition") or {}),
        "",
        "## Performance against baselines (held-out test subjects, 95% CIs: Clopper-Pearson for accuracies, "
        "Newcombe's score interval for AUROC, paired BCa bootstrap for differences)",
        "",
        "| Measure | Value |", "|---|---|",
        f"| Accuracy | {_with_ci(metrics, 'test_acc')} |",
        f"| Training-majority baseline ('{majority.get('class', '?')}') | {_with_ci(metrics, 'test_baseline_acc', 'test_baseline')} |",
        f"| Balanced accuracy | {_with_ci(metrics, 'test_balanced_acc')} |",
        f"| AUROC | {_with_ci(metrics, 'test_auroc')} |",
        f"| Accuracy minus baseline (paired) | {_with_ci(metrics, 'test_vs_baseline_diff')} |",
        f"| Body-size baseline (size+age) accuracy | {_num(metrics, 'size_age_test_acc')} |",
        f"| CNN minus size+age accuracy (paired) | {_with_ci(metrics, 'cnn_minus_size_age_acc')} |",
        f"| CNN minus size+age AUROC (paired) | {_with_ci(metrics, 'cnn_minus_size_age_auroc')} |",
        f"| Test versus baseline p ({test_p or 'none'}"
        f"{'; exact McNemar, one-sided' if test_p == 'test_vs_baseline_p' else ''}) | "
        f"{_num(metrics, test_p, '.3g') if test_p else 'n/a'} |",
        "",
        "## Selection",
        "",
        f"Hyperparameters were searched per cell and the trial chosen on `{config.get('selected_on', 'best_val_score')}` "
        f"(validation subjects; {_num(metrics, 'best_val_acc')} validation accuracy), never on test. The test numbers "
        "above were computed once, after selection. Promotion to `champion` is a separate recorded step that "
        "requires the test to beat the baseline (or a recorded --force).",
        "",
        "## Known limits",
        "",
        "- Labels are a median split of one function measure: a binary summary of a continuous trait.",
        "- Trained on one cohort's protocol; other scanners, fields of view, sequences or populations are "
        "outside what was tested (prediction warns or refuses, see the ranges above).",
        "- Accuracy close to the body-size baseline means the images may add little beyond body size.",
        f"- A constant guess of the training majority scores {_num(majority, 'fraction')} on training subjects.",
        "",
    ]
    return "\n".join(lines)
