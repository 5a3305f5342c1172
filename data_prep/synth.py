"""Synthetic thigh-MRI cohorts: real DICOM series plus clinical tables in each cohort's conventions.

    python data_prep/synth.py --out data/synth --subjects 100 --seed 0 [--null]
        [--matrix 256x512] [--r-strength 0.65] [--overwrite]

Writes the layout of ARCHITECTURE.md "Synthetic cohort layout": OAI gets N imaged participants
(+ TABLE_ONLY_OAI table-only rows), SOMMA (N+1)//2, volunteers 8. Same seed -> byte-identical
files. truth.csv holds the generator's ground truth (tests only); manifest.json the settings and
the planted and realised correlations. Images come from data_prep/phantom.py, DICOM headers and
files from data_prep/synth_dicom.py; this module holds the subject model, tables and CLI.

Subject model (per cohort; areas are per thigh, averaged over both thighs and the 15 slices):
    sex        female with probability 0.58 (OAI), 0.59 (SOMMA), 0.5 (volunteers)
    age        OAI U{45..79}; SOMMA 70 + Gamma(2, 3.5) capped at 94; volunteers U{22..65}
    bmi        N(28.5, 4.8) clipped to [18, 48];  zb = (bmi - 28.5) / 4.8
    muscle     (mu + sd * (0.45 zb + 0.89 e1)) * (1 - 0.005 (age - 60)), mu, sd = 130, 22 (men),
               95, 16 (women): BMI raises muscle, so body size is both signal and confound
    fat        mu + sd * (0.75 zb + 0.66 e2), 60, 25 (men), 110, 40 (women); capped so one thigh
               fits its 250 x 250 mm half of the field of view
    imat       intermuscular-fat fraction 0.07 + 0.025 zb + 0.012 (age - 60) / 10
               + 0.01 female + 0.025 q, clipped [0.015, 0.35]; q = muscle-quality latent
    measure    mean + sd * (r * z(feature) + sqrt(1 - r^2) * e), z standardised within the cohort;
               e = +-sqrt(0.3) u + sqrt(0.7) eps with u a shared fitness latent (sign: better).
               PLANTED: leg_strength ~ muscle_area r = +r_strength (0.65); gait_speed_short ~
               imat_fraction r = -0.30; gait_400m (s) ~ imat_fraction r = +0.25; chair_stand (s)
               ~ muscle_area r = -0.20. null=True: measure = mean + sd * e, same marginals,
               independent of every image feature.
    volunteers exercise = 'yes' for the 3-5 highest (within-sex muscle z + N(0, 0.7)).
"""

from __future__ import annotations

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.phantom import MAX_THIGH_AREA_CM2, N_SLICES, check_matrix, pixel_spacing
# PHI_NAMES, anatomy_from_row and participant_rng are re-exported for tests and callers
from data_prep.synth_dicom import (COHORT_CODE, LOCALIZER, PHI_NAMES, SERIES,  # noqa: F401
                                   SLICE_MM, anatomy_from_row, derive_rng, participant_rng,
                                   write_participant)

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
FEATURES = ("muscle_area_cm2", "imat_area_cm2", "imat_fraction", "fat_area_cm2", "bmi")
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
OAI_MISSING = (".: Missing Form/Incomplete Workbook", ".A: Not Expected", " ")
OAI_400M_CODES = {1: "1: Completed test without stopping",
                  2: "2: Completed test with one or more rests", 0: "0: Not completed"}
OAI_RACE = ("1: White or Caucasian", "2: Black or African American", "3: Asian",
            "0: Other Non-white")


