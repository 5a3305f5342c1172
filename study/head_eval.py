"""Per-epoch validation of many two-class heads at once, and the best-epoch selection rules.

Used by study.head_trainer. ``Validator(val)(dw, db)`` scores K heads given by their logit
differences d = feats @ dw.T + db (see study/head_kernels.py) with the definitions of
study.engine.evaluate and study.metrics: mean per-slice cross-entropy, slice accuracy
(argmax; an exact tie is class 0), subject probability = mean of its slices' class-1
probabilities, predicted 1 at >= SUBJECT_THRESHOLD, subject accuracy, balanced accuracy
(mean recall over the classes present) and AUROC (NaN with one class). One matrix product
and a few vectorised reductions per epoch serve all K heads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy.special import expit
from scipy.stats import rankdata

from study.engine import SUBJECT_THRESHOLD


def _higher(v: float) -> float:
    """Key part for a metric where higher is better; NaN (undefined) ranks below every number."""
    return -math.inf if math.isnan(v) else v


def _lower(v: float) -> float:
    """Key part for a metric where lower is better (a loss); NaN ranks below every number."""
    return -math.inf if math.isnan(v) else -v


# name -> key of an epoch's metrics; the highest key wins, ties keep the earlier epoch.
SELECT_RULES: dict[str, Callable[[dict[str, float]], tuple]] = {
    # engine.fit's rule (today's default): subject accuracy, ties -> lower validation loss
    "acc": lambda m: (_higher(m["val_subject_acc"]), _lower(m["val_loss"])),
    "balanced_acc": lambda m: (_higher(m["val_balanced_acc"]), _lower(m["val_loss"])),
    "auroc": lambda m: (_higher(m["val_auroc"]), _lower(m["val_loss"])),
    "loss": lambda m: (_lower(m["val_loss"]),),
}


def selection_key(select: str | Callable[[dict[str, float]], tuple]) -> Callable[[dict[str, float]], Any]:
    """The key function for a rule name in SELECT_RULES, or ``select`` itself if callable."""
    if callable(select):
        return select
    if select not in SELECT_RULES:
        raise ValueError(f"Invalid select {select!r}. Only {', '.join(SELECT_RULES)} or a key function "
                         f"of the epoch's metrics are supported.")
    return SELECT_RULES[select]


class Scores:
    """The validation scores of K heads after one epoch (column pos = the pos-th head)."""

    def __init__(self, loss, slice_acc, subject_acc, balanced_acc, auroc, subject_probs,
                 subject_rows, subject_labels) -> None:
        self.loss, self.slice_acc, self.subject_acc = loss, slice_acc, subject_acc
        self.balanced_acc, self.auroc = balanced_acc, auroc
        self.subject_probs = subject_probs  # float64 (n subjects, K)
        self.subject_rows, self.subject_labels = subject_rows, subject_labels

    def metrics(self, pos: int) -> dict[str, float]:
        """Head ``pos``'s metrics under engine.fit's names (plus balanced accuracy and AUROC)."""
        return {"val_loss": float(self.loss[pos]), "val_slice_acc": float(self.slice_acc[pos]),
                "val_subject_acc": float(self.subject_acc[pos]),
                "val_balanced_acc": float(self.balanced_acc[pos]), "val_auroc": float(self.auroc[pos])}


class Validator:
    """Scores heads on one validation partition; the subject grouping is computed once."""

    def __init__(self, feats: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> None:
        self.feats = torch.from_numpy(feats)  # float32 (n, n_feat), shared, not copied
        self._feats64: torch.Tensor | None = None  # a float64 copy, made once if float64 heads come
        self.labels = labels  # float64 0/1
        unique, inverse = np.unique(rows, return_inverse=True)
        self.perm = np.argsort(inverse, kind="stable")  # slices grouped by subject
        counts = np.bincount(inverse)
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.counts = counts.astype(np.float64)
        self.subject_rows = unique
        self.subject_labels = np.zeros(unique.size, np.int64)
        self.subject_labels[inverse] = labels.astype(np.int64)
        self.classes = [self.subject_labels == c for c in (0, 1) if (self.subject_labels == c).any()]

    def __call__(self, dw: np.ndarray, db: np.ndarray) -> Scores:
        """Scores of the K heads with logit-difference weights dw (K, n_feat) and biases db (K,)."""
        if dw.dtype == np.float32:
            feats = self.feats
        else:
            if self._feats64 is None:
                self._feats64 = self.feats.double()
            feats = self._feats64
        d = (feats @ torch.from_numpy(np.ascontiguousarray(dw.T))).numpy().astype(np.float64) + db
        y = self.labels[:, None]
        loss = np.logaddexp(0.0, np.where(y == 1.0, -d, d)).mean(0)  # softplus of the wrong margin
        slice_acc = ((d > 0) == (y == 1.0)).mean(0)
        probs = expit(d)
        subject_probs = np.add.reduceat(probs[self.perm], self.starts, axis=0) / self.counts[:, None]
        pred = subject_probs >= SUBJECT_THRESHOLD
        ys = self.subject_labels[:, None]
        subject_acc = (pred == (ys == 1)).mean(0)
        balanced = np.mean([(pred[c] == (self.subject_labels[c][0] == 1)).mean(0) for c in self.classes], 0)
        return Scores(loss, slice_acc, subject_acc, balanced, self._auroc(subject_probs), subject_probs,
                      self.subject_rows, self.subject_labels)

    def _auroc(self, scores: np.ndarray) -> np.ndarray:
        """Mann-Whitney AUROC per column (ties count half), NaN with one class."""
        pos = self.subject_labels == 1
        n1, n0 = int(pos.sum()), int((~pos).sum())
        if n1 == 0 or n0 == 0:
            return np.full(scores.shape[1], math.nan)
        ranks = rankdata(scores, axis=0)
        return (ranks[pos].sum(0) - n1 * (n1 + 1) / 2) / (n1 * n0)
