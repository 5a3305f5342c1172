"""Does the engine find a planted effect, and only a planted one?

Two synthetic cohorts from the same seed: one where leg strength follows muscle area
(r = 0.65, as published), one (`--null`) where every measure ignores the images. The same
cell (OAI, leg strength, holdout split) is trained on each with the real store, splits, model,
engine and statistics (no Ray/MLflow: tests/test_end_to_end.py covers those). On the planted
cohort the test accuracy's 95% CI must lie above the majority baseline; on the null cohort the
accuracy must sit inside the baseline's CI with permutation p > 0.05.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow

N_SUBJECTS = 260
GRID = {
    "question": "calibration", "store": "unused",
    "grid": {"cohort": ["oai"], "measure": ["leg_strength"]},
    "search": {"lr": {"choice": [1e-3]}},
    "train": {"epochs": 10, "batch_size": 32, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4,
              "freeze": "none", "weights": "none", "input_size": [32, 64], "seed": 0},
    "split": {"val": 0.2, "test": 0.3, "seed": 0},
}


def _run_cell(tmp_path, *, null: bool) -> dict[str, float]:
    from data_prep.build_store import main as build_main
    from data_prep.store import open_store
    from data_prep.synth import generate_cohort
    from study.config import parse_grid
    from study.engine import evaluate, fit
    from study.metrics import summarize
    from study.model import seed_everything
    from study.plan import plan_cells
    from study.trainable import CellContext, build_trial

    cohort = tmp_path / "cohort"
    generate_cohort(cohort, subjects=N_SUBJECTS, seed=11, null=null, matrix=(64, 128))
    (tmp_path / "salt").write_text("calibration-salt-0123456789abcdef\n")
    store_path = tmp_path / "store.zarr"
    assert build_main(["--dicom", str(cohort / "oai" / "dicom"), "--tables", str(cohort / "oai" / "tables"),
                       "--cohort", "oai", "--out", str(store_path), "--size", "64x128",
                       "--salt-file", str(tmp_path / "salt"), "--no-progress"]) in (0, None)
    store = open_store(store_path)
    grid = parse_grid({**GRID, "store": str(store_path)})
    (plan,) = plan_cells(grid, store)
    ctx = CellContext(cell=plan.cell, store=str(store_path), store_hash=store.content_hash, train=grid.train,
                      split=plan.split, labels=plan.labels, threshold=plan.threshold,
                      threshold_rule=plan.threshold_rule, direction=plan.direction, tracking_uri="",
                      experiment_id="", cell_run_id="", cpus_per_trial=2, gpus_per_trial=0)
    torch.set_num_threads(2)
    seed_everything(grid.train.seed)
    model, fit_model, loaders, _ = build_trial(store, ctx, grid.train)
    t = grid.train
    fit(fit_model, loaders["train"], loaders["val"], epochs=t.epochs, optimizer=t.optimizer, lr=t.lr,
        weight_decay=t.weight_decay)
    from study.trainable import make_loaders

    out = evaluate(model, make_loaders(store, ctx, t, partitions=("test",))["test"])
    return summarize(out["subject_labels"], out["subject_probs"], train_labels=plan.labels["train"], seed=0)


def test_planted_effect_is_found(tmp_path):
    s = _run_cell(tmp_path, null=False)
    print({k: round(float(v), 3) for k, v in s.items()})
    assert s["acc_ci_low"] > s["baseline_acc"], s
    assert s["perm_p"] < 0.05, s


def test_null_cohort_stays_at_baseline(tmp_path):
    s = _run_cell(tmp_path, null=True)
    print({k: round(float(v), 3) for k, v in s.items()})
    assert s["baseline_ci_low"] <= s["acc"] <= s["baseline_ci_high"], s
    assert s["perm_p"] > 0.05, s
