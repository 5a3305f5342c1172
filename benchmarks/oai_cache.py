"""An OAI-size store whose feature cache is already warm: the launch path, minus the feature pass.

    from oai_cache import build     # beside this script (benchmarks/launch_overhead.py uses it)
    store_path, info = build(Path("/tmp/bench_oai"), subjects=3515)

Writes a real, complete Zarr store (data_prep.store.StoreWriter: `open_store` accepts it,
content hash and all) with 3,515 participants x 15 slices = 52,725 slices of tiny 16 x 32
images, a subjects table (sex, age, BMI and the four canonical measures), and the complete
feature-cache entry (study.features.prefill) that a freeze=fc trial with weights "none" and
seed 0 looks up: 52,725 x 512 float32 features with a planted signal, as
benchmarks/head_trainer.py makes them (non-negative like avgpool outputs; a per-subject
latent factor on 16 features plus a per-subject random effect). The measures follow the same
latent factor plus noise, so every cell's labels are learnable from the features but not
trivially. Trials therefore never run the frozen network; images are read only where the
launch reads them after a cell's search (saliency of a few test subjects).

Built once per folder and seed, reused while `build.json` matches.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

N_FEAT = 512
SIZE = (16, 32)  # images are never the point here: small keeps the store at ~60 MB
SLICES = 15


def _subjects(rng: np.random.Generator, n: int) -> tuple[list[dict], np.ndarray]:
    """Table rows (pseudonymous ids, sex, age, BMI, the measures) and the latent factor."""
    latent = rng.normal(size=n)
    male = rng.random(n) < 0.42  # OAI is about 58% women
    bmi = np.clip(rng.normal(28.6, 4.8, n) - 0.6 * latent, 16.0, 50.0)
    age = rng.integers(45, 80, n)
    noise = lambda scale: rng.normal(0.0, scale, n)  # noqa: E731
    measures = {  # higher is better for the first two, lower for the timed ones
        "leg_strength": 320 + 70 * latent + 60 * male + noise(60),
        "gait_speed_short": 1.30 + 0.10 * latent + noise(0.12),
        "gait_400m": 300 - 25 * latent + noise(30),
        "chair_stand": 10.0 - 1.0 * latent + noise(1.5),
    }
    rows = []
    for i in range(n):
        rows.append({"subject_id": f"{i:016x}", "cohort": "oai", "sex": "male" if male[i] else "female",
                     "age": float(age[i]), "bmi": float(bmi[i]), "exercise": float("nan"),
                     **{k: float(v[i]) for k, v in measures.items()},
                     "pixel_spacing_row_mm": 12.0, "pixel_spacing_col_mm": 12.0})
    return rows, latent


def _features(rng: np.random.Generator, latent: np.ndarray) -> np.ndarray:
    """(n subjects x SLICES, N_FEAT) float32 as benchmarks/head_trainer.py's make_features."""
    rows = np.repeat(np.arange(latent.size), SLICES)
    base = rng.gamma(2.0, 0.4, size=(latent.size, N_FEAT)).astype(np.float32)
    feats = base[rows] * rng.gamma(8.0, 1 / 8.0, size=(rows.size, N_FEAT)).astype(np.float32)
    feats[:, :16] += (0.25 * latent[rows])[:, None].astype(np.float32).clip(-0.5, None)
    np.maximum(feats, 0, out=feats)
    return feats


def write_store(path: Path, rows: list[dict], rng: np.random.Generator) -> None:
    from data_prep.preprocess import Recipe
    from data_prep.store import StoreWriter

    recipe = Recipe(n_slices=SLICES, size=SIZE)
    writer = StoreWriter.start(path, recipe, build_key="benchmark:oai-cache", overwrite=True)
    for row in rows:
        level = rng.uniform(0.3, 0.6)
        images = (np.clip(rng.normal(level, 0.1, (SLICES, *SIZE)), 0, 1) * 65535).astype(np.uint16)
        writer.add({"participant": row["subject_id"], "problems": [], "row": row}, images=images,
                   stats={"intensity_low": 0.0, "intensity_high": 1.0})
    writer.finish(cohort="oai", cohort_summary={"synthetic": "benchmarks/oai_cache.py"}, ingest_problems=[],
                  provenance={"tool": "benchmarks/oai_cache.py"})


def build(root: Path, *, subjects: int = 3515, seed: int = 0, cache_dir: Path | None = None) -> tuple[Path, dict]:
    """The store under root/store.zarr and its warm cache entry (in cache_dir, default the
    environment's), built unless root/build.json says they already exist for these settings.

    Returns (store path, {"subjects", "slices", "seed", "store_hash", "entry"}).
    """
    from data_prep.store import open_store
    from study import features
    from study.model import build_model, seed_everything

    root.mkdir(parents=True, exist_ok=True)
    store_path, marker = root / "store.zarr", root / "build.json"
    wanted = {"subjects": subjects, "slices": subjects * SLICES, "seed": seed, "size": list(SIZE),
              "feature_code": features.FEATURE_CODE_VERSION}  # a new key layout: prefill the new entry
    if marker.exists():
        info = json.loads(marker.read_text())
        if {k: info.get(k) for k in wanted} == wanted and Path(info["entry"]).exists():
            return store_path, info
    rng = np.random.default_rng(seed)
    rows, latent = _subjects(rng, subjects)
    write_store(store_path, rows, rng)
    store = open_store(store_path)
    seed_everything(0)  # the trial's TrainConfig.seed: its frozen prefix, hence the cache key
    model = build_model(weights="none", freeze="fc")
    entry = features.prefill(model, store, _features(rng, latent), cache_dir=cache_dir)
    info = {**wanted, "store_hash": store.content_hash, "entry": str(entry)}
    marker.write_text(json.dumps(info, indent=2))
    return store_path, info
