"""A cell's figures on its MLflow run (artifacts under `figures/`).

- Of each Optuna study (one per cell; one per outer fold under nested CV, file names suffixed
  `_outer<j>`), Optuna's own matplotlib visualisations: `optimization_history`,
  `param_importances` (fANOVA, Optuna's default evaluator) and `slice` (each searched parameter
  against the selection score).
- Of the reported subjects' predictions (the selected trial on the test subjects; pooled over
  the outer folds under nested CV; the validation subjects under seed_replication):
  `roc_<partition>` and `confusion_<partition>` (scikit-learn's displays, predicted high when
  p >= study.metrics.SUBJECT_THRESHOLD, as the accuracy).

A figure that cannot be drawn is not an error: the run gets the tag
`figure_skipped.<figure>` with the reason (e.g. fewer than two completed trials for the
importances), and the HTML report shows that reason in its place.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np

FIGURES_DIR = "figures"
SKIP_TAG = "figure_skipped."
TARGET_NAME = "best_val_score (selection metric, larger is better)"
DPI = 100


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # cell tasks and CI have no display
    import matplotlib.pyplot as plt

    return plt


def _save(ax_or_axes, out: Path) -> Path:
    plt = _pyplot()
    fig = np.atleast_1d(ax_or_axes).ravel()[0].figure
    with warnings.catch_warnings():  # Optuna's slice axes are not tight_layout-compatible: harmless
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
    fig.savefig(out, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return out


def study_figures(journal: Path, study_name: str, out_dir: Path, suffix: str = "") -> tuple[list[Path], dict[str, str]]:
    """Optuna's figures of one study read back from its journal file.

    Returns:
        (PNG paths written, {figure name: why it was not drawn}).
    """
    import optuna
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    from study.optuna_journal import journal_storage

    study = optuna.load_study(study_name=study_name, storage=journal_storage(journal))
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varied = [name for name in sorted({p for t in complete for p in t.params})
              if len({repr(t.params.get(name)) for t in complete}) > 1]
    paths: list[Path] = []
    skipped: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if not complete:
            skipped[f"optimization_history{suffix}"] = "no completed trial"
            skipped[f"slice{suffix}"] = "no completed trial"
        else:
            paths.append(_save(ovm.plot_optimization_history(study, target_name=TARGET_NAME),
                               out_dir / f"optimization_history{suffix}.png"))
            warnings.simplefilter("ignore", UserWarning)  # one value searched: "identical xlims"
            paths.append(_save(ovm.plot_slice(study, target_name=TARGET_NAME), out_dir / f"slice{suffix}.png"))
        if len(complete) < 2:
            skipped[f"param_importances{suffix}"] = (f"{len(complete)} completed trial(s); importances need at least 2")
        elif len({t.value for t in complete}) < 2:
            skipped[f"param_importances{suffix}"] = "every completed trial has the same score: nothing to attribute"
        elif not varied:
            skipped[f"param_importances{suffix}"] = ("no searched parameter took more than one value "
                                                     "in the completed trials")
        else:
            paths.append(_save(ovm.plot_param_importances(study, target_name=TARGET_NAME),
                               out_dir / f"param_importances{suffix}.png"))
    return paths, skipped


def prediction_figures(labels, probs, out_dir: Path, partition: str = "test") -> tuple[list[Path], dict[str, str]]:
    """ROC curve and confusion matrix of the reported subjects (one prediction per subject).

    Args:
        labels: 0 (low function) / 1 (high function) per subject.
        probs: the model's probability of "high" per subject.
    """
    from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

    from study.metrics import SUBJECT_THRESHOLD

    plt = _pyplot()
    labels, probs = np.asarray(labels, dtype=int), np.asarray(probs, dtype=float)
    paths: list[Path] = []
    skipped: dict[str, str] = {}
    if len(labels) == 0:
        return paths, {f"roc_{partition}": "no subject", f"confusion_{partition}": "no subject"}
    if len(set(labels.tolist())) < 2:
        skipped[f"roc_{partition}"] = f"the {partition} subjects are all of one class; a ROC curve needs both"
    else:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        RocCurveDisplay.from_predictions(labels, probs, ax=ax, name="CNN", plot_chance_level=True)
        ax.set_title(f"ROC, {len(labels)} {partition} subjects ({int(labels.sum())} high)", fontsize=9)
        paths.append(_save(ax, out_dir / f"roc_{partition}.png"))
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ConfusionMatrixDisplay.from_predictions(labels, (probs >= SUBJECT_THRESHOLD).astype(int), labels=[0, 1],
                                            display_labels=["low", "high"], ax=ax, colorbar=False)
    ax.set_title(f"{partition} subjects (predicted high when p >= {SUBJECT_THRESHOLD:g})", fontsize=9)
    paths.append(_save(ax, out_dir / f"confusion_{partition}.png"))
    return paths, skipped


def _log(client, run_id: str, paths: list[Path], skipped: dict[str, str]) -> None:
    from study import tracking

    for path in paths:
        client.log_artifact(run_id, str(path), FIGURES_DIR)
    if skipped:
        tracking.set_tags(client, run_id, {f"{SKIP_TAG}{k}": v for k, v in skipped.items()})


def log_study_figures(client, run_id: str, journals: list[tuple[str, Path]]) -> None:
    """Optuna's figures of each of the cell's studies, (study name, journal file) each."""
    with tempfile.TemporaryDirectory() as tmp:
        paths, skipped = [], {}
        for name, journal in journals:
            suffix = f"_{name.rsplit('__', 1)[-1]}" if len(journals) > 1 else ""
            p, s = study_figures(journal, name, Path(tmp), suffix)
            paths += p
            skipped.update(s)
        _log(client, run_id, paths, skipped)


def log_prediction_figures(client, run_id: str, predictions: dict, partition: str = "test") -> None:
    """ROC and confusion matrix of the reported subjects' predictions ({"labels", "probs"})."""
    with tempfile.TemporaryDirectory() as tmp:
        paths, skipped = prediction_figures(predictions["labels"], predictions["probs"], Path(tmp), partition)
        _log(client, run_id, paths, skipped)
