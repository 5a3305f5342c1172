"""Are the cells' tests against the baseline calibrated, and do they find a planted effect?

    python benchmarks/calibration.py --null-seeds 1-20 --planted-seeds 101-110 --out /tmp/calibration

For each seed: a synthetic cohort (data_prep/synth.py; --null: every measure independent of
the images; planted: leg strength ~ muscle area at r = --r-strength, 0.6 by default, the other
measures weakly tied to muscle quality as in synth.py), its store, and a multi-cell grid
(GRID: four measures x sex all/female, one split per cohort, threshold: stratum so every
stratum has balanced classes) trained with fixed small settings (a frozen random-init backbone,
its head trained on cached features) through
study.calibration.grid_summaries: the split, labels, engine and statistics of a launched cell,
without a search (no selection effect to absorb), Holm and BH across the launch's cells.

Reported (and written to <out>/results.json; one line per cohort in <out>/cohorts.jsonl, so an
interrupted run resumes where it stopped):
- null cohorts: the share of cells called better than the baseline at 0.05 (raw exact McNemar
  p), with its 95% Clopper-Pearson interval (the Monte-Carlo error); calibrated when the share
  is at most 0.05 or the interval reaches 0.05;
- null cohorts: the share of launches with any cell significant after Holm (family-wise error),
  which must leave at least 95% of launches without a false positive (same check);
- planted cohorts: the power to call the planted cell (leg_strength, sex all) better than the
  baseline, raw and after Holm, and every cell's rate.
Results go into benchmarks/README.md ("Calibration of the test against the baseline").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GRID = {
    "question": "calibration of the test against the baseline", "store": "unused",
    "grid": {"cohort": ["oai"], "measure": ["leg_strength", "gait_speed_short", "chair_stand", "gait_400m"],
             "sex": ["all", "female"]},
    "threshold": "stratum",  # balanced classes in every stratum (the cohort median splits women unevenly)
    "search": {"lr": {"choice": [1e-3]}},
    # the cheapest real path on a shared 2-core machine: a frozen random-init backbone whose
    # features are cached once per store (study/features.py), only the head trained; full
    # training costs ~6 min per cell there. Power is this weak model's, a floor for full training.
    "train": {"epochs": 20, "batch_size": 32, "optimizer": "adamw", "lr": 1e-2, "weight_decay": 1e-1,
              "freeze": "fc", "weights": "none", "slices_per_subject": 5, "seed": 0},
    "split": {"val": 0.2, "test": 0.3, "seed": 0},
}
# --full-training: every layer trained from random init, as ablations/demo.yaml (about 10x the
# time); the power of a model that can learn muscle area, not only read random features
FULL_TRAINING = {"epochs": 8, "lr": 1e-3, "weight_decay": 1e-4, "freeze": "none"}
PLANTED_CELL = "oai__leg_strength__sex-all__bmi-all"


def _seeds(text: str) -> list[int]:
    """"1-20" or "1,2,5" -> the list of seeds."""
    out: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        out.extend(range(int(low), int(high or low) + 1))
    return out


def run_cohort(seed: int, *, null: bool, subjects: int, matrix: tuple[int, int], r_strength: float,
               out: Path, threads: int, grid: dict) -> dict:
    from study.calibration import build_synthetic_store, grid_summaries

    folder = out / f"{'null' if null else 'planted'}_{seed}"
    shutil.rmtree(folder, ignore_errors=True)
    os.environ["THIGHMRI_FEATURE_CACHE"] = str(folder / "feature_cache")  # removed with the cohort
    t0 = time.perf_counter()
    store = build_synthetic_store(folder, subjects=subjects, seed=seed, null=null, matrix=matrix,
                                  r_strength=r_strength)
    built = time.perf_counter() - t0
    cells = grid_summaries(store, grid, threads=threads)
    shutil.rmtree(folder, ignore_errors=True)
    keep = ("n_test", "test_acc", "test_baseline_acc", "test_auroc", "test_vs_baseline_p",
            "test_vs_baseline_p_holm", "test_vs_baseline_p_bh", "test_assoc_p", "stratum_minus_pooled_acc",
            "stratum_minus_pooled_auroc")
    return {"seed": seed, "null": null, "seconds_build": round(built, 1),
            "seconds": round(time.perf_counter() - t0, 1),
            "cells": {c["cell"]: {k: (None if c.get(k) is None else float(c[k])) for k in keep if k in c}
                      for c in cells}}


def _rate(k: int, n: int) -> dict:
    from study.metrics import proportion_ci

    low, high = proportion_ci(k, n)
    return {"k": k, "n": n, "rate": round(k / n, 4) if n else None, "ci95": [round(low, 4), round(high, 4)]}


def summarize_runs(rows: list[dict]) -> dict:
    out: dict = {}
    null = [r for r in rows if r["null"]]
    planted = [r for r in rows if not r["null"]]
    if null:
        cells = [c for r in null for c in r["cells"].values()]
        raw = _rate(sum(c["test_vs_baseline_p"] < 0.05 for c in cells), len(cells))
        fwer = _rate(sum(any(c["test_vs_baseline_p_holm"] < 0.05 for c in r["cells"].values()) for r in null), len(null))
        bh = _rate(sum(any(c["test_vs_baseline_p_bh"] < 0.05 for c in r["cells"].values()) for r in null), len(null))
        assoc = _rate(sum(c["test_assoc_p"] < 0.05 for c in cells), len(cells))
        out["null"] = {
            "cohorts": len(null), "cells": len(cells),
            "cells_better_than_baseline_at_0.05": raw,
            "calibrated": raw["rate"] <= 0.05 or raw["ci95"][0] <= 0.05,
            "launches_with_a_holm_false_positive": fwer,
            "launches_without_false_positive_ge_95pct": (1 - fwer["rate"]) >= 0.95 or fwer["ci95"][0] <= 0.05,
            "launches_with_a_bh_false_positive": bh,
            "cells_associated_at_0.05 (assoc_p, not a baseline test)": assoc,
            "mean_acc_minus_baseline": round(statistics.fmean(c["test_acc"] - c["test_baseline_acc"] for c in cells), 4),
            "mean_n_test": round(statistics.fmean(c["n_test"] for c in cells), 1),
        }
    if planted:
        per_cell = {}
        for name in planted[0]["cells"]:
            got = [r["cells"][name] for r in planted if name in r["cells"]]
            per_cell[name] = {
                "raw": _rate(sum(c["test_vs_baseline_p"] < 0.05 for c in got), len(got)),
                "holm": _rate(sum(c["test_vs_baseline_p_holm"] < 0.05 for c in got), len(got)),
                "mean_acc": round(statistics.fmean(c["test_acc"] for c in got), 3),
                "mean_baseline": round(statistics.fmean(c["test_baseline_acc"] for c in got), 3)}
        out["planted"] = {"cohorts": len(planted), "planted_cell": PLANTED_CELL,
                          "power_raw": per_cell[PLANTED_CELL]["raw"], "power_holm": per_cell[PLANTED_CELL]["holm"],
                          "per_cell": per_cell}
    out["seconds_per_cohort"] = round(statistics.fmean(r["seconds"] for r in rows), 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--null-seeds", type=_seeds, default=_seeds("1-20"), help="e.g. 1-20")
    p.add_argument("--planted-seeds", type=_seeds, default=_seeds("101-110"), help="e.g. 101-110")
    p.add_argument("--subjects", type=int, default=200, help="OAI participants per cohort")
    p.add_argument("--matrix", default="32x64", help="generated and stored image size, rows x cols")
    p.add_argument("--r-strength", type=float, default=0.6, help="planted leg strength ~ muscle area")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--full-training", action="store_true", help="train every layer (FULL_TRAINING), not the head")
    p.add_argument("--out", type=Path, default=Path("/tmp/calibration"))
    args = p.parse_args(argv)
    grid = {**GRID, "train": {**GRID["train"], **(FULL_TRAINING if args.full_training else {})}}
    matrix = tuple(int(v) for v in args.matrix.lower().split("x"))
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "cohorts.jsonl"
    done = {(r["null"], r["seed"]): r for r in map(json.loads, log.read_text().splitlines())} if log.exists() else {}
    todo = [(True, s) for s in args.null_seeds] + [(False, s) for s in args.planted_seeds]
    rows, t0, ran = [], time.perf_counter(), 0
    for i, (null, seed) in enumerate(todo, 1):
        if (null, seed) in done:
            rows.append(done[(null, seed)])
            continue
        row = run_cohort(seed, null=null, subjects=args.subjects, matrix=matrix, r_strength=args.r_strength,
                         out=args.out, threads=args.threads, grid=grid)
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
        ran += 1
        eta = (time.perf_counter() - t0) / ran * (len(todo) - i)
        called = [n.split("__")[1] + "/" + n.split("__")[2] for n, c in row["cells"].items() if c["test_vs_baseline_p"] < 0.05]
        print(f"[{i}/{len(todo)}] {'null' if null else 'planted'} seed {seed}: {row['seconds']:.0f} s, "
              f"p<0.05 in {called or 'no cell'}; ETA {eta / 60:.0f} min", flush=True)
    summary = summarize_runs(rows)
    print(json.dumps(summary, indent=2))
    (args.out / "results.json").write_text(json.dumps({"grid": grid, "args": {k: str(v) for k, v in vars(args).items()},
                                                       "summary": summary, "cohorts": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
