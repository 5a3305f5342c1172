"""Preprocessing recipe: one ordered thigh volume -> the uint16 slices the models see.

Ingest (data_prep/build_store.py) and prediction on new subjects (study/predict.py) both call
`apply_recipe`, so a model always sees images prepared exactly like its training data; the
store records the recipe (`Recipe.to_dict()`) and prediction rebuilds it (`Recipe.from_dict`).

    from data_prep.preprocess import Recipe, apply_recipe
    images, stats = apply_recipe(volume, Recipe(size=(128, 256)))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

UINT16_MAX = 65535


@dataclass(frozen=True)
class Recipe:
    """How a thigh series becomes model input. Stored in every Zarr store's attributes.

    Attributes:
        n_slices: central slices kept per participant (OAI acquires 15 axial slices).
        size: output (rows, cols); OAI is 256 x 512 (both thighs side by side).
        p_low: lower intensity percentile of the series mapped to 0 (robust to dark noise).
        p_high: upper percentile mapped to 65535 (robust to bright fat / flow artefacts).
        dtype: stored integer type; uint16 keeps 16 bits of contrast at half float32's size.
    """

    n_slices: int = 15
    size: tuple[int, int] = (256, 512)
    p_low: float = 0.5
    p_high: float = 99.5
    dtype: str = "uint16"

    def __post_init__(self) -> None:
        # YAML / JSON give lists; keep the frozen value hashable and comparable.
        object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        problems = []
        if int(self.n_slices) < 1:
            problems.append(f"n_slices must be >= 1, got {self.n_slices}")
        if len(self.size) != 2 or min(self.size) < 1:
            problems.append(f"size must be two positive ints (rows, cols), got {self.size}")
        if not 0.0 <= self.p_low < self.p_high <= 100.0:
            problems.append(f"need 0 <= p_low < p_high <= 100, got {self.p_low}, {self.p_high}")
        if self.dtype != "uint16":
            problems.append(f"dtype {self.dtype!r} is not supported; only 'uint16' is")
        if problems:
            raise ValueError("Invalid Recipe: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_slices": int(self.n_slices),
            "size": [int(v) for v in self.size],
            "p_low": float(self.p_low),
            "p_high": float(self.p_high),
            "dtype": self.dtype,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"Unknown recipe key(s) {unknown}; allowed keys: {allowed}")
        return cls(**d)


class TooFewSlicesError(ValueError):
    """The series has fewer slices than the recipe keeps (reason `too_few_slices`)."""

    reason = "too_few_slices"


def select_stack(n_available: int, n_slices: int) -> slice:
    """The central `n_slices` of a stack of `n_available` (extra slice, if odd, goes low).

    The "around mid-thigh" rule: the operator centres the axial prescription on mid-thigh
    (OAI: 15 slices at 33% of femur length from the distal end), so the centre of a longer
    stack is the prescription's centre. A slice index, not anatomy, is used because an
    anatomical landmark (e.g. the narrowest femoral shaft) is unreliable across scanners
    and fields of view; `stats["slice_start"]` records the window taken.

    Raises:
        TooFewSlicesError (a ValueError): when the stack has fewer slices than needed.
    """
    if n_slices < 1:
        raise ValueError(f"n_slices must be >= 1, got {n_slices}")
    if n_available < n_slices:
        raise TooFewSlicesError(f"series has {n_available} slices, the recipe needs {n_slices}")
    start = (n_available - n_slices) // 2
    return slice(start, start + n_slices)


def resize_slice(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Anti-aliased bilinear resize of one 2-D float image to `size` (rows, cols).

    When downsampling, a Gaussian with sigma = (factor - 1) / 2 per axis (scikit-image's
    convention) removes frequencies the coarser grid cannot hold; then linear interpolation
    with pixel-edge alignment (grid_mode) so the field of view is preserved exactly.
    Pure function of its input: deterministic.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.shape == tuple(size):
        return image.copy()
    factors = [image.shape[i] / size[i] for i in range(2)]
    sigma = [max(0.0, (f - 1.0) / 2.0) for f in factors]
    if any(s > 0 for s in sigma):
        image = ndimage.gaussian_filter(image, sigma=sigma, mode="nearest")
    zoom = [size[i] / image.shape[i] for i in range(2)]
    out = ndimage.zoom(image, zoom, order=1, mode="nearest", grid_mode=True)
    if out.shape != tuple(size):  # zoom rounds the output shape; never silently off by one
        raise AssertionError(f"resize produced {out.shape}, expected {tuple(size)}")
    return out


def apply_recipe(volume: np.ndarray, recipe: Recipe) -> tuple[np.ndarray, dict[str, Any]]:
    """Central slices, percentile clip, scale to 0..65535, resize.

    Args:
        volume: float (n, H, W), ordered along the slice normal, rescale slope/intercept applied.
        recipe: the preprocessing recipe.

    Returns:
        (uint16 array (recipe.n_slices, rows, cols), stats) where stats records the
        normalisation: intensity values at p_low/p_high, the slice window and input shape.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3-D (n, H, W), got shape {volume.shape}")
    if not np.all(np.isfinite(volume)):
        raise ValueError("volume contains NaN or infinite values")
    window = select_stack(volume.shape[0], recipe.n_slices)
    stack = volume[window].astype(np.float64)
    lo, hi = np.percentile(stack, [recipe.p_low, recipe.p_high])
    if hi > lo:
        scaled = (np.clip(stack, lo, hi) - lo) / (hi - lo)
    else:  # a constant series carries no contrast; map it to 0 rather than divide by zero
        scaled = np.zeros_like(stack)
    out = np.empty((recipe.n_slices, *recipe.size), dtype=np.uint16)
    for i, image in enumerate(scaled):
        resized = resize_slice(image, recipe.size)
        out[i] = np.rint(np.clip(resized, 0.0, 1.0) * UINT16_MAX).astype(np.uint16)
    stats = {
        "intensity_low": float(lo),
        "intensity_high": float(hi),
        "slice_start": int(window.start),
        "n_available": int(volume.shape[0]),
        "input_shape": [int(v) for v in volume.shape[1:]],
    }
    return out, stats
