"""Predict high vs low function for new participants, checking each scan against the model.

    python study/predict.py --dicom data/demo/cohort/volunteers/dicom \
        --labels data/demo/cohort/volunteers/tables/volunteers.csv --out runs/volunteers.csv \
        --salt-file salt.txt [--strict] [--series-description 't1.*tra.*thigh'] [--show-ids]

Participants are found by header, as ingest finds them: every DICOM file under --dicom, at any
depth, grouped by PatientID (data_prep.dicom.find_participants). The registered model (default
`models:/thigh-leg_strength@champion`) is the pyfunc of study/pyfunc_model.py: it brings its
preprocessing recipe, the training subjects' acquisition ranges, its stratum and its training
majority. Per participant it compares the thigh series with the training geometry and
protocol (orientation, pixel spacing, slice thickness and spacing, matrix, TR/TE, field
strength, series description) and the stratum (sex, BMI: from --labels when it has the
columns, else from the header) and gives a verdict: accept, warn (predicted, with reasons) or
refuse (not predicted: unreadable, too few slices, outside the stratum; with --strict, any
warning). The probability is the mean over slices of P(high), the evaluation's rule.

No PHI in the output: participants are shown by the same salted HMAC pseudonym as the store
(`pseudonym(salt, --cohort, PatientID)`, salt from --salt-file or $THIGHMRI_SALT) unless
--show-ids; messages never name a folder or file; the CSV is written with mode 0600. The
baseline printed is the model's training majority class (what a constant guess gets). With
--labels (a CSV with `code` and `exercise` yes/no) agreement with self-reported exercise is
printed beside that baseline: a sanity check on a few people, not an evaluation.
"""

from __future__ import annotations

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

DEFAULT_MODEL = "models:/thigh-leg_strength@champion"
COLUMNS = ["participant", "p_high", "predicted", "verdict", "reasons", "n_slices"]


