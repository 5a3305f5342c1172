"""Train and evaluate a slice classifier; plain PyTorch (Ray Tune and MLflow wrap it).

Usage::

    from study.engine import fit, evaluate

    result = fit(model, train_loader, val_loader, TrainConfig(epochs=50, lr=1e-4),
                 on_epoch=lambda epoch, m, state: print(epoch, m["val_subject_acc"]))
    test = evaluate(model, test_loader)      # model holds the best-val-epoch weights

Loaders yield ``(x, label, row)`` batches (study.data.SliceDataset). The network sees single
slices; a subject's prediction is the mean of its slices' class-1 probabilities, thresholded
at 0.5, because the labels belong to subjects and accuracy is reported per subject.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

OPTIMIZERS = ("sgd", "adamw")

# A subject is predicted high function when its mean slice probability reaches this.
SUBJECT_THRESHOLD = 0.5


def make_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter],
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over the parameters that require grad.

    Args:
        name: "sgd" or "adamw" (case-insensitive).
        params: model parameters; frozen ones (requires_grad False) are dropped.
        lr: learning rate.
        momentum: SGD momentum (ignored by AdamW).
        weight_decay: L2 (SGD) / decoupled (AdamW) weight decay.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: every parameter has requires_grad False")
    key = name.lower()
    if key == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if key == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"Invalid optimizer {name}. Only sgd and adamw are supported.")


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    *,
    device: str | torch.device = "cpu",
) -> float:
    """One pass over ``loader``; returns the mean per-slice cross-entropy."""
    model.train()
    total, count = 0.0, 0
    for x, y, _ in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * y.shape[0]
        count += y.shape[0]
    if count == 0:
        raise ValueError("training loader yielded no samples")
    return total / count


@torch.no_grad()
def _logits(model: nn.Module, loader: Iterable, device: str | torch.device):
    model.eval()
    logits, labels, rows = [], [], []
    for x, y, r in loader:
        logits.append(model(x.to(device, non_blocking=True)).float().cpu())
        labels.append(y)
        rows.append(r)
    if not logits:
        raise ValueError("evaluation loader yielded no samples")
    return torch.cat(logits), torch.cat(labels).long(), torch.cat(rows).long()


def predict(
    model: nn.Module, loader: Iterable, *, device: str | torch.device = "cpu"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slice-level predictions in eval mode without gradients.

    Returns:
        (probability of class 1 per slice, slice labels, slice store rows).
    """
    logits, labels, rows = _logits(model, loader, device)
    probs = torch.softmax(logits, dim=1)[:, 1]
    return probs.numpy(), labels.numpy(), rows.numpy()


