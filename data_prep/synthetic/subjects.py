"""Subject model of the synthetic cohorts: anatomy, scan settings and measures per participant.

    from data_prep.synthetic.subjects import sample_subjects
    df = sample_subjects(100, seed=0, cohort="oai")      # one row per participant, no images

Subject model (per cohort; areas are per thigh, averaged over both thighs and the 15 slices):
    sex        female with probability 0.58 (OAI), 0.59 (SOMMA), 0.5 (volunteers)
    age        OAI U{45..79}; SOMMA 70 + Gamma(2, 3.5) capped at 94; volunteers U{22..65}
    bmi        N(28.5, 4.8) clipped to [18, 48];  zb = (bmi - 28.5) / 4.8
    muscle     (mu + sd * (0.45 zb + 0.89 e1)) * (1 - 0.005 (age - 60)), mu, sd = 130, 22 (men),
               95, 16 (women): BMI raises muscle, so body size is both signal and confound
    fat        mu + sd * (0.75 zb + 0.66 e2), 60, 25 (men), 110, 40 (women); capped so one thigh
               fits its 250 x 250 mm half of the field of view
    imat       intermuscular-fat fraction 0.07 + 0.025 zb + 0.012 (age - 60) / 10
               + 0.01 female + imat_quality_sd q, clipped [0.015, 0.35]; q = muscle-quality
               latent, independent of size, sex, age and BMI (imat_quality_sd 0.025 by default);
               muscle_quality = -q (higher: less intermuscular fat at the same size)
    measure    mean + sd * (r * z(feature) + sqrt(1 - r^2) * e), z standardised within the cohort;
               e = +-sqrt(0.3) u + sqrt(0.7) eps with u a shared fitness latent (sign: better).
               PLANTED: leg_strength ~ muscle_area r = +r_strength (0.65); gait_speed_short ~
               imat_fraction r = -0.30; gait_400m (s) ~ imat_fraction r = +0.25; chair_stand (s)
               ~ muscle_area r = -0.20. `correlations` replaces any of these, e.g.
               {"leg_strength": ("muscle_quality", 0.8)} plants a pure muscle-quality effect
               (visible in the images only as intermuscular fat at fixed size). null=True: measure = mean + sd * e, same marginals,
               independent of every image feature.
    volunteers exercise = 'yes' for the 3-5 highest (within-sex muscle z + N(0, 0.7)).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from data_prep.synthetic.dicom_writer import COHORT_CODE, derive_rng
from data_prep.synthetic.phantom import MAX_THIGH_AREA_CM2

COHORTS = ("oai", "somma", "volunteers")
TABLE_ONLY_OAI = 3  # OAI participants in the tables but never scanned
N_VOLUNTEERS = 8
SHARED_FITNESS = 0.3  # variance share of the fitness latent common to all measures
PLANTED = {  # measure -> (image feature, correlation within the cohort)
    "leg_strength": ("muscle_area_cm2", 0.65),
    "gait_speed_short": ("imat_fraction", -0.30),
    "gait_400m": ("imat_fraction", 0.25),
    "chair_stand": ("muscle_area_cm2", -0.20),
}
FEATURES = ("muscle_area_cm2", "imat_area_cm2", "imat_fraction", "fat_area_cm2", "bmi", "muscle_quality")
IMAT_QUALITY_SD = 0.025  # intermuscular-fat fraction per SD of the muscle-quality latent
HIGHER_IS_BETTER = {"leg_strength": 1, "gait_speed_short": 1, "gait_400m": -1, "chair_stand": -1}
MARGINALS = {  # cohort -> measure -> (mean, sd, min, max); strength ~9 N/cm2 of muscle
    "oai": {"leg_strength": (1000.0, 330.0, 150.0, 2500.0),  # knee extension, N
            "gait_speed_short": (1.33, 0.19, 0.5, 2.2),  # 20 m pace, m/s
            "gait_400m": (295.0, 50.0, 190.0, 700.0),  # s
            "chair_stand": (10.5, 2.8, 4.5, 30.0)},  # s for 5 stands
    "somma": {"leg_strength": (190.0, 75.0, 30.0, 600.0),  # Keiser leg power, W
              "gait_speed_short": (1.05, 0.20, 0.3, 1.8),  # 4 m, m/s
              "gait_400m": (400.0, 75.0, 240.0, 900.0),
              "chair_stand": (12.5, 3.5, 5.0, 35.0)},
}
MARGINALS["volunteers"] = MARGINALS["oai"]


def _z(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / x.std() if len(x) > 1 and x.std() > 0 else np.zeros_like(x)


def sample_subjects(n: int, *, seed: int, cohort: str, null: bool = False,
                    r_strength: float = 0.65,
                    correlations: dict[str, tuple[str, float]] | None = None,
                    imat_quality_sd: float = IMAT_QUALITY_SD) -> pd.DataFrame:
    """Draw anatomy, scan settings and measures of `n` participants without rendering images.

    Args:
        n: participants to draw.
        seed: master seed (cohort streams are derived from it).
        cohort: one of COHORTS.
        null: measures independent of the anatomy (same marginals).
        r_strength: planted correlation of leg_strength with muscle area.
        correlations: overrides of PLANTED, measure -> (feature, r).
        imat_quality_sd: intermuscular-fat fraction per SD of the muscle-quality latent
            (how visible muscle quality is in the images), in [0, 0.1].

    Returns:
        One row per participant; see truth.csv for the columns.
    """
    if cohort not in COHORTS:
        raise ValueError(f"Invalid cohort {cohort!r}. Only {', '.join(COHORTS)} are supported.")
    if n < 1:
        raise ValueError(f"Invalid n {n}: need at least 1 participant.")
    planted = {**PLANTED, "leg_strength": ("muscle_area_cm2", r_strength), **(correlations or {})}
    problems = [f"unknown measure {m!r} (allowed: {', '.join(PLANTED)})"
                for m in planted if m not in PLANTED]
    problems += [f"unknown feature {f!r} for {m} (allowed: {', '.join(FEATURES)})"
                 for m, (f, _) in planted.items() if f not in FEATURES]
    problems += [f"Invalid correlation {r} for {m}: must lie in [-1, 1]"
                 for m, (_, r) in planted.items() if not -1.0 <= r <= 1.0]
    if not 0.0 <= imat_quality_sd <= 0.1:
        problems.append(f"Invalid imat_quality_sd {imat_quality_sd}: must lie in [0, 0.1]")
    if problems:
        raise ValueError("; ".join(problems) + ".")
    rng = derive_rng(seed, COHORT_CODE[cohort])
    female = rng.random(n) < {"oai": 0.58, "somma": 0.59, "volunteers": 0.5}[cohort]
    if cohort == "oai":
        age = rng.integers(45, 80, n).astype(float)
        ids = [str(9_000_000 + i) for i in rng.choice(1_000_000, n, replace=False)]
    elif cohort == "somma":
        age = np.minimum(70 + np.floor(rng.gamma(2.0, 3.5, n)), 94)
        ids = [f"SM{i:05d}" for i in rng.choice(100_000, n, replace=False)]
    else:
        age = rng.integers(22, 66, n).astype(float)
        ids = [f"V{i + 1:02d}" for i in range(n)]
    bmi_drawn = np.clip(rng.normal(28.5, 4.8, n), 18, 48)
    height = np.rint(np.where(female, rng.normal(1625, 65, n), rng.normal(1760, 70, n)))
    weight = np.round(bmi_drawn * (height / 1000) ** 2, 1)
    bmi = np.round(weight / (height / 1000) ** 2, 1)
    zb = (bmi_drawn - 28.5) / 4.8
    e1, e2, q = rng.standard_normal((3, n))
    muscle = (np.where(female, 95.0, 130.0) + np.where(female, 16.0, 22.0)
              * (0.45 * zb + 0.893 * e1)) * (1 - 0.005 * (age - 60))
    muscle = np.clip(muscle, 45, 220)
    fat = np.where(female, 110.0, 60.0) + np.where(female, 40.0, 25.0) * (0.75 * zb + 0.661 * e2)
    imat_fraction = np.clip(0.07 + 0.025 * zb + 0.0012 * (age - 60) + 0.01 * female + imat_quality_sd * q,
                            0.015, 0.35)
    femur_r = np.clip(np.where(female, rng.normal(13.2, 0.9, n), rng.normal(15.0, 1.0, n)), 11, 18)
    cortex = np.clip(rng.normal(0.38, 0.04, n) * femur_r, 3.5, 7.0)
    asym = np.clip(rng.normal(0, 0.02, n), -0.05, 0.05)
    taper = rng.uniform(0.02, 0.05, n)
    imat = muscle * imat_fraction / (1 - imat_fraction)
    bone = np.pi * femur_r**2 / 100
    room = MAX_THIGH_AREA_CM2 / ((1 + np.abs(asym)) * (1 + taper)) - muscle - imat - bone
    fat = np.clip(fat, 12, np.maximum(room, 12))
    df = pd.DataFrame({
        "cohort": cohort, "id": ids, "sex": np.where(female, "female", "male"), "age": age,
        "bmi": bmi, "height_mm": height, "weight_kg": weight,
        "muscle_area_cm2": muscle, "imat_area_cm2": imat, "imat_fraction": imat_fraction,
        "fat_area_cm2": fat, "bone_area_cm2": bone, "femur_radius_mm": femur_r,
        "cortex_mm": cortex, "asymmetry": asym, "taper": taper, "muscle_quality": -q})

    fitness = rng.standard_normal(n)
    for measure, (feature, r) in planted.items():
        mean, sd, lo, hi = MARGINALS[cohort][measure]
        e = (HIGHER_IS_BETTER[measure] * np.sqrt(SHARED_FITNESS) * fitness
             + np.sqrt(1 - SHARED_FITNESS) * rng.standard_normal(n))
        latent = e if null else r * _z(df[feature].to_numpy()) + np.sqrt(1 - r**2) * e
        df[measure] = np.clip(mean + sd * latent, lo, hi)
    # OAI strength chair: right/left extension follow thigh asymmetry; flexion about half
    noise = rng.normal(0, 0.04, (4, n))
    df["strength_right"] = df["leg_strength"] * (1 + asym + noise[0])
    df["strength_left"] = df["leg_strength"] * (1 - asym + noise[1])
    df["flexion_right"] = 0.5 * df["leg_strength"] * (1 + 3 * noise[2])
    df["flexion_left"] = 0.5 * df["leg_strength"] * (1 + 3 * noise[3])
    worst = df["gait_400m"].rank(pct=True).to_numpy()  # slowest walkers rest or stop
    u = rng.random(n)
    df["walk400_code"] = np.where((worst > 0.8) & (u < 0.15), 0,
                                  np.where((worst > 0.6) & (u < 0.3), 2, 1))
    df.loc[df["walk400_code"] == 0, "gait_400m"] = np.nan
    df["exercise"] = np.nan
    if cohort == "volunteers":
        zm = df.groupby("sex")["muscle_area_cm2"].transform(lambda s: _z(s.to_numpy()))
        score = zm.to_numpy() + rng.normal(0, 0.7, n)
        k = int(np.clip(rng.binomial(n, 0.5), round(3 * n / 8), round(5 * n / 8)))
        df["exercise"] = (np.argsort(np.argsort(-score)) < k).astype(float)
        df[list(planted)] = np.nan  # volunteers only report exercise
    # scan settings that ingest must cope with
    df["z_descending"] = rng.random(n) < 0.4
    rescale = rng.choice(3, n, p=[0.5, 0.25, 0.25])  # absent, slope 1, slope 2
    df["rescale_slope"] = np.where(rescale == 0, np.nan, rescale.astype(float))
    df["rescale_intercept"] = np.where(rescale == 0, np.nan, 0.0)
    df["t1_series_number"] = rng.integers(2, 6, n)
    df["has_images"] = True
    return df


def realised_correlations(df: pd.DataFrame, planted: dict[str, tuple[str, float]]) -> dict:
    """Pearson r of each measure with its planted feature (complete cases)."""
    out = {}
    for measure, (feature, _) in planted.items():
        ok = df[[measure, feature]].dropna()
        out[measure] = round(float(np.corrcoef(ok[feature], ok[measure])[0, 1]), 4) \
            if len(ok) > 2 else None
    return out
