"""Train and evaluate a slice classifier; plain PyTorch (Ray Tune and MLflow wrap it).

Usage::

    from study.engine import fit, evaluate

    result = fit(model, train_loader, val_loader, epochs=50, optimizer="sgd", lr=1e-4,
                 on_epoch=lambda epoch, m: print(epoch, m["val_subject_acc"]))
    test = evaluate(model, test_loader)      # model holds the best-val-epoch weights

Loaders yield ``(x, label, row)`` batches (study.data.SliceDataset). The network sees single
slices; a subject's prediction is the mean of its slices' class-1 probabilities, thresholded
at 0.5, because the labels belong to subjects and accuracy is reported per subject.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
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


def evaluate(model: nn.Module, loader: Iterable, *, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Slice and subject accuracy plus mean slice cross-entropy.

    Returns:
        dict with slice_acc, subject_acc, loss (floats) and subject_rows, subject_probs,
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
        "loss": loss,
        "subject_rows": subject_rows,
        "subject_probs": subject_probs,
        "subject_labels": subject_labels,
    }


def fit(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable | None,
    *,
    epochs: int,
    optimizer: str,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    device: str | torch.device = "cpu",
    on_epoch: Callable[[int, dict[str, float]], bool | None] | None = None,
) -> dict[str, Any]:
    """Train for ``epochs``, validating after each, and keep the best epoch's weights.

    Best = highest validation subject accuracy, ties broken by lower validation loss; those
    weights are loaded back into ``model`` before returning. Without a val_loader the last
    epoch is kept.

    Args:
        model: the network (moved to device).
        train_loader, val_loader: loaders of (x, label, row) batches.
        epochs: number of passes over train_loader.
        optimizer, lr, momentum, weight_decay: see make_optimizer.
        device: torch device.
        on_epoch: called as on_epoch(epoch, metrics) after each epoch (epoch counts from 1;
            metrics: train_loss, val_loss, val_slice_acc, val_subject_acc). It may raise to
            abort (weights are then left as trained), or return True to stop early (the best
            weights are still restored).

    Returns:
        {"history": [metrics per epoch], "best_epoch": int, "best_val_subject_acc": float,
        "best_val_loss": float}.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    model.to(device)
    opt = make_optimizer(optimizer, model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    history: list[dict[str, float]] = []
    best_key: tuple[float, float] | None = None
    best_epoch, best_state = 0, None
    for epoch in range(1, epochs + 1):
        metrics: dict[str, float] = {"epoch": epoch}
        metrics["train_loss"] = train_one_epoch(model, train_loader, opt, device=device)
        if val_loader is not None:
            val = evaluate(model, val_loader, device=device)
            metrics.update(val_loss=val["loss"], val_slice_acc=val["slice_acc"],
                           val_subject_acc=val["subject_acc"])
            key = (val["subject_acc"], -val["loss"])
        else:
            metrics.update(val_loss=math.nan, val_slice_acc=math.nan, val_subject_acc=math.nan)
            key = (float(epoch), 0.0)
        history.append(metrics)
        if best_key is None or key > best_key:
            best_key, best_epoch = key, epoch
            best_state = copy.deepcopy(model.state_dict())
        stop = on_epoch(epoch, dict(metrics)) if on_epoch is not None else None
        if stop is True:
            break
    model.load_state_dict(best_state)
    best = history[best_epoch - 1]
    return {
        "history": history,
        "best_epoch": best_epoch,
        "best_val_subject_acc": best["val_subject_acc"],
        "best_val_loss": best["val_loss"],
    }
