"""Log a cell's selected network as a pyfunc that travels: weights, recipe, ranges, card.

    from study.model_package import log_cell_model
    info = log_cell_model(ctx, model, train, summary)    # inside finish_cell
    info.model_uri                                       # runs:/<cell run>/model

The logged model is MLflow's models-from-code: the code is study/pyfunc_model.py (no import of
this repo), the artifacts are the network's `state_dict` (`weights.pt`, read back with
`weights_only=True`) and `model_config.json`, made here from the store and the cell:
  - recipe, slices_per_subject, input_size: how a series becomes the network's input, as in
    training (data_prep/preprocess.py, study/data.py);
  - series_description: the cohort spec's thigh series patterns the store was built with;
  - acquisition: the training subjects' protocol values (store attribute
    cohorts.<cohort>.acquisition, written at ingest by data_prep/dicom/acquisition.py) as
    numeric min/max and categorical value lists; empty for stores built before it, which
    `acquisition.n_recorded` shows;
  - stratum: the cell's sex and BMI strata, which prediction checks;
  - majority: the training majority class and its share (the baseline shown beside a
    prediction), classes, threshold, measure, cell, store hash, selection metric.
The model card (study/model_card.py) is stored with it as `artifacts/model_card.md`.
Signature (input `path`, optional `sex`, `bmi`; param `strict`), an input example and pinned
requirements (the exact versions installed here) make `mlflow models predict` work in a fresh
environment (tests/study/test_pyfunc_model.py).
"""

from __future__ import annotations

import json
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
CONFIG_FILE = "model_config.json"
WEIGHTS_FILE = "weights.pt"
CARD_FILE = "model_card.md"  # study/model_card.py; the registry description too (promote.py)
REQUIREMENTS = ("mlflow", "torch", "torchvision", "numpy", "scipy", "pandas", "pydicom")
CLASSES = ["low", "high"]


def pinned_requirements() -> list[str]:
    """`name==version` of what the pyfunc imports, as installed in this environment."""
    return [f"{name}=={version(name)}" for name in REQUIREMENTS]


def training_acquisition(store, rows: np.ndarray) -> dict[str, Any]:
    """Numeric ranges and categorical values of the training subjects' acquisitions.

    Returns:
        {"numeric": {field: {"min", "max"} or None}, "categorical": {field: [values]},
         "n_training": int, "n_recorded": int} from the store attribute written at ingest;
        the field-of-view of the stored images (spacing x size, always in the subjects
        table) is added as `fov_*_mm` for stores without recorded acquisitions.
    """
    subjects = store.subjects.iloc[np.asarray(rows, dtype=np.int64)]
    by_subject: dict[str, list] = {}
    fields: list[str] = []
    for summary in (store.attrs.get("cohorts") or {}).values():
        acq = (summary or {}).get("acquisition") or {}
        fields = fields or list(acq.get("fields") or [])
        by_subject.update(acq.get("by_subject") or {})
    values = [dict(zip(fields, by_subject[s])) for s in subjects["subject_id"] if s in by_subject]
    numeric: dict[str, Any] = {}
    categorical: dict[str, list] = {}
    for field in fields:
        column = [v[field] for v in values if v.get(field) is not None]
        if field in ("acq_orientation", "acq_series_description"):
            categorical[field] = sorted(set(map(str, column)))
        else:
            numeric[field] = {"min": float(min(column)), "max": float(max(column))} if column else None
    return {"numeric": numeric, "categorical": categorical, "n_training": int(len(subjects)),
            "n_recorded": len(values)}


def stratum(axes: dict[str, Any]) -> dict[str, Any]:
    """The cell's sex/BMI stratum as prediction checks it (bmi: [low incl., high excl.])."""
    from study.data import BMI_STRATA

    bmi = str(axes.get("bmi", "all"))
    bounds = BMI_STRATA.get(bmi, (None, None))
    return {"sex": str(axes.get("sex", "all")), "bmi_label": bmi,
            "bmi": None if bounds == (None, None) else list(bounds)}