def _z(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / x.std() if len(x) > 1 and x.std() > 0 else np.zeros_like(x)


def sample_subjects(n: int, *, seed: int, cohort: str, null: bool = False,
                    r_strength: float = 0.65,
                    correlations: dict[str, tuple[str, float]] | None = None) -> pd.DataFrame:
    """Draw anatomy, scan settings and measures of `n` participants without rendering images.

    Args:
        n: participants to draw.
        seed: master seed (cohort streams are derived from it).
        cohort: one of COHORTS.
        null: measures independent of the anatomy (same marginals).
        r_strength: planted correlation of leg_strength with muscle area.
        correlations: overrides of PLANTED, measure -> (feature, r).

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
    imat_fraction = np.clip(0.07 + 0.025 * zb + 0.0012 * (age - 60) + 0.01 * female + 0.025 * q,
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
        "cortex_mm": cortex, "asymmetry": asym, "taper": taper})

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


def _fmt(values: pd.Series, spec: str) -> list[str]:
    return [" " if pd.isna(v) else format(v, spec) for v in values]


def _sprinkle(cells: pd.DataFrame, groups: list[list[str]], codes: tuple[str, ...],
              rng: np.random.Generator, eligible: pd.DataFrame | None = None) -> pd.Series:
    """Replace ~3 % of the (row, column group) cells by missing codes; every code appears once.

    Returns the columns made missing per row (';'-joined) for truth.csv.
    """
    ok = None if eligible is None else {c: eligible[c].to_numpy() for c in eligible.columns}
    slots = [(i, g) for i in range(len(cells)) for g in range(len(groups))
             if ok is None or all(ok[c][i] for c in groups[g])]
    k = min(len(slots), max(len(codes), round(0.03 * len(slots))))
    missing = [""] * len(cells)
    for j, s in enumerate(rng.permutation(len(slots))[:k]):
        i, g = slots[s]
        code = codes[j] if j < len(codes) else codes[rng.integers(len(codes))]
        for col in groups[g]:
            cells.iat[i, cells.columns.get_loc(col)] = code
        missing[i] = ";".join(filter(None, [missing[i], *groups[g]]))
    return pd.Series(missing, index=cells.index)


def _write_pipe(df: pd.DataFrame, path: Path) -> None:
    """OAI ASCII release: pipe-delimited, upper-case header, CRLF, latin-1."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["|".join(c.upper() for c in df.columns)]
    lines += ["|".join(r) for r in df.astype(str).itertuples(index=False, name=None)]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode("latin-1"))


