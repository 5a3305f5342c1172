"""Where does the network look? Grad-CAM / input-gradient maps for a few test subjects.

Usage::

    from study.saliency import saliency_report

    report = saliency_report(model, store, rows, labels, probs, out_dir=tmp, input_size=None)
    report["paths"]                    # PNG overlays, one per sampled subject
    report["periphery_fraction"]       # share of in-thigh saliency on the thigh's outer ring
    report["periphery_area_fraction"]  # the same share for a flat map (the reference)

The seed abstract read its saliency maps as "thigh size drives the predictions". If so, the
maps should sit on the thigh's outline, i.e. the subcutaneous-fat ring, more than a flat map
would: compare periphery_fraction with periphery_area_fraction. The ring and the muscle come
from study.body_size.tissue_masks, computed on the stored slice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from study.body_size import tissue_masks
from study.data import central_slices, to_model_input

METHODS = ("gradcam", "gradient")
CLASS_NAMES = ("low", "high")


def grad_cam(model: nn.Module, x: torch.Tensor, *, layer: nn.Module | None = None,
             target: torch.Tensor | None = None) -> np.ndarray:
    """Grad-CAM maps, upsampled to the input size.

    map = ReLU(sum_k alpha_k A_k), A = ``layer``'s output, alpha_k = spatial mean of
    d logit[target] / d A_k (Selvaraju et al. 2017).

    Args:
        model: classifier taking x (n, 1, H, W); frozen parameters are fine (x gets the grad).
        x: input batch.
        layer: module whose output is A; default ``model.backbone.layer4`` (ThighResNet).
        target: class per item; default the predicted class.

    Returns:
        float32 (n, H, W), >= 0.
    """
    layer = model.backbone.layer4 if layer is None else layer
    saved: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        output.retain_grad()
        saved["a"] = output

    handle = layer.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        x = x.detach().clone().requires_grad_(True)  # keeps a graph even when every weight is frozen
        logits = model(x)
        target = logits.argmax(1) if target is None else torch.as_tensor(target).long()
        logits.gather(1, target.view(-1, 1)).sum().backward()
        a, g = saved["a"], saved["a"].grad
        cam = F.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)  # the model is logged afterwards; leave no stray grads
        model.train(was_training)
    return cam[:, 0].detach().float().numpy()


def input_gradient(model: nn.Module, x: torch.Tensor, *, target: torch.Tensor | None = None) -> np.ndarray:
    """|d logit[target] / d x| per pixel (vanilla gradient saliency), float32 (n, H, W)."""
    was_training = model.training
    model.eval()
    try:
        x = x.detach().clone().requires_grad_(True)
        logits = model(x)
        target = logits.argmax(1) if target is None else torch.as_tensor(target).long()
        logits.gather(1, target.view(-1, 1)).sum().backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return x.grad.abs()[:, 0].float().numpy()


def sample_subjects(rows: np.ndarray, labels: np.ndarray, k: int = 4) -> np.ndarray:
    """Indices into rows of k subjects, deterministic: the first k/2 of each class in row order.

    A class with too few subjects leaves its places to the other class.
    """
    rows, labels = np.asarray(rows), np.asarray(labels)
    order = np.argsort(rows, kind="stable")
    by_class = [order[labels[order] == c] for c in (0, 1)]
    want = [k // 2, k - k // 2]
    for c in (0, 1):
        spare = max(0, want[c] - by_class[c].size)
        want[c] -= spare
        want[1 - c] += spare
    picked = np.concatenate([by_class[c][:want[c]] for c in (0, 1)])
    return picked[np.argsort(rows[picked], kind="stable")]


def save_overlay(image: np.ndarray, heatmap: np.ndarray, path: Path, title: str) -> Path:
    """PNG of the slice in grey with the heatmap (scaled to its max) over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = image.shape
    fig, ax = plt.subplots(figsize=(6.0, 6.0 * h / w + 0.6))
    ax.imshow(image, cmap="gray", vmin=0, vmax=1)
    peak = float(heatmap.max())
    ax.imshow(heatmap / peak if peak > 0 else heatmap, cmap="jet", alpha=0.4, vmin=0, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def saliency_report(model: nn.Module, store: Any, rows: np.ndarray, labels: np.ndarray, probs: np.ndarray, *,
                    out_dir: str | Path, input_size: tuple[int, int] | None = None, k: int = 4,
                    method: str = "gradcam") -> dict[str, Any]:
    """Saliency overlays of the middle slice of k test subjects, and where the saliency sits.

    Args:
        model: the selected ThighResNet (CPU).
        store: opened store.
        rows, labels, probs: test subjects' store rows, true labels and predicted P(high).
        out_dir: folder for the PNGs (named by sample index, class and prediction only).
        input_size: the model's input size (None = stored size), as in training.
        k: subjects to show (see sample_subjects).
        method: "gradcam" (on layer4) or "gradient".

    Returns:
        paths (PNG files), heatmaps (float32 (k, rows, cols) at stored size), periphery_fraction
        (saliency in the thigh's outer ring / saliency in ring + muscle, pooled over subjects),
        periphery_area_fraction (the same ratio of areas: what a flat map would give).
    """
    if method not in METHODS:
        raise ValueError(f"Invalid saliency method {method!r}. Only {', '.join(METHODS)} are supported.")
    rows, labels, probs = np.asarray(rows), np.asarray(labels), np.asarray(probs, dtype=float)
    if not rows.shape == labels.shape == probs.shape or rows.size == 0:
        raise ValueError(f"rows, labels, probs must be equal non-empty 1-D arrays, got "
                         f"{rows.shape}, {labels.shape}, {probs.shape}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    picked = sample_subjects(rows, labels, k)
    starts = store.subjects["slice_start"].to_numpy(dtype=np.int64)
    counts = store.subjects["slice_count"].to_numpy(dtype=np.int64)
    slices = np.stack([np.asarray(store.images[starts[r] + central_slices(int(counts[r]), 1)[0]])
                       for r in rows[picked]])
    x = to_model_input(slices, input_size)
    maps = grad_cam(model, x) if method == "gradcam" else input_gradient(model, x)
    # back to the stored grid, where the tissue masks live
    maps = F.interpolate(torch.from_numpy(maps)[:, None], size=slices.shape[-2:], mode="bilinear",
                         align_corners=False)[:, 0].clamp_(min=0).numpy()
    masks = tissue_masks(slices)
    ring, muscle = masks["periphery"], masks["muscle"] & ~masks["periphery"]
    ring_mass, muscle_mass = float(maps[ring].sum()), float(maps[muscle].sum())
    total_mass = ring_mass + muscle_mass
    paths = []
    for i, j in enumerate(picked):
        pred = int(probs[j] >= 0.5)
        title = (f"test subject {i + 1} of {picked.size}: true {CLASS_NAMES[int(labels[j])]}, "
                 f"predicted {CLASS_NAMES[pred]} (P(high) = {probs[j]:.2f}); {method}")
        name = f"saliency_{i + 1}_true-{CLASS_NAMES[int(labels[j])]}_pred-{CLASS_NAMES[pred]}.png"
        paths.append(save_overlay(slices[i].astype(np.float32) / 65535.0, maps[i], out_dir / name, title))
    return {
        "paths": paths, "heatmaps": maps, "method": method,
        "periphery_fraction": ring_mass / total_mass if total_mass > 0 else float("nan"),
        "periphery_area_fraction": float(ring.sum() / max(1, ring.sum() + muscle.sum())),
    }
