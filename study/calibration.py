"""A grid's cells trained without Ray or MLflow, for calibration checks of the statistics.

    from study.calibration import build_synthetic_store, grid_summaries, holdout_summary
    store = build_synthetic_store(tmp / "c", subjects=160, seed=3, null=True, matrix=(64, 128))
    summary = holdout_summary(store, grid_dict)      # one cell: study.metrics.summarize of its test set
    cells = grid_summaries(store, grid_dict)         # every cell, with Holm / BH across them

The same store, one-split-per-cohort plan, labels, model, engine and statistics as a launched
cell (study/plan.py, study/trainable.py, study/engine.py, study/metrics.py), with the grid's
fixed training settings instead of a search: what tests/study/test_calibration.py (planted
effect found, null effect not), benchmarks/null_seeds.py (null accuracy over many cohorts) and
benchmarks/calibration.py (false-positive rate, family-wise rate after Holm, power) run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CALIBRATION_SALT = "calibration-salt-0123456789abcdef"  # synthetic cohorts only


def build_synthetic_store(folder: Path, *, subjects: int, seed: int, null: bool,
                          matrix: tuple[int, int], r_strength: float = 0.65) -> Path:
    """Generate a synthetic cohort under `folder` and build its OAI part into
    `folder/store.zarr` at the generated size; returns the store path.

    Args:
        r_strength: planted correlation of leg strength with muscle area (ignored if null).
    """
    from data_prep.build_store import main as build_main
    from data_prep.synth import generate_cohort

    folder.mkdir(parents=True, exist_ok=True)
    cohort = folder / "cohort"
    generate_cohort(cohort, subjects=subjects, seed=seed, null=null, matrix=matrix, r_strength=r_strength)
    (folder / "salt").write_text(CALIBRATION_SALT + "\n")
    store = folder / "store.zarr"
    code = build_main(["--dicom", str(cohort / "oai" / "dicom"),
                       "--tables", str(cohort / "oai" / "tables"), "--cohort", "oai",
                       "--out", str(store), "--size", f"{matrix[0]}x{matrix[1]}",
                       "--salt-file", str(folder / "salt"), "--no-progress"])
    if code not in (0, None):
        raise RuntimeError(f"building {store} failed with exit code {code}")
    return store


def _train_and_test(store, store_path: Path, config, plan, threads: int) -> dict[str, Any]:
    """Fit one cell's model with the grid's fixed settings; its test predictions and summary."""
    import torch

    from study.engine import evaluate, fit
    from study.metrics import summarize
    from study.model import seed_everything
    from study.selection import epoch_key
    from study.trainable import CellContext, build_trial, make_loaders

    ctx = CellContext(cell=plan.cell, store=str(store_path), store_hash=store.content_hash,
                      train=config.train, split=plan.split, labels=plan.labels,
                      threshold=plan.threshold, threshold_rule=plan.threshold_rule,
                      direction=plan.direction, tracking_uri="", experiment_id="",
                      cell_run_id="", cpus_per_trial=threads, gpus_per_trial=0)
    torch.set_num_threads(threads)
    t = config.train
    seed_everything(t.seed)
    model, fit_model, loaders, _ = build_trial(store, ctx, t)
    fit(fit_model, loaders["train"], loaders["val"], t, select_key=epoch_key(config.select_on))  # as a launched trial
    out = evaluate(model, make_loaders(store, ctx, t, partitions=("test",))["test"])
    summary = summarize(out["subject_labels"], out["subject_probs"], train_labels=plan.labels["train"],
                        seed=t.seed)
    predictions = {"rows": out["subject_rows"], "labels": out["subject_labels"], "probs": out["subject_probs"]}
    return {"summary": summary, "predictions": predictions}


def _plans(store_path: Path, grid: dict[str, Any]):
    from data_prep.store import open_store
    from study.config import parse_grid
    from study.plan import plan_cells

    store = open_store(store_path)
    config = parse_grid({**grid, "store": str(store_path)})
    if config.protocol != "holdout":
        raise ValueError(f"calibration runs protocol holdout; the grid asks for {config.protocol}")
    return store, config, plan_cells(config, store)


def holdout_summary(store_path: Path, grid: dict[str, Any], *, threads: int = 2) -> dict[str, float]:
    """Train the grid's single cell on its training subjects with `grid["train"]` (fixed
    settings, no search) and summarise the test subjects (study.metrics.summarize)."""
    store, config, plans = _plans(store_path, grid)
    if len(plans) != 1:
        raise ValueError(f"holdout_summary runs one cell; the grid expands to {len(plans)}")
    return _train_and_test(store, store_path, config, plans[0], threads)["summary"]


def grid_summaries(store_path: Path, grid: dict[str, Any], *, threads: int = 2) -> list[dict[str, Any]]:
    """Every cell of the grid trained and tested like holdout_summary, then the launch's
    statistics across cells: Holm / BH (study.multiplicity, the grid's family) and the
    stratum-vs-pooled comparisons (study.compare).

    Returns:
        One dict per cell: "cell" (name), the axes, "test_"-prefixed summarize keys,
        test_vs_baseline_p_holm / _bh, the cell's stratum_minus_pooled_* keys when it is a
        stratum whose pooled cell is in the grid, and "predictions" {"rows", "labels", "probs"}.
    """
    from study.compare import launch_comparisons
    from study.multiplicity import adjust_cells

    store, config, plans = _plans(store_path, grid)
    results, predictions = [], {}
    for plan in plans:
        done = _train_and_test(store, store_path, config, plan, threads)
        predictions[plan.cell] = done["predictions"]
        results.append({"cell": plan.cell.name, **plan.cell.axes, **plan.counts(),
                        **{f"test_{k}": v for k, v in done["summary"].items()},
                        "predictions": done["predictions"]})
    per_cell, _ = launch_comparisons(predictions, seed=config.train.seed)
    for r in results:
        r.update(per_cell.get(r["cell"], {}))
    return adjust_cells(results, p_key="test_vs_baseline_p", family_by=config.multiplicity_family)
