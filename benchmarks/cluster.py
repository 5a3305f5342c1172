"""Benchmark: the same grid on 1 Ray node vs 2 (trials per hour), and a trial's overhead when
the store and Tune's storage are on object storage vs local paths.

    .venv/bin/python benchmarks/cluster.py nodes --repeats 2     # 1 node x 2 CPUs vs 2 nodes x 1 CPU
    .venv/bin/python benchmarks/cluster.py s3 --repeats 2        # local store + storage vs s3:// (moto)

Both run study/launch.py as a separate process (as a user would) against a real MLflow
server in a temporary home, on a synthetic store (tests/study/conftest.py's shape: 60 OAI +
~30 SOMMA participants, 32x64), and alternate the two settings `--repeats` times so that the
machine's load hits both alike.

nodes: real `ray start` clusters on this machine (tests/study/cluster_helpers.py): one head
    with 2 CPUs, or a head and a worker node with 1 CPU each; the same CPUs, so this shows
    what scheduling over two nodes costs, not a speed-up. Trials per hour = trials / (last
    trial end - first trial start), from the trial runs in MLflow.
s3: a local Ray with 2 CPUs; the store either the local folder or its copy on moto's S3
    server (uploaded and verified once), Tune's storage_path either a local folder or an
    s3:// prefix, each S3 launch with an empty node-local store cache (cold: every trial's
    first read of a participant goes to the server). Per-trial overhead = time_trial_s -
    time_compute_s of each trial run (store open and reads, model build, MLflow, checkpoints
    and their upload), averaged over the launch's trials.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "study"))


def build_store(root: Path) -> Path:
    from data_prep.build_store import main as build_main
    from data_prep.synth import generate_cohort

    generate_cohort(root / "cohort", subjects=60, seed=3, matrix=(64, 128))
    (root / "salt").write_text("benchmark-salt-0123456789abcdef\n")
    store = root / "store.zarr"
    for name in ("oai", "somma"):
        build_main(["--dicom", str(root / "cohort" / name / "dicom"), "--tables", str(root / "cohort" / name / "tables"),
                    "--cohort", name, "--out", str(store), "--size", "32x64", "--salt-file", str(root / "salt")]
                   + (["--append"] if name == "somma" else []))
    return store


def grid(name: str, store: str, args) -> dict:
    return {"question": "How fast does a cluster run the same grid?", "name": name, "store": store,
            "grid": {"cohort": ["oai", "somma"], "measure": ["leg_strength"]},
            "search": {"lr": {"loguniform": [1e-3, 1e-2]}}, "trials_per_cell": args.trials,
            "optuna_startup_trials": 1, "max_concurrent_per_cell": 2, "min_test_per_class": 1,
            "train": {"epochs": args.epochs, "batch_size": 16, "optimizer": "adamw", "weights": "none",
                      "freeze": "none", "slices_per_subject": 5},
            "split": {"val": 0.25, "test": 0.25, "seed": 0}}


def launch(root: Path, g: dict, url: str, extra: list[str], env: dict[str, str]) -> float:
    """Run study/launch.py on grid `g`; its wall time (exits on failure with the log's tail)."""
    path = root / f"{g['name']}.yaml"
    path.write_text(yaml.safe_dump(g))
    log = root / f"{g['name']}.log"
    t0 = time.time()
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, "study/launch.py", "--grid", str(path), "--tracking-uri", url,
                             "--quiet", *extra], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(REPO), **env}).returncode
    if rc != 0:
        raise SystemExit(f"launch {g['name']} failed (exit {rc}):\n{log.read_text()[-3000:]}")
    return time.time() - t0


def trial_runs(url: str, name: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], "tags.run_type = 'trial'", max_results=1000)
    if not runs or any(r.info.status != "FINISHED" for r in runs):
        raise SystemExit(f"{name}: trials did not all finish")
    return runs


