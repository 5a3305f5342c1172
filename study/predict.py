"""Predict high vs low function for new participants straight from their DICOM folders.

    python study/predict.py --dicom data/demo/cohort/volunteers/dicom \
        --labels data/demo/cohort/volunteers/tables/volunteers.csv --out runs/volunteers.csv

Participants are found by header, as ingest finds them: every DICOM file under --dicom, at any
depth, grouped by PatientID (a study code, never a patient name; data_prep.dicom.find_participants).
The registered model (default `models:/thigh-leg_strength@champion`) carries the store's
preprocessing recipe in its metadata; the thigh series is found and preprocessed with the
same data_prep functions the store was built with, then every slice is classified and the
participant's probability is the mean over slices (the rule used in evaluation).
With --labels (a CSV with `code` and `exercise` yes/no), accuracy against self-reported
exercise is printed beside the majority-class baseline; it is a sanity check on 8 people,
not an evaluation.
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
from pathlib import Path

import numpy as np
import pandas as pd

DEFAULT_MODEL = "models:/thigh-leg_strength@champion"


def load_registered(model_uri: str):
    """The PyTorch model and its metadata (recipe, input size, measure, threshold)."""
    import mlflow

    # one download into a folder removed afterwards: mlflow's own get_model_info/load_model
    # would each leave a temp dir behind (tens of MB per call)
    with tempfile.TemporaryDirectory(prefix="thigh-model-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
        metadata = mlflow.models.Model.load(local).metadata or {}
        if "recipe" not in metadata:
            raise ValueError(f"{model_uri} has no preprocessing recipe in its metadata; "
                             "register a model logged by study/launch.py")
        model = mlflow.pytorch.load_model(local, map_location="cpu")
    model.eval()
    return model, metadata


def participant_folders(dicom_dir: Path) -> list:
    """The participants under `dicom_dir`, grouped by PatientID at any depth (sorted by it)."""
    from data_prep.dicom import find_participants

    if not dicom_dir.is_dir():
        raise FileNotFoundError(f"--dicom {str(dicom_dir)!r} is not a directory")
    participants = find_participants(dicom_dir).participants
    if not participants:
        raise ValueError(f"--dicom {str(dicom_dir)!r} holds no DICOM file with a PatientID")
    return participants


def predict_participant(model, metadata: dict, participant) -> dict:
    import torch

    from data_prep.dicom import read_thigh_volume
    from data_prep.preprocess import Recipe, apply_recipe
    from study.data import central_slices, to_model_input

    recipe = Recipe.from_dict(metadata["recipe"])
    volume, _geometry, _selection = read_thigh_volume(participant.paths())
    images, _stats = apply_recipe(volume, recipe)
    keep = central_slices(len(images), metadata.get("slices_per_subject"))
    size = tuple(metadata["input_size"]) if metadata.get("input_size") else None
    x = to_model_input(images[keep], size)
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1)[:, 1].numpy()
    p_high = float(np.mean(probs))
    return {"participant": participant.key, "p_high": p_high, "predicted": "high" if p_high >= 0.5 else "low",
            "n_slices": int(len(probs))}


def predict_folder(model_uri: str, dicom_dir: Path, labels_csv: Path | None = None) -> tuple[pd.DataFrame, dict]:
    model, metadata = load_registered(model_uri)
    rows, problems = [], []
    for participant in participant_folders(dicom_dir):
        try:
            rows.append(predict_participant(model, metadata, participant))
        except (ValueError, FileNotFoundError, OSError) as exc:
            problems.append(f"{participant.key}: {exc}")
            rows.append({"participant": participant.key, "p_high": np.nan, "predicted": "error", "n_slices": 0})
    df = pd.DataFrame(rows)
    summary: dict = {"measure": metadata.get("measure"), "cell": metadata.get("cell"), "problems": problems}
    if labels_csv is not None:
        labels = pd.read_csv(labels_csv, dtype=str)
        for col in ("code", "exercise"):
            if col not in labels:
                raise ValueError(f"--labels {labels_csv}: column {col!r} missing; columns: {', '.join(labels.columns)}")
        # self-reported exercise "yes" is taken as high function, "no" as low
        exercise = labels.set_index("code")["exercise"].str.strip().str.lower()
        df["exercise"] = df["participant"].map(exercise)
        expected = df["exercise"].map({"yes": "high", "no": "low"})
        df["agrees"] = (df["predicted"] == expected).where(expected.notna() & df["predicted"].isin(["high", "low"]))
        scored = df[df["agrees"].notna()]
        if len(scored):
            from scipy.stats import binomtest

            correct = int(scored["agrees"].astype(bool).sum())
            ci = binomtest(correct, len(scored)).proportion_ci(0.95)
            majority = scored["exercise"].value_counts().iloc[0] / len(scored)
            summary.update(n_scored=len(scored), correct=correct, accuracy=correct / len(scored),
                           accuracy_ci=(ci.low, ci.high), baseline=float(majority))
    return df, summary


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Predict high/low function for participants' DICOM folders.")
    p.add_argument("--dicom", required=True, type=Path, help="DICOM folder, any layout: participants by PatientID")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"registered model URI (default {DEFAULT_MODEL})")
    p.add_argument("--labels", type=Path, default=None, help="CSV with columns code, exercise (yes/no)")
    p.add_argument("--out", type=Path, default=None, help="write predictions to this CSV")
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or the local server")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep the table readable
    import mlflow

    from study.tracking import resolve_tracking_uri

    if args.labels is not None and not args.labels.is_file():
        print(f"error: --labels {str(args.labels)!r} does not exist", file=sys.stderr)
        return 2
    mlflow.set_tracking_uri(resolve_tracking_uri(args.tracking_uri))
    try:
        df, summary = predict_folder(args.model, args.dicom, args.labels)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"model {args.model} (measure {summary['measure']}, trained on cell {summary['cell']})")
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if "accuracy" in summary:
        lo, hi = summary["accuracy_ci"]
        print(f"agreement with self-reported exercise: {summary['correct']}/{summary['n_scored']} = "
              f"{summary['accuracy']:.2f} (95% CI {lo:.2f}-{hi:.2f}); majority baseline {summary['baseline']:.2f}")
    for problem in summary["problems"]:
        print(f"warning: {problem}", file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.out, index=False)
        print(f"predictions written to {args.out}")
    return 0 if not summary["problems"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