def load_registered(model_uri: str):
    """The model's python object (study/pyfunc_model.py ThighModel, weights loaded).

    Downloaded into a folder removed afterwards (MLflow's own load_model of a models:/ URI
    would leave a temporary copy behind); weights and config are in memory by then.
    """
    import mlflow

    with tempfile.TemporaryDirectory(prefix="thigh-model-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
        flavors = mlflow.models.Model.load(local).flavors
        if "model_code_path" not in flavors.get("python_function", {}):
            raise ValueError(f"{model_uri} is not a model logged by this version of study/launch.py "
                             "(no pyfunc from code with a preprocessing recipe); launch and promote again")
        model = mlflow.pyfunc.load_model(local).unwrap_python_model()
    return model


def find(dicom_dir: Path):
    """find_participants(dicom_dir); errors that name no path."""
    from data_prep.dicom import find_participants

    if not dicom_dir.is_dir():
        raise FileNotFoundError("--dicom is not a directory")
    found = find_participants(dicom_dir)
    if not found.participants:
        raise ValueError("--dicom holds no DICOM file with a PatientID")
    return found


def read_labels(labels_csv: Path) -> pd.DataFrame:
    """The labels table indexed by code; columns exercise and optionally sex, bmi."""
    labels = pd.read_csv(labels_csv, dtype=str)
    missing = [c for c in ("code", "exercise") if c not in labels]
    if missing:
        raise ValueError(f"--labels: column(s) {missing} missing; columns: {', '.join(labels.columns)}")
    return labels.set_index(labels["code"].str.strip())


def predict_folder(model, dicom_dir: Path, *, labels: pd.DataFrame | None = None, strict: bool = False,
                   series_description: str | None = None, name=lambda key: key,
                   progress: bool = False) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One row per participant (COLUMNS, plus exercise/agrees with labels) and a summary.

    Args:
        model: load_registered's object.
        name: participant key -> the id shown (a pseudonym unless --show-ids).
    """
    found = find(dicom_dir)
    rows = []
    patterns = [series_description] if series_description else None
    for i, participant in enumerate(found.participants, 1):
        sex = bmi = None
        if labels is not None and participant.key in labels.index:
            row = labels.loc[participant.key]
            sex = row.get("sex") if isinstance(row.get("sex"), str) else None
            bmi = pd.to_numeric(row.get("bmi"), errors="coerce") if "bmi" in labels else None
            bmi = None if bmi is None or pd.isna(bmi) else float(bmi)
        sex = {"m": "male", "f": "female"}.get((sex or "").strip().lower()[:1]) if sex else None
        result = model.predict_one(participant.paths(), sex, bmi, strict, patterns)
        rows.append({"participant": name(participant.key), **result, "_key": participant.key})
        if progress:
            print(f"\r{i}/{len(found.participants)} participants", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    df = pd.DataFrame(rows, columns=[*COLUMNS, "_key"])
    majority = model.config["majority"]
    unused = Counter(category for _, category, _ in found.problems)
    summary: dict[str, Any] = {"measure": model.config["measure"], "cell": model.config["cell"],
                               "majority": majority, "verdicts": Counter(df["verdict"]),
                               "files_not_used": dict(unused)}
    if labels is not None:
        # self-reported exercise "yes" is taken as high function, "no" as low
        exercise = labels["exercise"].str.strip().str.lower()
        df["exercise"] = df["_key"].map(exercise)
        expected = df["exercise"].map({"yes": "high", "no": "low"})
        predicted = df["predicted"].isin(["high", "low"])
        df["agrees"] = (df["predicted"] == expected).where(expected.notna() & predicted)
        scored = df[df["agrees"].notna()]
        if len(scored):
            from scipy.stats import binomtest

            correct = int(scored["agrees"].astype(bool).sum())
            ci = binomtest(correct, len(scored)).proportion_ci(0.95)
            baseline = float((expected[scored.index] == majority["class"]).mean())
            summary.update(n_scored=len(scored), correct=correct, accuracy=correct / len(scored),
                           accuracy_ci=(ci.low, ci.high), baseline=baseline)
    return df.drop(columns="_key"), summary


def write_private_csv(df: pd.DataFrame, path: Path) -> None:
    """The CSV with mode 0600 from its creation (an existing file is narrowed first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", newline="") as f:
        df.to_csv(f, index=False)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Predict high/low function for participants' DICOM folders.")
    p.add_argument("--dicom", required=True, type=Path, help="DICOM folder, any layout: participants by PatientID")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"registered model URI (default {DEFAULT_MODEL})")
    p.add_argument("--labels", type=Path, default=None,
                   help="CSV with columns code, exercise (yes/no); sex (M/F), bmi used for the stratum check")
    p.add_argument("--out", type=Path, default=None, help="write predictions to this CSV (mode 0600)")
    p.add_argument("--strict", action="store_true", help="refuse a participant on any warning")
    p.add_argument("--series-description", default=None,
                   help="regular expression for this site's thigh series (default: the training cohort's)")
    p.add_argument("--cohort", default="volunteers", help="cohort name in the pseudonym (default volunteers)")
    p.add_argument("--salt-file", type=Path, default=None, help="pseudonym salt (default $THIGHMRI_SALT)")
    p.add_argument("--show-ids", action="store_true", help="show PatientIDs instead of pseudonyms")
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or the local server")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep the table readable
    import mlflow

    from data_prep.pseudonyms import SaltError, load_salt, pseudonym
    from study.tracking import resolve_tracking_uri

    try:  # every check that costs nothing comes before the model download
        if args.labels is not None and not args.labels.is_file():
            raise FileNotFoundError("--labels does not exist")
        labels = read_labels(args.labels) if args.labels is not None else None
        if args.show_ids:
            def name(key: str) -> str:
                return key
        else:
            salt = load_salt(args.salt_file)

            def name(key: str) -> str:
                return pseudonym(salt, args.cohort, key)
        mlflow.set_tracking_uri(resolve_tracking_uri(args.tracking_uri))
        model = load_registered(args.model)
        df, summary = predict_folder(model, args.dicom, labels=labels, strict=args.strict,
                                     series_description=args.series_description, name=name,
                                     progress=sys.stderr.isatty())
    except (ValueError, FileNotFoundError, SaltError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    majority = summary["majority"]
    print(f"model {args.model} (measure {summary['measure']}, trained on cell {summary['cell']})")
    print(f"baseline: the training majority class '{majority['class']}' "
          f"({majority['fraction']:.0%} of {majority.get('n_train', '?')} training subjects)")
    shown = df.assign(reasons=df["reasons"].str.slice(0, 200))
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    counts = summary["verdicts"]
    print("verdicts: " + ", ".join(f"{v} {counts.get(v, 0)}" for v in ("accept", "warn", "refuse"))
          + (" (--strict: warnings refuse)" if args.strict else ""))
    if summary["files_not_used"]:
        print("files under --dicom not used: " + ", ".join(f"{k} {v}" for k, v in
                                                           sorted(summary["files_not_used"].items())))
    if "accuracy" in summary:
        lo, hi = summary["accuracy_ci"]
        print(f"agreement with self-reported exercise: {summary['correct']}/{summary['n_scored']} = "
              f"{summary['accuracy']:.2f} (95% CI {lo:.2f}-{hi:.2f}); training-majority baseline "
              f"{summary['baseline']:.2f}")
    if args.out:
        write_private_csv(df, args.out)
        print("predictions written to --out (mode 0600)")
    return 1 if counts.get("refuse") else 0


if __name__ == "__main__":
    raise SystemExit(main())
