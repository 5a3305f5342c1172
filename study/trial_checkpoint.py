"""A trial's checkpoint: what it holds, how it is written through Tune and read back.

Used by study/trainable.py (writing, restoring a trial) and study/evaluation.py (the selected
trial's model). A head trained on cached features is checkpointed without its frozen prefix:
the prefix is rebuilt from the seed and checked against the digest the checkpoint holds.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from study.config import TrainConfig

CHECKPOINT_FILE = "model_state.pt"


def _checkpoint(train: TrainConfig, run_id: str, fit_model, model, how: dict, st) -> dict:
    """What a trial checkpoint holds: the trained module (only the head when the frozen
    prefix came from the feature cache: the prefix is rebuilt from the seed and checked by
    its digest), fit's state (optimizer, shuffling, best epoch and its weights) and the run."""
    from study import features

    cached = how.get("feature_cache") == "used"
    return {"format": 2, "train": dataclasses.asdict(train), "mlflow_run_id": run_id, "epoch": st.epoch,
            "module": "head" if cached else "model", "module_state": fit_model.state_dict(),
            "prefix_digest": features.weights_digest(model) if cached else None, "fit": st.to_dict()}


def _report_with_checkpoint(report: dict, payload: dict) -> None:
    import torch
    from ray import tune

    with tempfile.TemporaryDirectory() as tmp:
        torch.save(payload, Path(tmp) / CHECKPOINT_FILE)
        tune.report(report, checkpoint=tune.Checkpoint.from_directory(tmp))


def load_checkpoint(checkpoint) -> dict | None:
    """A trial checkpoint's payload (tensors and plain values only: loaded weights_only)."""
    import torch

    if checkpoint is None:
        return None
    with checkpoint.as_directory() as ckpt_dir:
        return torch.load(Path(ckpt_dir) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def _check_prefix(saved: dict, model, how: dict) -> None:
    from study import features

    if saved.get("module") == "head":
        if how.get("feature_cache") != "used":
            raise RuntimeError(f"the checkpoint trained a head on cached features, but now: {how['feature_cache']}")
        if saved.get("prefix_digest") != features.weights_digest(model):
            raise RuntimeError("the rebuilt frozen prefix differs from the checkpoint's (weights or seed changed)")


def model_from_checkpoint(saved: dict, train: TrainConfig, *, state: str = "best"):
    """The full ThighResNet at the checkpoint's best epoch (state="best") or last epoch."""
    from study import features
    from study.model import build_model, seed_everything

    weights = saved["fit"]["best_state"] if state == "best" else saved["module_state"]
    seed_everything(train.seed)  # the frozen prefix of a head checkpoint comes from the seed
    model = build_model(weights=train.weights if saved.get("module") == "head" else "none", freeze=train.freeze)
    if saved.get("module") == "head":
        if saved.get("prefix_digest") != features.weights_digest(model):
            raise RuntimeError("the rebuilt frozen prefix differs from the trial's (weights file or seed changed)")
        features.FeatureHead(model).load_state_dict(weights)
    else:
        model.load_state_dict(weights)
    return model