def model_config(ctx, store, train, summary: dict[str, Any]) -> dict[str, Any]:
    """Everything study/pyfunc_model.py needs besides the weights (see the module docstring)."""
    labels = np.asarray(ctx.labels["train"]).astype(int)
    n_high = int(labels.sum())
    majority = 1 if n_high * 2 > len(labels) else 0
    cohorts = store.attrs.get("cohorts") or {}
    patterns = sorted({p for c in cohorts.values() for p in (c or {}).get("series_description") or []})
    return {
        "format": 1, "classes": CLASSES, "threshold": 0.5,
        "measure": ctx.cell.measure, "direction": ctx.direction,
        "label_threshold": ctx.threshold, "label_threshold_rule": ctx.threshold_rule,
        "cell": ctx.cell.name, "axes": dict(ctx.cell.axes), "store_hash": ctx.store_hash,
        "recipe": store.recipe.to_dict(), "series_description": patterns or ["THIGH"],
        "slices_per_subject": train.slices_per_subject,
        "input_size": list(train.input_size) if train.input_size else None,
        "acquisition": training_acquisition(store, ctx.split["train"]),
        "stratum": stratum(ctx.cell.axes),
        "majority": {"class": CLASSES[majority],
                     "fraction": float(max(n_high, len(labels) - n_high) / max(1, len(labels))),
                     "n_train": int(len(labels)), "n_train_high": n_high},
        "selected_on": "best_val_score", "val_score": summary.get("best_val_acc"),
    }


def signature():
    """Input `path` (+ optional `sex`, `bmi`), output the prediction table, param `strict`."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "path"), ColSpec("string", "sex", required=False),
                     ColSpec("double", "bmi", required=False)])
    outputs = Schema([ColSpec("double", "p_high"), ColSpec("string", "predicted"),
                      ColSpec("string", "verdict"), ColSpec("string", "reasons"),
                      ColSpec("long", "n_slices")])
    return ModelSignature(inputs=inputs, outputs=outputs,
                          params=ParamSchema([ParamSpec("strict", "boolean", False),
                                              ParamSpec("series_description", "string", "")]))


def log_pyfunc(model, config: dict[str, Any], *, card: str | None = None, name: str = "model"):
    """Log `model` (a ThighResNet) with `config` (and the Markdown `card`, stored as the model's
    `artifacts/model_card.md`) under the active MLflow run; the ModelInfo."""
    import mlflow
    import pandas as pd
    import torch

    with tempfile.TemporaryDirectory(prefix="thigh-pyfunc-") as tmp:
        weights, cfg = Path(tmp) / WEIGHTS_FILE, Path(tmp) / CONFIG_FILE
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, weights)
        cfg.write_text(json.dumps(config, indent=1, sort_keys=True))
        artifacts = {"weights": str(weights), "config": str(cfg)}
        if card is not None:
            (Path(tmp) / CARD_FILE).write_text(card)
            artifacts["card"] = str(Path(tmp) / CARD_FILE)
        example = pd.DataFrame({"path": ["/scans/participant/series-folder"]})  # a refusal: no data
        info = mlflow.pyfunc.log_model(
            name=name, python_model=str(PYFUNC_CODE),
            artifacts=artifacts,
            signature=signature(), input_example=example,
            pip_requirements=pinned_requirements(),
            metadata={k: config[k] for k in ("measure", "cell", "store_hash", "classes", "recipe",
                                              "slices_per_subject", "input_size", "stratum", "majority")},
        )
    return info


def log_cell_model(ctx, model, train, summary: dict[str, Any]):
    """finish_cell's model step: config from the store and the cell, the card from the cell
    run's metrics (counts logged at launch, the summary just logged), then log_pyfunc."""
    from mlflow.tracking import MlflowClient

    from data_prep.store import open_store
    from study.model_card import render_card

    config = model_config(ctx, open_store(ctx.store), train, summary)
    metrics = {**MlflowClient(ctx.tracking_uri).get_run(ctx.cell_run_id).data.metrics, **summary}
    return log_pyfunc(model, config, card=render_card(config, metrics))
