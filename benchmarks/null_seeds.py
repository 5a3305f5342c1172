"""Is the demo's below-chance null result chance, or a systematic pull? Many null cohorts.

    python benchmarks/null_seeds.py --seeds 1 2 3 4 5 6 7 8 9 10 --out /tmp/null_seeds

For each seed: a synthetic cohort with no image effect (data_prep/synth.py --null: every
measure ignores the images) of demo size (160 OAI participants), its store, and the demo's
leg-strength cell trained with the demo's settings at a fixed learning rate (ablations/
demo.yaml: adamw, 10 epochs, 32x64 input, split val 0.2 / test 0.25; no search, so no
selection effect) through study.calibration.holdout_summary (same split, engine and
statistics as a launched cell). Prints test accuracy against the train-majority baseline per
seed, then the mean difference with its 95% CI over seeds and the pooled accuracy: a mean
difference whose CI excludes 0 is a systematic pull, not chance. Writes <out>/results.json.
Results go into benchmarks/README.md ("Null cohorts over seeds"). The multi-cell calibration
(false-positive rate per cell, after Holm per launch, power) is benchmarks/calibration.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GRID = {
    "question": "null calibration over seeds", "store": "unused",
    "grid": {"cohort": ["oai"], "measure": ["leg_strength"]},
    "search": {"lr": {"choice": [1e-3]}},
    "train": {"epochs": 10, "batch_size": 32, "optimizer": "adamw", "lr": 1e-3,
              "weight_decay": 1e-4, "freeze": "none", "weights": "none",
              "input_size": [32, 64], "seed": 0},
    "split": {"val": 0.2, "test": 0.25, "seed": 0},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(1, 11)))
    p.add_argument("--subjects", type=int, default=160, help="participants per cohort")
    p.add_argument("--planted", action="store_true",
                   help="the planted-effect cohorts instead (the same check's positive side)")
    p.add_argument("--out", type=Path, default=Path("/tmp/null_seeds"))
    args = p.parse_args(argv)
    from scipy import stats

    from study.calibration import build_synthetic_store, holdout_summary

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        folder = args.out / f"seed_{seed}"
        shutil.rmtree(folder, ignore_errors=True)
        store = build_synthetic_store(folder, subjects=args.subjects, seed=seed,
                                      null=not args.planted, matrix=(64, 128))
        s = holdout_summary(store, GRID)
        shutil.rmtree(folder, ignore_errors=True)
        row = {"seed": seed, "n_test": int(s["n"]), "acc": float(s["acc"]),
               "baseline": float(s["baseline_acc"]), "auroc": float(s["auroc"]),
               "vs_baseline_p": float(s["vs_baseline_p"]), "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    diffs = [r["acc"] - r["baseline"] for r in rows]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    sd = statistics.stdev(diffs) if n > 1 else float("nan")
    half = stats.t.ppf(0.975, n - 1) * sd / n ** 0.5 if n > 1 else float("nan")
    correct = sum(round(r["acc"] * r["n_test"]) for r in rows)
    total = sum(r["n_test"] for r in rows)
    summary = {
        "cohorts": "planted" if args.planted else "null", "seeds": n,
        "mean_acc": round(statistics.fmean(r["acc"] for r in rows), 3),
        "mean_baseline": round(statistics.fmean(r["baseline"] for r in rows), 3),
        "mean_acc_minus_baseline": round(mean, 3),
        "ci95": [round(mean - half, 3), round(mean + half, 3)],
        "below_baseline": sum(d < 0 for d in diffs), "above_baseline": sum(d > 0 for d in diffs),
        "pooled_acc": round(correct / total, 3), "pooled_n": total,
        "mean_auroc": round(statistics.fmean(r["auroc"] for r in rows), 3),
        "better_than_baseline_at_0.05": sum(r["vs_baseline_p"] < 0.05 for r in rows),
    }
    print(json.dumps(summary))
    (args.out / "results.json").write_text(json.dumps({"grid": GRID, "rows": rows,
                                                       "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