def nodes(args, root: Path, store: Path, url: str) -> dict:
    from cluster_helpers import LocalRayCluster, NodeSpec

    layouts = {"1 node x 2 CPUs": [NodeSpec("head", cpus=2)],
               "2 nodes x 1 CPU": [NodeSpec("head", cpus=1), NodeSpec("node2", cpus=1)]}
    out: dict[str, list] = {k: [] for k in layouts}
    for rep in range(args.repeats):
        for i, (what, specs) in enumerate(layouts.items()):
            name = f"nodes_{i}_{rep}"
            for s in specs:  # a cold, node-local feature cache per node and launch
                s.env = {"THIGHMRI_FEATURE_CACHE": str(root / name / f"features_{s.label}")}
            with LocalRayCluster(root / f"r{i}{rep}", specs) as cluster:
                wall = launch(root, grid(name, str(store), args), url,
                              ["--ray-address", cluster.address, "--storage-path", str(root / name / "tune")],
                              cluster.env)
            runs = trial_runs(url, name)
            span = (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 1000
            out[what].append({"trials": len(runs), "trial_span_s": round(span, 1), "launch_wall_s": round(wall, 1),
                              "trials_per_hour": round(len(runs) / span * 3600, 1),
                              "nodes_used": len({r.data.tags["node_id"] for r in runs})})
            print(what, out[what][-1], flush=True)
    return {"mode": "nodes", "runs": out,
            "median_trials_per_hour": {k: statistics.median(r["trials_per_hour"] for r in v) for k, v in out.items()}}


def s3(args, root: Path, store: Path, url: str) -> dict:
    from moto.server import ThreadedMotoServer

    from data_prep.store import upload_store
    from mlflow_server.server import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket="bench-thighmri")
        t0 = time.time()
        remote = "s3://bench-thighmri/store.zarr"
        problems = upload_store(store, remote, progress=False)
        upload_s = time.time() - t0
        if problems:
            raise SystemExit(f"upload failed verification: {problems}")
        settings = {"local store + local storage": (str(store), str(root / "tune")),
                    "s3 store + s3 storage": (remote, "s3://bench-thighmri/tune")}
        out: dict[str, list] = {k: [] for k in settings}
        for rep in range(args.repeats):
            for i, (what, (where, storage)) in enumerate(settings.items()):
                name = f"s3_{i}_{rep}"
                cache = {"THIGHMRI_STORE_CACHE": str(root / name / "store_cache"),
                         "THIGHMRI_FEATURE_CACHE": str(root / name / "features")}
                wall = launch(root, grid(name, where, args), url,
                              ["--num-cpus", "2", "--storage-path", storage], {**env, **cache})
                runs = trial_runs(url, name)
                over = [r.data.metrics["time_trial_s"] - r.data.metrics["time_compute_s"] for r in runs]
                setup = [r.data.metrics["time_setup_s"] for r in runs]
                out[what].append({"trials": len(runs), "launch_wall_s": round(wall, 1),
                                  "overhead_per_trial_s": round(statistics.mean(over), 2),
                                  "setup_per_trial_s": round(statistics.mean(setup), 2),
                                  "compute_per_trial_s": round(statistics.mean(
                                      r.data.metrics["time_compute_s"] for r in runs), 2)})
                print(what, out[what][-1], flush=True)
    finally:
        server.stop()
    med = {k: statistics.median(r["overhead_per_trial_s"] for r in v) for k, v in out.items()}
    return {"mode": "s3", "upload_and_verify_s": round(upload_s, 1), "runs": out, "median_overhead_per_trial_s": med,
            "s3_minus_local_per_trial_s": round(med["s3 store + s3 storage"] - med["local store + local storage"], 2)}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=("nodes", "s3"))
    p.add_argument("--repeats", type=int, default=2, help="alternations of the two settings")
    p.add_argument("--trials", type=int, default=4, help="trials per cell (2 cells)")
    p.add_argument("--epochs", type=int, default=3)
    return p


def main(argv: list[str] | None = None) -> dict:
    from mlflow_server import server

    args = get_args_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bcl", dir="/tmp") as tmp:  # short: Ray's socket paths
        root = Path(tmp)
        store = build_store(root / "data")
        info = server.start(root / "mlflow", port=server.free_port(), timeout=120)
        try:
            out = (nodes if args.mode == "nodes" else s3)(args, root, store, info.url)
        finally:
            server.stop(root / "mlflow")
    out["load_avg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
