"""Preprocessing recipe: one ordered thigh volume -> the uint16 slices the models see.

Ingest (data_prep/build_store.py) and prediction on new subjects (study/predict.py) both call
`apply_recipe`, so a model always sees images prepared exactly like its training data; the
store records the recipe (`Recipe.to_dict()`) and prediction rebuilds it (`Recipe.from_dict`).

    from data_prep.preprocess import Recipe, apply_recipe
    images, stats = apply_recipe(volume, Recipe(size=(128, 256)))

Recipe versions (`Recipe.version`, stored with the recipe; a stored recipe without one is
version 1): 1 resizes with a Gaussian prefilter + bilinear zoom; 2 (the default) resizes by
an exact block mean when both axes shrink by whole factors (256x512 -> 128x256) and as
version 1 otherwise. Everything else is the same, bit for bit, in both versions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

UINT16_MAX = 65535
RECIPE_VERSIONS = (1, 2)  # see the module docstring
# Integer-valued stacks (stored DICOM values, slope 1) with at most this many distinct levels
# between min and max take the histogram path in apply_recipe (a 4 MiB count array at most).
MAX_HISTOGRAM_LEVELS = 1 << 20


@dataclass(frozen=True)
class Recipe:
    """How a thigh series becomes model input. Stored in every Zarr store's attributes.

    Attributes:
        n_slices: central slices kept per participant (OAI acquires 15 axial slices).
        size: output (rows, cols); OAI is 256 x 512 (both thighs side by side).
        p_low: lower intensity percentile of the series mapped to 0 (robust to dark noise).
        p_high: upper percentile mapped to 65535 (robust to bright fat / flow artefacts).
        dtype: stored integer type; uint16 keeps 16 bits of contrast at half float32's size.
        version: 2 resizes by block mean for whole downsampling factors, 1 always by
            Gaussian prefilter + bilinear zoom (stores and models made before version 2).
    """

    n_slices: int = 15
    size: tuple[int, int] = (256, 512)
    p_low: float = 0.5
    p_high: float = 99.5
    dtype: str = "uint16"
    version: int = 2

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
        if self.version not in RECIPE_VERSIONS:
            problems.append(f"version {self.version!r} is not supported; "
                            f"supported: {list(RECIPE_VERSIONS)}")
        if problems:
            raise ValueError("Invalid Recipe: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_slices": int(self.n_slices),
            "size": [int(v) for v in self.size],
            "p_low": float(self.p_low),
            "p_high": float(self.p_high),
            "dtype": self.dtype,
            "version": int(self.version),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"Unknown recipe key(s) {unknown}; allowed keys: {allowed}")
        # recipes stored before versions existed were made by version 1
        return cls(**{"version": 1, **d})


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


def resize_slice(image: np.ndarray, size: tuple[int, int], version: int = 2) -> np.ndarray:
    """Anti-aliased resize of one 2-D float image to `size` (rows, cols), float64.

    Whole downsampling factors on both axes (version 2): the mean of each factor x factor
    block, which is exactly the area average of the input over each output pixel (a box
    anti-aliasing filter). Otherwise (and always in version 1): a Gaussian with
    sigma = (factor - 1) / 2 per axis (scikit-image's convention) removes frequencies the
    coarser grid cannot hold, then linear interpolation with pixel-edge alignment
    (grid_mode) so the field of view is preserved exactly. Pure function: deterministic.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.shape == tuple(size):
        return image.copy()
    if version >= 2 and all(image.shape[i] % size[i] == 0 for i in range(2)):
        fr, fc = image.shape[0] // size[0], image.shape[1] // size[1]
        return image.reshape(size[0], fr, size[1], fc).mean(axis=(1, 3))
    factors = [image.shape[i] / size[i] for i in range(2)]
    sigma = [max(0.0, (f - 1.0) / 2.0) for f in factors]
    if any(s > 0 for s in sigma):
        image = ndimage.gaussian_filter(image, sigma=sigma, mode="nearest")
    zoom = [size[i] / image.shape[i] for i in range(2)]
    out = ndimage.zoom(image, zoom, order=1, mode="nearest", grid_mode=True)
    if out.shape != tuple(size):  # zoom rounds the output shape; never silently off by one
        raise AssertionError(f"resize produced {out.shape}, expected {tuple(size)}")
    return out


def percentiles(values: np.ndarray, percents: Sequence[float]) -> tuple[float, ...]:
    """`np.percentile(values.astype(np.float64), percents)` (method "linear"), bit for bit.

    Only the two order statistics around each rank are needed: they come from a histogram
    when the values are integers in a narrow range (stored DICOM values; exact), else from
    `np.partition` of the values in their own dtype (exact too: float32 -> float64 is exact).
    The interpolation repeats numpy's own arithmetic (`_lerp`), so results are identical.
    """
    values = np.asarray(values)
    if values.size == 0:
        raise ValueError("percentiles of an empty array")
    offsets, vmin = _integer_offsets(values)
    if offsets is not None:
        return _percentiles_from_counts(np.bincount(offsets.ravel()), vmin, values.size,
                                        percents)

    def order_statistics(ranks: np.ndarray) -> np.ndarray:
        return np.partition(values.ravel(), np.unique(ranks))[ranks].astype(np.float64)

    return _interpolate(values.size, percents, order_statistics)


def _percentiles_from_counts(counts: np.ndarray, vmin: float, n: int,
                             percents: Sequence[float]) -> tuple[float, ...]:
    """Percentiles of n integer values given `counts[v - vmin]` (see `percentiles`)."""
    cum = np.cumsum(counts)

    def order_statistics(ranks: np.ndarray) -> np.ndarray:
        # the k-th smallest (0-based) is the first level whose cumulative count exceeds k
        return vmin + np.searchsorted(cum, ranks, side="right").astype(np.float64)

    return _interpolate(n, percents, order_statistics)


def _interpolate(n: int, percents: Sequence[float], order_statistics) -> tuple[float, ...]:
    """numpy's linear percentile: virtual index (n - 1) q, then numpy's `_lerp` formula."""
    q = np.true_divide(np.asarray(percents, dtype=np.float64), 100)
    virtual = (n - 1) * q
    prev = np.clip(np.floor(virtual), 0, n - 1).astype(np.intp)
    nxt = np.minimum(prev + 1, n - 1)
    gamma = virtual - np.floor(virtual)
    stats = order_statistics(np.concatenate([prev, nxt]))
    a, b = stats[:len(prev)], stats[len(prev):]
    diff = b - a
    result = a + diff * gamma
    result = np.where(gamma >= 0.5, b - diff * (1 - gamma), result)
    return tuple(float(v) for v in result)


def _integer_offsets(values: np.ndarray) -> tuple[np.ndarray | None, float]:
    """(values - min as int32, min) for integer-valued data of narrow range, else (None, 0)."""
    if values.size == 0 or values.dtype.kind not in "iuf":
        return None, 0.0
    vmin, vmax = values.min().item(), values.max().item()  # Python numbers: no overflow
    if not (np.isfinite(vmin) and np.isfinite(vmax)):
        return None, 0.0
    # float32 holds integers exactly up to 2**24: beyond that "integer-valued" is unreliable
    if vmax - vmin > MAX_HISTOGRAM_LEVELS or max(abs(vmin), abs(vmax)) >= 2 ** 24:
        return None, 0.0
    if values.dtype.kind in "iu":
        return values.astype(np.int32) - np.int32(vmin), float(vmin)
    shifted = values - values.dtype.type(vmin)  # exact: integers below 2**24, any float type
    if not np.array_equal(np.rint(shifted), shifted):
        return None, 0.0
    return shifted.astype(np.int32), float(vmin)


def rescale_stored(stored: np.ndarray, slope: float, intercept: float,
                   out: np.ndarray | None = None) -> np.ndarray:
    """float32 stored x slope + intercept (into `out` when given): the modality rescale as
    load_volume applies it and apply_recipe(rescale=) reproduces it, one arithmetic for
    both so they round alike."""
    values = out if out is not None else np.empty(np.shape(stored), np.float32)
    values[...] = stored
    if slope != 1.0 or intercept != 0.0:  # x * 1 + 0 == x: skip two passes in the usual case
        values *= np.float32(slope)
        values += np.float32(intercept)
    return values


def _percentiles_of_levels(values: np.ndarray, counts: np.ndarray,
                           percents: Sequence[float]) -> tuple[float, ...]:
    """Percentiles (as `percentiles`) of a stack holding counts[k] elements of values[k]."""
    present = np.flatnonzero(counts)
    order = present[np.argsort(values[present], kind="stable")]  # any slope sign
    cum = np.cumsum(counts[order])
    sorted_values = values[order]

    def order_statistics(ranks: np.ndarray) -> np.ndarray:
        return sorted_values[np.searchsorted(cum, ranks, side="right")]

    return _interpolate(int(cum[-1]), percents, order_statistics)


def _scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Clip float64 values to [lo, hi] and map them to 0..1 (a constant series maps to 0)."""
    if hi > lo:
        return (np.clip(values, lo, hi) - lo) / (hi - lo)
    return np.zeros_like(values)  # a constant series carries no contrast


def _to_uint16(scaled: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(scaled, 0.0, 1.0) * UINT16_MAX).astype(np.uint16)


def apply_recipe(volume: np.ndarray, recipe: Recipe, rescale: tuple[float, float] = (1.0, 0.0)
                 ) -> tuple[np.ndarray, dict[str, Any]]:
    """Central slices, percentile clip, scale to 0..65535, resize.

    Integer-valued stacks (the usual case: stored values) are scaled through a lookup table
    over their distinct levels instead of element by element; every level goes through the
    same arithmetic as its elements would, so the output is identical.

    Args:
        volume: (n, H, W) ordered along the slice normal: modality values (float, rescale
            applied), or stored integers with their series-wide `rescale` still to apply
            (load_volume(stored_values=True) and its `Geometry.rescale`).
        recipe: the preprocessing recipe.
        rescale: (slope, intercept) for integer `volume`: the result equals that of the
            float32 volume `stored * slope + intercept` (load_volume's arithmetic), bit for
            bit, without materialising it.

    Returns:
        (uint16 array (recipe.n_slices, rows, cols), stats) where stats records the
        normalisation: intensity values at p_low/p_high, the slice window and input shape.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3-D (n, H, W), got shape {volume.shape}")
    identity = tuple(float(v) for v in rescale) == (1.0, 0.0)
    if not identity and volume.dtype.kind not in "iu":
        raise ValueError(f"rescale {rescale} is for stored integer values, got {volume.dtype}")
    if volume.dtype.kind not in "iu" and not np.all(np.isfinite(volume)):
        raise ValueError("volume contains NaN or infinite values")
    window = select_stack(volume.shape[0], recipe.n_slices)
    stack = volume[window]
    if stack.dtype.kind == "u" and stack.dtype.itemsize <= 2:
        # stored values (load_volume(stored_values=True)): they index the histogram and
        # the lookup table directly (levels from 0; empty levels change nothing)
        offsets, vmin = stack, 0.0
    else:
        offsets, vmin = _integer_offsets(stack)
    if offsets is None and not identity:
        return apply_recipe(rescale_stored(volume, *rescale), recipe)  # a too wide integer range
    if offsets is not None:
        counts = np.bincount(offsets.ravel())
        # the value of each level, as float64 (exact), through the per-element arithmetic
        values = vmin + np.arange(counts.size, dtype=np.float64)
        if identity:
            lo, hi = _percentiles_from_counts(counts, vmin, stack.size,
                                              (recipe.p_low, recipe.p_high))
        else:
            values = rescale_stored(values, *rescale).astype(np.float64)
            lo, hi = _percentiles_of_levels(values, counts, (recipe.p_low, recipe.p_high))
        levels = _scale(values, lo, hi)
        if stack.shape[1:] == tuple(recipe.size):
            out = np.take(_to_uint16(levels), offsets)  # same-size resize is a copy
        else:
            out = np.empty((recipe.n_slices, *recipe.size), dtype=np.uint16)
            for i in range(recipe.n_slices):
                out[i] = _to_uint16(resize_slice(levels[offsets[i]], recipe.size,
                                                 recipe.version))
    else:
        lo, hi = percentiles(stack, (recipe.p_low, recipe.p_high))
        scaled = _scale(stack.astype(np.float64), lo, hi)
        out = np.empty((recipe.n_slices, *recipe.size), dtype=np.uint16)
        for i, image in enumerate(scaled):
            out[i] = _to_uint16(resize_slice(image, recipe.size, recipe.version))
    stats = {
        "intensity_low": float(lo),
        "intensity_high": float(hi),
        "slice_start": int(window.start),
        "n_available": int(volume.shape[0]),
        "input_shape": [int(v) for v in volume.shape[1:]],
    }
    return out, stats
