"""Benchmark: a cell's closing work after its search, part by part, at OAI size.

    python benchmarks/cell_closing.py --repeat 2                       # this checkout
    python benchmarks/cell_closing.py --repos /work/main . --repeat 2  # paired: alternates checkouts

What finish_cell (study/evaluation.py) and the search's end (study/search.py) do once a cell's
trials are done, each called directly on the OAI-size store of benchmarks/oai_cache.py with a
real MLflow server: the size+age baseline (thigh areas + logistic fit + paired tests), the
saliency overlays, the ROC / confusion figures, the journal artifact, Optuna's figures of a
10-trial study, and the pyfunc model. Each checkout runs in its own process (a cell task's
process: the first call pays its imports, the second is what a reused process pays); with
several --repos the processes alternate, so old and new code see the same machine load.
The feature cache root ($THIGHMRI_FEATURE_CACHE, where the areas table lives) is emptied at
the start: the first process of a checkout that caches pays the measurement once.
Prints seconds per part, per checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ("size_metrics", "saliency_metrics", "log_figures", "log_journals", "log_study_figures", "log_cell_model")


def _journal(path: Path, name: str, n_trials: int = 10) -> None:
    """A finished Optuna study like a cell's search (lr, weight_decay searched)."""
    import optuna

    from study.optuna_journal import journal_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=journal_storage(path), direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(lambda t: 0.5 + 0.1 * t.suggest_float("lr", 1e-4, 1e-1, log=True)
                   - t.suggest_float("weight_decay", 0.0, 1e-3), n_trials=n_trials)


def worker(args: argparse.Namespace) -> dict:
    """One cell task's closing work, twice, in the checkout on sys.path[0]."""
    sys.path.insert(0, str(Path(args.repo).resolve()))
    import numpy as np
    import torch
    from mlflow.tracking import MlflowClient

    import study
    from data_prep.store import open_store
    from study import data, evaluation, figures, tracking, trainable
    from study.config import Cell, TrainConfig
    from study.optuna_journal import log_journals

    assert str(Path(study.__file__).resolve()).startswith(str(Path(args.repo).resolve())), study.__file__
    torch.set_num_threads(1)
    store = open_store(args.store)
    rows = data.stratum_rows(store.subjects, cohort="oai", measure="leg_strength")
    threshold = data.function_threshold(store.subjects, measure="leg_strength", rows=rows)
    labels = data.high_function_labels(store.subjects["leg_strength"].to_numpy()[rows], direction="higher",
                                       threshold=threshold)
    split = data.split_subjects(rows, labels, val=0.15, test=0.15, seed=0)
    part_labels = {k: labels[np.searchsorted(rows, v)] for k, v in split.items()}
    train = TrainConfig(freeze="fc", weights="none", epochs=50, batch_size=8, optimizer="sgd", momentum=0.9, lr=1e-3)
    client = MlflowClient(args.url)
    exp = tracking.get_or_create_experiment(client, "cell_closing")
    model = trainable._initial_model(train)
    probs = np.random.default_rng(0).random(split["test"].size)
    predictions = {"rows": split["test"], "labels": part_labels["test"], "probs": probs}
    times: dict[str, list[float]] = {p: [] for p in PARTS}
    for rep in range(2):
        run_id = tracking.create_run(client, exp, name=f"{Path(args.repo).name}-{rep}", run_type="cell")
        ctx = trainable.CellContext(
            cell=Cell(cohort="oai", measure="leg_strength"), store=str(args.store), store_hash=store.content_hash,
            train=train, split=split, labels=part_labels, threshold=threshold, threshold_rule="cohort",
            direction="higher", tracking_uri=args.url, experiment_id=exp, cell_run_id=run_id,
            cpus_per_trial=1, gpus_per_trial=0)

        def timed(name, fn):
            t = time.perf_counter()
            out = fn()
            times[name].append(round(time.perf_counter() - t, 3))
            return out

        size = timed("size_metrics", lambda: evaluation.size_metrics(ctx, client, predictions))
        timed("saliency_metrics", lambda: evaluation.saliency_metrics(ctx, client, model, train, predictions))
        timed("log_figures", lambda: evaluation.log_figures(client, run_id, predictions, "test"))
        journals = [(args.study, Path(args.journal))]
        timed("log_journals", lambda: log_journals(client, run_id, journals))
        timed("log_study_figures", lambda: figures.log_study_figures(client, run_id, journals))
        summary = {"best_val_acc": 0.6, "best_val_loss": 0.7, "best_epoch": 3, "n_trials": 10,
                   **{k: v for k, v in size.items() if not k.startswith("_")}}
        timed("log_cell_model", lambda: evaluation.log_cell_model(ctx, model, {"train": train, "epoch": 3}, summary))
        client.set_terminated(run_id)
        times.setdefault("size_age_test_auroc", []).append(size["size_age_test_auroc"])  # same number old/new
    return times


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--oai-root", default="/tmp/bench_oai", help="where benchmarks/oai_cache.py builds its store")
    p.add_argument("--repos", nargs="+", default=[str(REPO)], help="checkouts to time, alternated")
    p.add_argument("--repeat", type=int, default=2, help="processes per checkout")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--repo", "--store", "--url", "--journal", "--study"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return {}

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "benchmarks"))
    from mlflow_server import server
    from oai_cache import build

    store_path, _ = build(Path(args.oai_root))
    out: dict = {"parts_s": {r: {} for r in args.repos}}
    with tempfile.TemporaryDirectory(prefix="cell_closing_", dir="/tmp") as tmp:
        cache = Path(tmp) / "feature_cache"
        _journal(Path(tmp) / "study.journal.log", "oai__leg_strength")
        info = server.start(Path(tmp) / "mlflow", port=server.free_port(), timeout=120)
        try:
            for rep in range(args.repeat):
                for repo in args.repos:
                    env = {**os.environ, "THIGHMRI_FEATURE_CACHE": str(cache), "PYTHONPATH": str(Path(repo).resolve())}
                    proc = subprocess.run(
                        [sys.executable, __file__, "--worker", "--repo", repo, "--store", str(store_path),
                         "--url", info.url, "--journal", str(Path(tmp) / "study.journal.log"),
                         "--study", "oai__leg_strength"], env=env, capture_output=True, text=True, check=False)
                    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                    if proc.returncode or not line:
                        raise RuntimeError(f"{repo}: worker failed:\n{proc.stderr[-3000:]}")
                    for part, values in json.loads(line[0][7:]).items():
                        out["parts_s"][repo].setdefault(part, []).append(values)
        finally:
            server.stop(Path(tmp) / "mlflow")
        shutil.rmtree(cache, ignore_errors=True)
    out["load_avg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    print(json.dumps(out, indent=1))
    print("part: " + " | ".join(f"{r} first call, then reused process (median s)" for r in args.repos))
    for part in (*PARTS, "total"):
        cells = []
        for r in args.repos:
            per = out["parts_s"][r]
            runs = per[part] if part != "total" else [[sum(per[q][i][c] for q in PARTS) for c in range(2)]
                                                      for i in range(len(per[PARTS[0]]))]
            cells.append(" / ".join(f"{sorted(v[c] for v in runs)[len(runs) // 2]:.2f}" for c in range(2)))
        print(f"{part}: " + " | ".join(cells))
    return out


if __name__ == "__main__":
    main()
