"""Numerical phantom of axial mid-thigh T1 spin-echo MRI: both thighs side by side.

    import numpy as np
    from data_prep.synthetic.phantom import ThighAnatomy, render_axial_stack
    stack = render_axial_stack(ThighAnatomy(muscle_area_cm2=110, imat_fraction=0.08,
                                            fat_area_cm2=90), matrix=(256, 512),
                               rng=np.random.default_rng(0))
    stack.image        # float32 (15, 256, 512), scanner units about 0..4000, integer valued
    stack.tissue["muscle"]  # float32 (15, 256, 512) partial-volume fraction of each pixel

Geometry follows DICOM patient coordinates (LPS) for an axial slice with
ImageOrientationPatient [1,0,0,0,1,0]: rows run anterior -> posterior, columns run patient
right -> left, so image columns [0, W/2) hold the RIGHT thigh. Slices are returned in
anatomical order, distal (low z) -> proximal (high z); the field of view is fixed at
250 x 500 mm whatever the matrix, so pixel spacing is 250/rows by 500/cols mm.

Areas are exact by construction: every boundary is a star-shaped curve r(theta) whose
enclosed area is known in closed form, pixels get linear partial-volume fractions, and
intermuscular fat (IMAT) is a quantile threshold of a texture field, so the per-slice tissue
areas equal the anatomy's areas times the slice scale (see `slice_area_scale`).
Signal levels are the T1 values from DOMAIN.md; all generation is vectorised numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

FOV_MM = (250.0, 500.0)  # rows x cols: 256 x 512 at 0.977 mm, both thighs side by side
N_SLICES = 15  # OAI axial thigh series: 15 slices, 5 mm, no gap
SIGNAL = {  # relative T1 spin-echo signal (DOMAIN.md "Tissue appearance")
    "fat": 0.74, "marrow": 0.66, "muscle": 0.25, "cortex": 0.0, "fascia": 0.0, "air": 0.0,
}
MAX_THIGH_AREA_CM2 = 330.0  # outer boundary of one thigh must fit its 250 x 250 mm half


@dataclass(frozen=True)
class ThighAnatomy:
    """Per-thigh anatomy of one participant, averaged over both thighs and all slices.

    Attributes:
        muscle_area_cm2: muscle proper (IMAT excluded) inside the fascia, per thigh.
        imat_fraction: intermuscular fat / (muscle + intermuscular fat) inside the fascia.
        fat_area_cm2: subcutaneous fat (between skin and fascia), per thigh.
        femur_radius_mm: outer radius of the femoral shaft.
        cortex_mm: cortical thickness; marrow radius = femur_radius_mm - cortex_mm.
        asymmetry: right thigh areas x (1 + a), left x (1 - a).
        taper: relative area change from the middle slice to the most proximal one
            (areas grow proximally; the slice mean is exactly the stated area).
    """

    muscle_area_cm2: float
    imat_fraction: float
    fat_area_cm2: float
    femur_radius_mm: float = 14.0
    cortex_mm: float = 5.5
    asymmetry: float = 0.0
    taper: float = 0.03

    @property
    def bone_area_cm2(self) -> float:
        return float(np.pi * self.femur_radius_mm**2 / 100.0)

    @property
    def imat_area_cm2(self) -> float:
        return self.muscle_area_cm2 * self.imat_fraction / (1.0 - self.imat_fraction)

    @property
    def total_area_cm2(self) -> float:
        return self.muscle_area_cm2 + self.imat_area_cm2 + self.bone_area_cm2 + self.fat_area_cm2


@dataclass
class PhantomStack:
    """Rendered axial series, slices ordered distal -> proximal.

    Attributes:
        image: float32 (n, rows, cols), integer-valued scanner units (Rician noise included).
        tissue: float32 (n, rows, cols) fractions: muscle, imat, subcut_fat, marrow, cortex.
        pixel_spacing_mm: (row spacing, column spacing).
        area_scale: (n,) area factor of each slice relative to the anatomy's mean areas.
        snr: fat signal / noise sigma.  gain: scanner units per unit relative signal.
    """

    image: np.ndarray
    tissue: dict[str, np.ndarray]
    pixel_spacing_mm: tuple[float, float]
    area_scale: np.ndarray
    snr: float
    gain: float


def pixel_spacing(matrix: tuple[int, int]) -> tuple[float, float]:
    """Row and column spacing in mm for a matrix covering the fixed field of view."""
    rows, cols = matrix
    return (round(FOV_MM[0] / rows, 4), round(FOV_MM[1] / cols, 4))


def check_matrix(matrix: tuple[int, int]) -> None:
    """Raise ValueError unless (rows, cols) can hold two thighs: rows >= 32, even cols >= 64."""
    rows, cols = matrix
    if cols % 2 or rows < 32 or cols < 64:
        raise ValueError(f"Invalid matrix {rows}x{cols}: need rows >= 32 and even cols >= 64 "
                         "(one thigh per half), e.g. 256x512.")


def slice_area_scale(taper: float, n_slices: int = N_SLICES) -> np.ndarray:
    """Area factor per slice (distal -> proximal): linear ramp, mean exactly 1."""
    half = (n_slices - 1) / 2.0
    return 1.0 + taper * (np.arange(n_slices) - half) / half


def _harmonics(theta: np.ndarray, amps: np.ndarray, phases: np.ndarray, first: int) -> np.ndarray:
    out = np.ones_like(theta)
    for k, (a, p) in enumerate(zip(amps, phases), start=first):
        out += float(a) * np.cos(k * theta + float(p))
    return out


def _soft_inside(boundary: np.ndarray, dist: np.ndarray, px: float) -> np.ndarray:
    """Linear partial-volume fraction of pixels inside `dist < boundary` (same units)."""
    out = boundary - dist
    out *= 1.0 / px
    out += 0.5
    return np.clip(out, 0.0, 1.0, out=out)


def _render_thigh(anat: ThighAnatomy, side: int, shape: tuple[int, int],
                  spacing: tuple[float, float], scale: np.ndarray,
                  rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Tissue fractions and noiseless relative signal, each (n, rows, cols_half), of one
    thigh; side +1 = right, -1 = left. Angles: theta 0 = medial, pi/2 = posterior."""
    rows, cols = shape
    dr, dc = spacing
    px = float(np.sqrt(dr * dc))
    n = len(scale)
    lr = 1.0 + side * anat.asymmetry
    comp_mm2 = (anat.muscle_area_cm2 + anat.imat_area_cm2 + anat.bone_area_cm2) * 100 * lr
    fat_mm2 = anat.fat_area_cm2 * 100 * lr
    # medial is towards the image centre: +x for the right thigh (left image half)
    cx, cy = rng.uniform(-6, 6) - side * rng.uniform(0, 6), rng.uniform(-8, 8)
    a = np.array([rng.uniform(0.03, 0.08), rng.uniform(0, 0.04), rng.uniform(0, 0.02)])
    phase_a = rng.uniform(0, 2 * np.pi, 3)
    b = np.array([rng.uniform(0.1, 0.35), rng.uniform(0, 0.2), rng.uniform(0, 0.1)])
    phase_b = np.array([np.pi + rng.uniform(-0.6, 0.6), *rng.uniform(0, 2 * np.pi, 2)])

    def radii(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r_m = _harmonics(theta, a, phase_a, first=2)
        # the area of r(theta) = R (1 + sum a_k cos(k theta + p_k)) is pi R^2 (1 + sum a_k^2 / 2)
        r_m *= np.float32(np.sqrt(comp_mm2 / (np.pi * (1 + 0.5 * np.sum(a**2)))))
        g = _harmonics(theta, b, phase_b, first=1)  # fat thicker laterally (theta = pi)
        return r_m, np.sqrt(r_m**2 + np.float32(fat_mm2 / np.pi) * g)  # ring area = fat_mm2

    # big thighs: centre them and round them off until they fit their half of the image
    lin_max = float(np.sqrt(scale.max()))
    for _ in range(6):
        r_max = float(radii(np.linspace(-np.pi, np.pi, 720, dtype=np.float32))[1].max()) * lin_max
        if r_max + 2 * px <= min(rows * dr / 2 - abs(cy), cols * dc / 2 - abs(cx)):
            break
        cx, cy, a, b = 0.0, 0.0, a / 2, b / 2
    # work inside the bounding box of the thigh only
    i0, i1 = (max(0, int(np.floor((rows * dr / 2 + cy + sgn * (r_max + 2 * px)) / dr)) + k)
              for sgn, k in ((-1, 0), (1, 1)))
    j0, j1 = (max(0, int(np.floor((cols * dc / 2 + cx + sgn * (r_max + 2 * px)) / dc)) + k)
              for sgn, k in ((-1, 0), (1, 1)))
    i1, j1 = min(i1, rows), min(j1, cols)
    y = ((np.arange(i0, i1, dtype=np.float32) + 0.5) - rows / 2) * dr - cy
    x = ((np.arange(j0, j1, dtype=np.float32) + 0.5) - cols / 2) * dc - cx
    X, Y = np.meshgrid(x, y)
    rho, theta = np.hypot(X, Y), np.arctan2(Y, X * side)
    r_m, r_out = radii(theta)

    # femur slightly lateral and anterior of centre; everything scales with the slice
    r_c = float(np.sqrt(comp_mm2 / np.pi))
    fx, fy = -side * rng.uniform(0, 0.08) * r_c, -rng.uniform(0, 0.1) * r_c
    lin = np.sqrt(scale).astype(np.float32)[:, None, None]  # linear scale per slice
    outer = _soft_inside(r_out * lin, rho, px)
    comp = _soft_inside(r_m * lin, rho, px)
    d_fem = np.hypot(X - fx * lin, Y - fy * lin)
    bone = _soft_inside(anat.femur_radius_mm * lin, d_fem, px)
    marrow = _soft_inside((anat.femur_radius_mm - anat.cortex_mm) * lin, d_fem, px)
    soft = np.clip(comp - bone, 0.0, 1.0)

    # IMAT texture: septa radiating from the femur plus marbling, drifting slowly along z
    th_f, r_f = np.arctan2(Y - fy, X - fx), np.hypot(X - fx, Y - fy)
    septa = np.zeros_like(rho)
    for phi in rng.uniform(0, 2 * np.pi, rng.integers(5, 8)):
        wavelength, phase = float(rng.uniform(15, 30)), float(rng.uniform(0, 2 * np.pi))
        wob = float(phi) + 0.25 * np.sin(r_f / wavelength + phase)
        d = r_f * np.sin(th_f - wob)
        septa = np.maximum(septa, np.exp(-(d / 2.0) ** 2) * (np.cos(th_f - wob) > 0))
    fa, fb = (ndimage.gaussian_filter(rng.standard_normal(X.shape).astype(np.float32),
                                      (3.0 / dr, 3.0 / dc)) for _ in range(2))
    fa, fb = fa / fa.std(), fb / fb.std()
    alpha = rng.uniform(0, np.pi) + np.linspace(0, 0.8, n)[:, None, None]
    texture = 2.5 * septa + np.cos(alpha).astype(np.float32) * fa
    texture += np.sin(alpha).astype(np.float32) * fb
    imat = np.empty_like(soft)
    for k in range(n):  # quantile threshold: IMAT is exactly imat_fraction of the compartment
        t = np.quantile(texture[k][soft[k] > 0.5], 1.0 - anat.imat_fraction)
        imat[k] = soft[k] * np.clip((texture[k] - t) / 0.2 + 0.5, 0.0, 1.0)
    fat = np.clip(outer - comp, 0.0, 1.0)
    crop = {"muscle": soft - imat, "imat": imat, "subcut_fat": fat, "marrow": marrow,
            "cortex": np.clip(bone - marrow, 0.0, 1.0)}
    tone = 1.0 + 0.05 * fb  # slow variation of muscle signal between muscles
    s = SIGNAL
    signal = s["fat"] * (fat + imat) + s["marrow"] * marrow + s["muscle"] * tone * crop["muscle"]
    # dark fascia line along the compartment boundary (a 1 mm line fades in larger pixels)
    depth = 0.85 * min(1.0, 1.0 / min(spacing))
    fascia = np.exp(-(((rho - r_m * lin) * np.float32(1 / max(0.8, 0.5 * px))) ** 2))
    skin = np.exp(-(((rho - r_out * lin) * np.float32(1 / max(1.2, 0.5 * px))) ** 2))
    signal *= 1.0 - depth * fascia
    signal *= 1.0 - 0.35 * skin * fat
    tissue = {}
    for name, values in (*crop.items(), ("signal", signal)):
        tissue[name] = np.zeros((n, rows, cols), np.float32)
        tissue[name][:, i0:i1, j0:j1] = values
    return tissue, tissue.pop("signal")


def _bias_field(shape: tuple[int, int], n: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative coil sensitivity, about +-12-20 %, (n, rows, cols)."""
    rows, cols = shape
    v, u = np.meshgrid(np.linspace(-1, 1, rows), np.linspace(-1, 1, cols), indexing="ij")
    p = sum(rng.normal() * u**i * v**j for i in range(3) for j in range(3) if 0 < i + j <= 2)
    for vy in (-0.9, 0.9):  # anterior and posterior coil elements
        ux = rng.uniform(-0.6, 0.6)
        p = p + rng.uniform(0.5, 1.5) * np.exp(-((u - ux) ** 2 + (v - vy) ** 2) / 0.3)
    p = (p - p.mean()) / np.abs(p - p.mean()).max()
    b = (1.0 + rng.uniform(0.12, 0.2) * p).astype(np.float32)
    gz = rng.uniform(-0.03, 0.03) * np.linspace(-1, 1, n)
    return b[None] * (1.0 + gz[:, None, None]).astype(np.float32)


def render_axial_stack(anat: ThighAnatomy, *, matrix: tuple[int, int] = (256, 512),
                       rng: np.random.Generator, n_slices: int = N_SLICES,
                       snr: float | None = None) -> PhantomStack:
    """Render one participant's axial T1 thigh series.

    Args:
        anat: anatomy (areas per thigh, mean over slices and thighs).
        matrix: (rows, cols); cols must be even (one thigh per half).
        rng: source of every random choice (shapes, texture, bias, noise, gain).
        n_slices: slices in the stack.
        snr: fat signal / noise sigma; drawn from U(20, 30) when None.
    """
    check_matrix(matrix)
    rows, cols = matrix
    largest = anat.total_area_cm2 * (1 + abs(anat.asymmetry)) * (1 + anat.taper)
    if largest > MAX_THIGH_AREA_CM2 * 1.1:
        raise ValueError(f"Thigh area up to {largest:.0f} cm2 does not fit the 250 x 250 mm half "
                         f"of the field of view; at most {MAX_THIGH_AREA_CM2:.0f} cm2.")
    spacing = pixel_spacing(matrix)
    scale = slice_area_scale(anat.taper, n_slices)
    half = (rows, cols // 2)
    tissue: dict[str, np.ndarray] = {}
    signal = np.empty((n_slices, rows, cols), np.float32)
    for side, cols_slice in ((+1, slice(0, cols // 2)), (-1, slice(cols // 2, cols))):
        fractions, signal[:, :, cols_slice] = _render_thigh(anat, side, half, spacing, scale, rng)
        for name, frac in fractions.items():
            full = tissue.setdefault(name, np.empty((n_slices, rows, cols), np.float32))
            full[:, :, cols_slice] = frac
    signal *= _bias_field((rows, cols), n_slices, rng)
    snr = float(rng.uniform(20, 30)) if snr is None else float(snr)
    gain = float(rng.uniform(3600, 4000))
    sigma = SIGNAL["fat"] / snr
    noise = rng.standard_normal((2, *signal.shape), dtype=np.float32) * np.float32(sigma)
    noise[0] += signal
    image = np.hypot(noise[0], noise[1], out=noise[0])  # Rician magnitude
    image *= np.float32(gain)
    image = np.clip(np.rint(image, out=image), 0, 4095, out=image)
    return PhantomStack(image=image, tissue=tissue, pixel_spacing_mm=spacing, area_scale=scale,
                        snr=snr, gain=gain)


def render_localizer(anat: ThighAnatomy, *, size: int, rng: np.random.Generator,
                     positions_mm: tuple[float, ...] = (-20.0, 0.0, 20.0)) -> np.ndarray:
    """Coronal localizer (len(positions), size, size) over 500 x 500 mm: rows run head -> feet.

    Each leg is a tapering cylinder; a coronal plane at y cuts a chord of half-width
    sqrt(R^2 - y^2) through skin, muscle compartment and femur.
    """
    spacing = 500.0 / size
    z = (np.arange(size) + 0.5) * spacing - 250.0  # head -> feet, 0 = mid-thigh
    x = (np.arange(size) + 0.5) * spacing - 250.0
    taper = 1.0 - 0.0012 * z[:, None]  # thighs narrow towards the knee
    r_out = np.sqrt(anat.total_area_cm2 * 100 / np.pi) * taper
    r_comp = np.sqrt((anat.total_area_cm2 - anat.fat_area_cm2) * 100 / np.pi) * taper
    out = np.zeros((len(positions_mm), size, size), np.float32)
    for i, y in enumerate(positions_mm):
        img = np.zeros((size, size), np.float32)
        for cx in (-125.0, 125.0):
            dx = np.abs(x[None, :] - cx)
            w_out = np.sqrt(np.clip(r_out**2 - y**2, 0, None))
            w_comp = np.sqrt(np.clip(r_comp**2 - y**2, 0, None))
            w_bone = np.sqrt(np.clip(anat.femur_radius_mm**2 - y**2, 0, None))
            img += np.where(dx < w_out, SIGNAL["fat"], 0.0)
            img += np.where(dx < w_comp, SIGNAL["muscle"] - SIGNAL["fat"], 0.0)
            img += np.where(dx < w_bone, SIGNAL["marrow"] - SIGNAL["muscle"], 0.0)
        noise = rng.standard_normal((2, size, size)).astype(np.float32) * 0.03
        out[i] = np.hypot(img + noise[0], noise[1])
    return np.clip(np.rint(out * rng.uniform(2500, 3000)), 0, 4095)