def write_tables(subjects: dict[str, pd.DataFrame], out: Path, *, seed: int) -> None:
    """Clinical tables of all cohorts; adds a 'table_missing' column to each frame."""
    rng = derive_rng(seed, 99)
    oai = subjects["oai"].sort_values("id")
    cells = pd.DataFrame({
        "ID": oai["id"], "V00AGE": _fmt(oai["age"], ".0f"), "P01BMI": _fmt(oai["bmi"], ".1f"),
        "P01WEIGHT": _fmt(oai["weight_kg"], ".1f"), "P01HEIGHT": _fmt(oai["height_mm"], ".0f"),
        "V0020MPACE": _fmt(oai["gait_speed_short"], ".2f"),
        "V00400MTIM": _fmt(oai["gait_400m"], ".0f"),
        "V00400MCMP": [OAI_400M_CODES[c] for c in oai["walk400_code"]],
        "V00CSTIME1": _fmt(oai["chair_stand"], ".2f"),
        "V00CSPACE": _fmt(5.0 / oai["chair_stand"], ".3f"),
        "V00REMAXF": _fmt(oai["strength_right"], ".1f"),
        "V00LEMAXF": _fmt(oai["strength_left"], ".1f"),
        "V00RFMAXF": _fmt(oai["flexion_right"], ".1f"),
        "V00LFMAXF": _fmt(oai["flexion_left"], ".1f")}, index=oai.index)
    cells.loc[oai["walk400_code"] == 0, "V00400MTIM"] = OAI_MISSING[0]
    groups = [["V0020MPACE"], ["V00400MTIM"], ["V00CSTIME1", "V00CSPACE"], ["V00REMAXF"],
              ["V00LEMAXF"], ["V00RFMAXF"], ["V00LFMAXF"]]
    eligible = pd.DataFrame(True, index=cells.index, columns=cells.columns)
    eligible["V00400MTIM"] = (oai["walk400_code"] != 0).to_numpy()
    subjects["oai"]["table_missing"] = _sprinkle(cells, groups, OAI_MISSING, rng, eligible)
    base = out / "oai" / "tables"
    _write_pipe(cells, base / "AllClinical_ASCII" / "AllClinical00.txt")
    race = rng.choice(len(OAI_RACE), len(oai), p=[0.79, 0.18, 0.01, 0.02])
    _write_pipe(pd.DataFrame({"ID": oai["id"], "P02SEX": np.where(oai["sex"] == "male",
                                                                  "1: Male", "2: Female"),
                              "P02RACE": [OAI_RACE[r] for r in race]}),
                base / "General_ASCII" / "Enrollees.txt")

    somma = subjects["somma"].sort_values("id")
    table = pd.DataFrame({
        "SOMMA_ID": somma["id"], "GENDER": np.where(somma["sex"] == "male", "M", "F"),
        "AGE_YRS": somma["age"].astype(int), "BMI_KGM2": somma["bmi"],
        "LEGPOWER_W": somma["leg_strength"].round(1),
        "GAIT4M_MS": somma["gait_speed_short"].round(3),
        "WALK400_SEC": somma["gait_400m"].round(1),
        "WALK400_DONE": (somma["walk400_code"] != 0).astype(int),
        "CHAIR5_SEC": somma["chair_stand"].round(2)}, index=somma.index).astype(object)
    eligible = pd.DataFrame(True, index=table.index, columns=table.columns)
    eligible["WALK400_SEC"] = (somma["walk400_code"] != 0).to_numpy()
    subjects["somma"]["table_missing"] = _sprinkle(
        table, [["LEGPOWER_W"], ["GAIT4M_MS"], ["WALK400_SEC"], ["CHAIR5_SEC"]], ("",), rng,
        eligible)
    (out / "somma" / "tables").mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "somma" / "tables" / "somma_baseline.csv", index=False, lineterminator="\n")

    vol = subjects["volunteers"]
    vol["table_missing"] = ""
    (out / "volunteers" / "tables").mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"code": vol["id"], "sex": np.where(vol["sex"] == "male", "M", "F"),
                  "age": vol["age"].astype(int),
                  "exercise": np.where(vol["exercise"] == 1, "yes", "no")}).to_csv(
        out / "volunteers" / "tables" / "volunteers.csv", index=False, lineterminator="\n")


def realised_correlations(df: pd.DataFrame, planted: dict[str, tuple[str, float]]) -> dict:
    """Pearson r of each measure with its planted feature (complete cases)."""
    out = {}
    for measure, (feature, _) in planted.items():
        ok = df[[measure, feature]].dropna()
        out[measure] = round(float(np.corrcoef(ok[feature], ok[measure])[0, 1]), 4) \
            if len(ok) > 2 else None
    return out


