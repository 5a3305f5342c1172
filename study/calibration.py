"""One cell's holdout run without Ray or MLflow, for calibration checks of the engine.

    from study.calibration import build_synthetic_store, holdout_summary
    store = build_synthetic_store(tmp / "c", subjects=160, seed=3, null=True, matrix=(64, 128))
    summary = holdout_summary(store, grid_dict)      # study.metrics.summarize of the test set

The same store, split, labels, model, engine and statistics as a launched cell
(study/plan.py, study/trainable.py, study/engine.py, study/metrics.py), with the grid's fixed
training settings instead of a search: what tests/study/test_calibration.py (planted effect
found, null effect not) and benchmarks/null_seeds.py (null accuracy over many cohorts) run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CALIBRATION_SALT = "calibration-salt-0123456789abcdef"  # synthetic cohorts only


def build_synthetic_store(folder: Path, *, subjects: int, seed: int, null: bool,
                          matrix: tuple[int, int]) -> Path:
    """Generate a synthetic cohort under `folder` and build its OAI part into
    `folder/store.zarr` at the generated size; returns the store path."""
    from data_prep.build_store import main as build_main
    from data_prep.synth import generate_cohort

    folder.mkdir(parents=True, exist_ok=True)
    cohort = folder / "cohort"
    generate_cohort(cohort, subjects=subjects, seed=seed, null=null, matrix=matrix)
    (folder / "salt").write_text(CALIBRATION_SALT + "\n")
    store = folder / "store.zarr"
    code = build_main(["--dicom", str(cohort / "oai" / "dicom"),
                       "--tables", str(cohort / "oai" / "tables"), "--cohort", "oai",
                       "--out", str(store), "--size", f"{matrix[0]}x{matrix[1]}",
                       "--salt-file", str(folder / "salt"), "--no-progress"])
    if code not in (0, None):
        raise RuntimeError(f"building {store} failed with exit code {code}")
    return store


def holdout_summary(store_path: Path, grid: dict[str, Any], *, threads: int = 2
                    ) -> dict[str, float]:
    """Train the grid's single cell on its training subjects with `grid["train"]` (fixed
    settings, no search) and summarise the test subjects (study.metrics.summarize)."""
    import torch

    from data_prep.store import open_store
    from study.config import parse_grid
    from study.engine import evaluate, fit
    from study.metrics import summarize
    from study.model import seed_everything
    from study.plan import plan_cells
    from study.trainable import CellContext, build_trial, make_loaders

    store = open_store(store_path)
    config = parse_grid({**grid, "store": str(store_path)})
    plans = plan_cells(config, store)
    if len(plans) != 1:
        raise ValueError(f"holdout_summary runs one cell; the grid expands to {len(plans)}")
    (plan,) = plans
    ctx = CellContext(cell=plan.cell, store=str(store_path), store_hash=store.content_hash,
                      train=config.train, split=plan.split, labels=plan.labels,
                      threshold=plan.threshold, threshold_rule=plan.threshold_rule,
                      direction=plan.direction, tracking_uri="", experiment_id="",
                      cell_run_id="", cpus_per_trial=threads, gpus_per_trial=0)
    torch.set_num_threads(threads)
    t = config.train
    seed_everything(t.seed)
    model, fit_model, loaders, _ = build_trial(store, ctx, t)
    fit(fit_model, loaders["train"], loaders["val"], t)
    out = evaluate(model, make_loaders(store, ctx, t, partitions=("test",))["test"])
    return summarize(out["subject_labels"], out["subject_probs"],
                     train_labels=plan.labels["train"], seed=0)
