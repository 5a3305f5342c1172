"""Benchmark: what each part of a cached fc-only trial costs at OAI size, in one process.

    python benchmarks/trial_parts.py --repeat 4            # the OAI store of benchmarks/oai_cache.py

The parts run_trial goes through, timed one by one (one thread, a real MLflow server in a
temporary home): open the store, build the initial model, hash the frozen prefix, read the
cached features of a cell's train + val slices (Zarr, and the per-process memo of a second
read), train 50 epochs with the compiled head, the trial's MLflow requests, and the checkpoint
payload. The first repeat includes a fresh process's one-off costs (numba kernels, first
reads); later repeats are what a reused worker pays per trial. Prints seconds per part.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--oai-root", default="/tmp/bench_oai", help="where benchmarks/oai_cache.py builds its store")
    p.add_argument("--repeat", type=int, default=4)
    args = p.parse_args(argv)

    import torch
    from mlflow.tracking import MlflowClient

    from data_prep.store import open_store
    from mlflow_server import server
    from oai_cache import build
    from study import feature_memo, features, tracking, trainable, trial_log
    from study.config import TrainConfig
    from study.head_fit import fit_head_like_engine
    from study.model import seed_everything
    from study.selection import epoch_key

    store_path, _ = build(Path(args.oai_root))
    times: dict[str, list[float]] = {}

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        times.setdefault(name, []).append(round(time.perf_counter() - t, 4))
        return out

    torch.set_num_threads(1)
    n = len(open_store(store_path).subjects)
    rows = np.random.default_rng(0).permutation(n)
    split = {"train": np.sort(rows[: int(0.6 * n)]), "val": np.sort(rows[int(0.6 * n): int(0.8 * n)])}
    labels = {k: (v % 2).astype(np.int64) for k, v in split.items()}
    train = TrainConfig(freeze="fc", weights="none", epochs=50, batch_size=8, optimizer="sgd", momentum=0.9, lr=1e-3)
    with tempfile.TemporaryDirectory(prefix="trial_parts_", dir="/tmp") as tmp:
        info = server.start(Path(tmp) / "mlflow", port=server.free_port(), timeout=120)
        try:
            client = MlflowClient(info.url)
            exp = tracking.get_or_create_experiment(client, "trial_parts")
            parent = tracking.create_run(client, exp, name="cell", run_type="cell")
            for rep in range(args.repeat):
                store = timed("open_store", lambda: open_store(store_path))
                seed_everything(train.seed)
                model = timed("initial model (build or copy)", lambda: trainable._initial_model(train))
                timed("weights_digest", lambda: features.weights_digest(model))
                feature_memo.clear()
                timed("features: Zarr read", lambda: features.feature_loaders(store, split, labels, train, model))
                loaders, head, _ = timed("features: memo", lambda: features.feature_loaders(store, split, labels,
                                                                                           train, model))
                res = timed("train 50 epochs (compiled head)", lambda: fit_head_like_engine(
                    head, loaders, train, select_key=epoch_key("balanced_acc")))
                rid = timed("mlflow: create run", lambda: tracking.create_run(
                    client, exp, name=f"t{rep}", run_type="trial", parent_run_id=parent, tags={"cell": "c"}))
                timed("mlflow: params + tags", lambda: trial_log.log_batch(
                    client, rid, params=dataclasses.asdict(train), tags={"trainer": "compiled"}))
                steps = {h["epoch"]: {k: v for k, v in h.items() if k != "epoch"} for h in res["history"]}
                timed("mlflow: 50 epochs + timings", lambda: trial_log.log_batch(
                    client, rid, steps=steps, metrics={"time_trial_s": 1.0}))
                timed("mlflow: end run", lambda: client.set_terminated(rid, "FINISHED"))
                timed("checkpoint payload", lambda: trainable._checkpoint(
                    train, rid, head, model, {"feature_cache": "used"}, res["state"]))
        finally:
            server.stop(Path(tmp) / "mlflow")
    out = {"parts_s": times, "load_avg_after": Path("/proc/loadavg").read_text().split()[:3]}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