def generate_cohort(out: Path, *, subjects: int, seed: int, null: bool = False,
                    matrix: tuple[int, int] = (256, 512), r_strength: float = 0.65,
                    overwrite: bool = False, verbose: bool = False) -> dict:
    """Write the synthetic cohorts (DICOM, tables, truth.csv, manifest.json) under `out`.

    Args:
        out: output folder; must not already hold a cohort unless overwrite.
        subjects: imaged OAI participants; SOMMA gets (subjects + 1) // 2, volunteers 8.
        seed: master seed; the same seed gives byte-identical files.
        null: measures independent of the images (same marginals).
        matrix: (rows, cols) of the axial series; field of view stays 250 x 500 mm.
        r_strength: planted correlation of leg strength with muscle area.
        overwrite: replace an existing cohort in `out`.
        verbose: print progress per cohort.

    Returns:
        The manifest (also written to out/manifest.json).
    """
    out = Path(out)
    if subjects < 1:
        raise ValueError(f"Invalid subjects {subjects}: need at least 1.")
    check_matrix(matrix)
    existing = [p for p in (*COHORTS, "truth.csv", "manifest.json") if (out / p).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {', '.join(existing)}; pass --overwrite "
                              "(overwrite=True) to replace it.")
    for p in existing:
        shutil.rmtree(out / p) if (out / p).is_dir() else (out / p).unlink()
    counts = {"oai": subjects, "somma": (subjects + 1) // 2, "volunteers": N_VOLUNTEERS}
    frames = {}
    for cohort, n in counts.items():
        extra = TABLE_ONLY_OAI if cohort == "oai" else 0
        df = sample_subjects(n + extra, seed=seed, cohort=cohort, null=null,
                             r_strength=r_strength)
        if extra:
            table_only = derive_rng(seed, 98).choice(n + extra, extra, replace=False)
            df.loc[df.index[table_only], "has_images"] = False
        frames[cohort] = df
    write_tables(frames, out, seed=seed)
    for cohort, df in frames.items():
        t0 = time.perf_counter()
        dirs = [write_participant(row, out / cohort, seed=seed, matrix=matrix).relative_to(out)
                .as_posix() if row["has_images"] else "" for _, row in df.iterrows()]
        df["dicom_dir"] = dirs
        if verbose:
            print(f"{cohort}: {int(df['has_images'].sum())} participants imaged in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
    truth = pd.concat(frames.values(), ignore_index=True)
    truth.to_csv(out / "truth.csv", index=False, lineterminator="\n")
    planted = {**PLANTED, "leg_strength": ("muscle_area_cm2", r_strength)}
    manifest = {
        "generator": "data_prep/synth.py", "schema_version": 1, "seed": seed, "null": null,
        "matrix": list(matrix), "pixel_spacing_mm": list(pixel_spacing(matrix)),
        "n_slices": N_SLICES, "slice_thickness_mm": SLICE_MM,
        "counts": {c: {"imaged": int(f["has_images"].sum()),
                       "table_only": int((~f["has_images"]).sum())} for c, f in frames.items()},
        "series": {c: {"study_description": s["study"], "t1_series_description": s["t1"],
                       "localizer_series_description": LOCALIZER} for c, s in SERIES.items()},
        "correlations": {
            "planted": {m: {"feature": f, "r": 0.0 if null else r}
                        for m, (f, r) in planted.items()},
            "shared_fitness_variance": SHARED_FITNESS,
            "realised": {c: realised_correlations(f, planted) for c, f in frames.items()
                         if c != "volunteers"}},
        "marginals": {c: {m: dict(zip(("mean", "sd", "min", "max"), v)) for m, v in mc.items()}
                      for c, mc in MARGINALS.items() if c != "volunteers"},
        "tables": {"oai": ["oai/tables/AllClinical_ASCII/AllClinical00.txt",
                           "oai/tables/General_ASCII/Enrollees.txt"],
                   "somma": ["somma/tables/somma_baseline.csv"],
                   "volunteers": ["volunteers/tables/volunteers.csv"]},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _matrix(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"Invalid matrix {text!r}: use ROWSxCOLS, e.g. 256x512.")
    return rows, cols


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--subjects", type=int, default=100, help="imaged OAI participants")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--null", action="store_true", help="measures independent of the images")
    p.add_argument("--matrix", type=_matrix, default=(256, 512), help="ROWSxCOLS (256x512)")
    p.add_argument("--r-strength", type=float, default=0.65,
                   help="planted r of leg strength with muscle area (published 0.60-0.76)")
    p.add_argument("--overwrite", action="store_true", help="replace a cohort already in --out")
    return p


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        manifest = generate_cohort(args.out, subjects=args.subjects, seed=args.seed,
                                   null=args.null, matrix=args.matrix,
                                   r_strength=args.r_strength, overwrite=args.overwrite,
                                   verbose=True)
    except (ValueError, FileExistsError) as e:
        sys.exit(f"synth: {e}")
    counts = ", ".join(f"{c} {v['imaged']} imaged" + (f" + {v['table_only']} table-only"
                                                       if v["table_only"] else "")
                       for c, v in manifest["counts"].items())
    realised = manifest["correlations"]["realised"]["oai"]
    print(f"Wrote {counts} to {args.out} in {time.perf_counter() - t0:.1f} s "
          f"(seed {args.seed}, {'NULL measures' if args.null else 'planted correlations'}, "
          f"matrix {args.matrix[0]}x{args.matrix[1]}); OAI realised r: "
          + ", ".join(f"{m} {r}" for m, r in realised.items()))


if __name__ == "__main__":
    main()
