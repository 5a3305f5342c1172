"""The synthetic cohorts on disk: DICOM trees, tables, truth.csv and manifest.json.

    from data_prep.synthetic import generate_cohort
    manifest = generate_cohort(Path("data/synth"), subjects=100, seed=0)

CLI: data_prep/synth.py. Layout: ARCHITECTURE.md "Synthetic cohort layout" (OAI: visit /
batch / ID / date / series / numbered images, one participant or more split over two
batches; SOMMA and volunteers: ID / series / files). Subjects come
from subjects.py, tables from tables.py, DICOM files from dicom_writer.py (images:
phantom.py). Same seed -> byte-identical files.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pandas as pd

from data_prep.synthetic.dicom_writer import (LOCALIZER, SERIES, SLICE_MM, derive_rng,
                                              write_participant)
from data_prep.synthetic.phantom import N_SLICES, check_matrix, pixel_spacing
from data_prep.synthetic.subjects import (COHORTS, IMAT_QUALITY_SD, MARGINALS, N_VOLUNTEERS, PLANTED,
                                          SHARED_FITNESS, TABLE_ONLY_OAI, realised_correlations,
                                          sample_subjects)
from data_prep.synthetic.tables import write_tables

# OAI's image release puts participants in batch folders (`0.C.1`, `0.C.2`, ...) under each
# visit, and ships some participants' series in two batches (`0.C.2` and `0.E.1`).
OAI_BATCH_SIZE = 60  # imaged participants per batch folder; at least two batches
OAI_SPLIT_SHARE = 0.02  # participants whose localizer is in OAI_SPLIT_BATCH (at least one)
OAI_SPLIT_BATCH = "0.E.1"


def oai_batches(ids: list[str], seed: int) -> tuple[dict[str, str], dict[str, str]]:
    """({id: batch of its T1 series}, {id: batch of its localizer}) for the imaged OAI
    participants: consecutive IDs share a batch; OAI_SPLIT_SHARE of them (at least one, when
    there are two or more) have their localizer in OAI_SPLIT_BATCH."""
    ids = sorted(ids)
    n = len(ids)
    k = max(2, math.ceil(n / OAI_BATCH_SIZE)) if n > 1 else 1
    t1 = {pid: f"0.C.{i * k // n + 1}" for i, pid in enumerate(ids)}
    n_split = max(1, round(OAI_SPLIT_SHARE * n)) if n > 1 else 0
    split = set(derive_rng(seed, 97).choice(ids, n_split, replace=False)) if n_split else set()
    return t1, {pid: OAI_SPLIT_BATCH if pid in split else t1[pid] for pid in ids}


def generate_cohort(out: Path, *, subjects: int, seed: int, null: bool = False,
                    matrix: tuple[int, int] = (256, 512), r_strength: float = 0.65,
                    correlations: dict[str, tuple[str, float]] | None = None,
                    imat_quality_sd: float = IMAT_QUALITY_SD,
                    overwrite: bool = False, verbose: bool = False) -> dict:
    """Write the synthetic cohorts (DICOM, tables, truth.csv, manifest.json) under `out`.

    Args:
        out: output folder; must not already hold a cohort unless overwrite.
        subjects: imaged OAI participants; SOMMA gets (subjects + 1) // 2, volunteers 8.
        seed: master seed; the same seed gives byte-identical files.
        null: measures independent of the images (same marginals).
        matrix: (rows, cols) of the axial series; field of view stays 250 x 500 mm.
        r_strength: planted correlation of leg strength with muscle area.
        correlations: overrides of the planted effects, measure -> (feature, r) (subjects.py),
            e.g. {"leg_strength": ("muscle_quality", 0.8)}: strength from muscle quality only.
        imat_quality_sd: intermuscular-fat fraction per SD of muscle quality (image visibility).
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
                             r_strength=r_strength, correlations=correlations,
                             imat_quality_sd=imat_quality_sd)
        if extra:
            table_only = derive_rng(seed, 98).choice(n + extra, extra, replace=False)
            df.loc[df.index[table_only], "has_images"] = False
        frames[cohort] = df
    write_tables(frames, out, seed=seed)
    oai = frames["oai"]
    t1_batch, loc_batch = oai_batches(oai.loc[oai["has_images"], "id"].tolist(), seed)
    for cohort, df in frames.items():
        t0 = time.perf_counter()
        dirs = []
        for _, row in df.iterrows():
            pid = row["id"]
            if not row["has_images"]:
                dirs.append(("", "", ""))
                continue
            t1_dir, loc_dir = write_participant(row, out / cohort, seed=seed, matrix=matrix,
                                                batch=t1_batch.get(pid),
                                                localizer_batch=loc_batch.get(pid))
            dirs.append((t1_dir.relative_to(out).as_posix(),
                         loc_dir.relative_to(out).as_posix(), t1_batch.get(pid, "")))
        df["dicom_dir"], df["localizer_dir"], df["batch"] = zip(*dirs)
        if verbose:
            print(f"{cohort}: {int(df['has_images'].sum())} participants imaged in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
    truth = pd.concat(frames.values(), ignore_index=True)
    truth.to_csv(out / "truth.csv", index=False, lineterminator="\n")
    planted = {**PLANTED, "leg_strength": ("muscle_area_cm2", r_strength), **(correlations or {})}
    manifest = {
        "generator": "data_prep/synth.py", "schema_version": 1, "seed": seed, "null": null,
        "matrix": list(matrix), "pixel_spacing_mm": list(pixel_spacing(matrix)),
        "n_slices": N_SLICES, "slice_thickness_mm": SLICE_MM,
        "counts": {c: {"imaged": int(f["has_images"].sum()),
                       "table_only": int((~f["has_images"]).sum())} for c, f in frames.items()},
        "oai_batches": sorted(set(t1_batch.values()) | set(loc_batch.values())),
        "oai_split_over_two_batches": sum(t1_batch[p] != loc_batch[p] for p in t1_batch),
        "series": {c: {"study_description": s["study"], "t1_series_description": s["t1"],
                       "localizer_series_description": LOCALIZER} for c, s in SERIES.items()},
        "correlations": {
            "planted": {m: {"feature": f, "r": 0.0 if null else r}
                        for m, (f, r) in planted.items()},
            "shared_fitness_variance": SHARED_FITNESS, "imat_quality_sd": imat_quality_sd,
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