def aggregate_by_subject(
    probs: np.ndarray, labels: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Subject probability = mean of its slices' class-1 probabilities.

    Returns:
        (sorted unique rows, subject probabilities, subject labels).

    Raises:
        ValueError: slices of one subject carry different labels.
    """
    probs, labels, rows = np.asarray(probs, float), np.asarray(labels), np.asarray(rows)
    unique, inverse = np.unique(rows, return_inverse=True)
    counts = np.bincount(inverse)
    subject_probs = np.bincount(inverse, weights=probs) / counts
    subject_labels = np.zeros(unique.size, dtype=np.int64)
    subject_labels[inverse] = labels
    if not np.array_equal(subject_labels[inverse], labels):
        raise ValueError("slices of one subject have different labels; labels must be per subject")
    return unique, subject_probs, subject_labels


def balanced_accuracy(labels: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over the classes present (0.5 for a constant predictor on two classes)."""
    recalls = [float(np.mean(pred[labels == c] == c)) for c in np.unique(labels)]
    return float(np.mean(recalls)) if recalls else math.nan


def rank_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUROC by the Mann-Whitney rank formula (ties count half); NaN with one class."""
    from scipy.stats import rankdata

    labels = np.asarray(labels)
    n_pos, n_neg = int(np.sum(labels == 1)), int(np.sum(labels == 0))
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores)
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def evaluate(model: nn.Module, loader: Iterable, *, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Slice and subject accuracy plus mean slice cross-entropy.

    Returns:
        dict with slice_acc, subject_acc, subject_balanced_acc, subject_auroc, loss (floats)
        and subject_rows, subject_probs,
        subject_labels (arrays, for the metrics module).
    """
    logits, labels, rows = _logits(model, loader, device)
    loss = F.cross_entropy(logits, labels).item()
    probs = torch.softmax(logits, dim=1)[:, 1].numpy()
    slice_acc = float((logits.argmax(1) == labels).float().mean())
    subject_rows, subject_probs, subject_labels = aggregate_by_subject(probs, labels.numpy(), rows.numpy())
    subject_pred = (subject_probs >= SUBJECT_THRESHOLD).astype(np.int64)
    return {
        "slice_acc": slice_acc,
        "subject_acc": float((subject_pred == subject_labels).mean()),
        "subject_balanced_acc": balanced_accuracy(subject_labels, subject_pred),
        "subject_auroc": rank_auroc(subject_labels, subject_probs),
        "loss": loss,
        "subject_rows": subject_rows,
        "subject_probs": subject_probs,
        "subject_labels": subject_labels,
    }


@dataclass
class FitState:
    """Where fit() stands after an epoch: everything needed to continue it exactly.

    A trial checkpoint holds this (plus the trained module's weights): fit(..., state=...)
    then resumes at ``epoch + 1`` with the same optimizer moments, the same shuffling (the
    train loader's generator state) and the same best-so-far, so a resumed trial follows the
    uninterrupted one step for step.
    """

    epoch: int = 0  # last finished epoch
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_key: tuple[float, ...] | None = None
    best_state: dict[str, torch.Tensor] | None = None  # the trained module's weights at best_epoch
    optimizer_state: dict[str, Any] | None = None
    generator_state: torch.Tensor | None = None  # the train loader's shuffle generator
    torch_rng_state: torch.Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FitState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def accuracy_key(metrics: dict[str, float]) -> tuple[float, ...]:
    """Default epoch ranking: highest validation subject accuracy, ties -> lower loss."""
    return (metrics["val_subject_acc"], -metrics["val_loss"])


def fit(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable | None,
    train: Any,
    *,
    device: str | torch.device = "cpu",
    on_epoch: Callable[[int, dict[str, float], FitState], bool | None] | None = None,
    state: FitState | None = None,
    select_key: Callable[[dict[str, float]], tuple[float, ...]] = accuracy_key,
) -> dict[str, Any]:
    """Train for ``train.epochs``, validating after each, and keep the best epoch's weights.

    Best = the highest ``select_key(epoch metrics)`` (default: validation subject accuracy,
    ties -> lower validation loss); those weights are loaded back into ``model`` before
    returning. Without a val_loader the last epoch is kept.

    Args:
        model: the module to train (moved to device).
        train_loader, val_loader: loaders of (x, label, row) batches.
        train: the trial's settings (study.config.TrainConfig): epochs, optimizer, lr,
            momentum, weight_decay are read from it.
        device: torch device.
        on_epoch: called as on_epoch(epoch, metrics, state) after each epoch (epoch counts
            from 1; metrics: train_loss, val_loss, val_slice_acc, val_subject_acc,
            val_subject_balanced_acc, val_subject_auroc, time_s (the epoch's compute);
            state: the FitState to checkpoint).
            It may raise to abort (weights are then left as trained), or return True to stop
            early (the best weights are still restored).
        state: a FitState from a checkpoint: continue after its epoch. The caller has
            already loaded the module's weights of that epoch into ``model``.
        select_key: ranks epochs from their metrics; larger is better.

    Returns:
        {"history": [metrics per epoch], "best_epoch": int, "best_val_subject_acc": float,
        "best_val_loss": float, "state": the final FitState}.
    """
    epochs = int(train.epochs)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    model.to(device)
    opt = make_optimizer(train.optimizer, model.parameters(), lr=train.lr, momentum=train.momentum,
                         weight_decay=train.weight_decay)
    generator = getattr(train_loader, "generator", None)
    st = state if state is not None else FitState()
    if state is not None:
        if st.optimizer_state is not None:
            opt.load_state_dict(st.optimizer_state)
        if generator is not None and st.generator_state is not None:
            generator.set_state(st.generator_state)
        if st.torch_rng_state is not None:
            torch.set_rng_state(st.torch_rng_state)
    for epoch in range(st.epoch + 1, epochs + 1):
        started = time.perf_counter()
        metrics: dict[str, float] = {"epoch": epoch}
        metrics["train_loss"] = train_one_epoch(model, train_loader, opt, device=device)
        if val_loader is not None:
            val = evaluate(model, val_loader, device=device)
            metrics.update(val_loss=val["loss"], val_slice_acc=val["slice_acc"],
                           val_subject_acc=val["subject_acc"],
                           val_subject_balanced_acc=val.get("subject_balanced_acc", math.nan),
                           val_subject_auroc=val.get("subject_auroc", math.nan))
            key = tuple(select_key(metrics))
        else:
            metrics.update(val_loss=math.nan, val_slice_acc=math.nan, val_subject_acc=math.nan,
                           val_subject_balanced_acc=math.nan, val_subject_auroc=math.nan)
            key = (float(epoch),)
        metrics["time_s"] = time.perf_counter() - started  # training + validation compute
        st.history.append(metrics)
        st.epoch = epoch
        if st.best_key is None or key > tuple(st.best_key):
            st.best_key, st.best_epoch = key, epoch
            st.best_state = copy.deepcopy(model.state_dict())
        st.optimizer_state = opt.state_dict()
        st.generator_state = generator.get_state() if generator is not None else None
        st.torch_rng_state = torch.get_rng_state()
        stop = on_epoch(epoch, dict(metrics), st) if on_epoch is not None else None
        if stop is True:
            break
    if st.best_state is None:
        raise ValueError("fit resumed from a state with no best epoch and had no epoch left to run")
    model.load_state_dict(st.best_state)
    best = st.history[st.best_epoch - 1]
    return {
        "history": st.history,
        "best_epoch": st.best_epoch,
        "best_val_subject_acc": best["val_subject_acc"],
        "best_val_loss": best["val_loss"],
        "state": st,
    }
