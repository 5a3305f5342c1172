"""Benchmark: what a launch costs beyond training (Ray + MLflow + checkpoints), and how busy
the CPUs stay over a grid.

    .venv/bin/python benchmarks/launch_overhead.py overhead --subjects 160 --trials 4
    .venv/bin/python benchmarks/launch_overhead.py busy --store data/demo/store.zarr   # the demo grid
    .venv/bin/python benchmarks/launch_overhead.py overhead --oai --cells 48 --trials 10   # issue 13's grid

Both run the real launch path (study/launch.py's main: local Ray, a real MLflow server in a
temporary home, Tune + Optuna, checkpoints), in this process.

overhead: cached fc-only trials (freeze fc, weights none, the seed's SGD and batch 8, 50
    epochs) on a synthetic store. Each trial logs time_compute_s (its epochs' training and
    validation compute, study.engine.fit's time_s) and time_trial_s (from entering run_trial
    to its end). Per-trial overhead = (trial phase wall x concurrent trials - sum of compute) /
    trials, where the trial phase runs from the launch run's start to the last trial's end:
    it charges worker start-up, imports, MLflow runs, store and feature reads, checkpoints and
    Tune's scheduling to the trials. Goal: <= 20% of the trial.
    --oai: the OAI-size store with a warm, prefilled feature cache (benchmarks/oai_cache.py:
    3,515 participants x 15 slices, 512 planted features per slice; no feature pass), and
    --cells N cells of the 4 measures x 3 sexes x 4 BMI strata grid (48 = all of it);
    --torch-head runs the trials on engine.fit instead of the compiled head trainer.
busy: the CPU time the whole machine spent busy (/proc/stat, all cores) over the launch of a
    grid (default ablations/demo.yaml), from Ray's start to the results table. Goal: >= 85%.
    Anything else running on the machine counts too: measure on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all cores since boot."""
    fields = [float(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


class BusySampler(threading.Thread):
    """Samples /proc/stat once a second; busy_fraction() over the sampled span."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float, float]] = []
        self._proc_cpu: dict[int, float] = {}
        self._proc_base: dict[int, float] = {}  # CPU a process had used before the launch
        self._proc_cmd: dict[int, str] = {}
        self._first = True
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append((time.time(), *cpu_times()))
            self._sample_processes()
            self._halt.wait(0.5)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.samples.append((time.time(), *cpu_times()))

    def cpu_by_process(self) -> dict[str, float]:
        """CPU seconds spent during the launch per kind of process (Ray trial workers, cell tasks,
        the MLflow server, Ray's daemons, this driver): each process's last sample of
        /proc/<pid>/stat minus what it had used before the first sample; a worker counts under
        the last title it had that says what it ran (Ray retitles workers ray::<what>)."""
        kinds: dict[str, float] = {}
        for pid, seconds in self._proc_cpu.items():
            kind = _kind(self._proc_cmd[pid])
            kinds[kind] = kinds.get(kind, 0.0) + seconds - self._proc_base.get(pid, 0.0)
        return {k: round(v, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}

    def top_processes(self, n: int = 8) -> list[str]:
        """The n processes that used the most CPU during the launch: "seconds  command"."""
        used = sorted(((self._proc_cpu[p] - self._proc_base.get(p, 0.0), self._proc_cmd[p]) for p in self._proc_cpu),
                      reverse=True)[:n]
        return [f"{sec:.1f}  {cmd[:100]}" for sec, cmd in used]

    def _sample_processes(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
            except OSError:
                continue
            pid, seconds = int(proc.name), (int(fields[11]) + int(fields[12])) / tick  # utime + stime
            if self._first:
                self._proc_base[pid] = seconds
            self._proc_cpu[pid] = max(seconds, self._proc_cpu.get(pid, 0.0))
            if pid not in self._proc_cmd or (cmd.strip() and "IDLE" not in cmd):  # an exited process has none
                self._proc_cmd[pid] = cmd
        self._first = False

    def busy_fraction(self, start: float | None = None, end: float | None = None) -> float:
        picked = [s for s in self.samples if (start is None or s[0] >= start) and (end is None or s[0] <= end)]
        (_, b0, t0), (_, b1, t1) = picked[0], picked[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else float("nan")


def _kind(cmd: str) -> str:
    """A process's kind from its command line (Ray sets worker titles to ray::<what they run>)."""
    if cmd.startswith("ray::"):
        what = cmd[5:].split()[0]
        return ("ray worker: trial" if "ImplicitFunc" in what or what.startswith("trial__") else
                "ray worker: cell task" if "run_cell_search" in what else
                # a task worker is reused: the shared run's process may close cells afterwards
                "ray worker: shared Tune run" if "run_shared_search" in what else
                "ray worker: idle or other" if what in ("IDLE", "") else f"ray worker: {what[:40]}")
    for needle, kind in (("mlflow", "mlflow server"), ("gunicorn", "mlflow server"), ("uvicorn", "mlflow server"),
                         ("raylet", "ray daemons"), ("gcs_server", "ray daemons"), ("dashboard", "ray daemons"),
                         ("log_monitor", "ray daemons"), ("monitor.py", "ray daemons"),
                         ("spawn_main", "mlflow server"),  # its uvicorn workers (the only spawned children here)
                         ("default_worker", "ray worker: starting"), ("launch_overhead", "driver (launch)")):
        if needle in cmd:
            return kind
    return "other"


def build_store(root: Path, subjects: int) -> Path:
    from data_prep.build_store import main as build_main
    from data_prep.synth import generate_cohort

    generate_cohort(root / "cohort", subjects=subjects, seed=11, matrix=(128, 256))
    (root / "salt").write_text("benchmark-salt-0123456789abcdef\n")
    store = root / "store.zarr"
    build_main(["--dicom", str(root / "cohort" / "oai" / "dicom"), "--tables", str(root / "cohort" / "oai" / "tables"),
                "--cohort", "oai", "--out", str(store), "--size", "64x128", "--salt-file", str(root / "salt")])
    return store


def run_launch(grid: dict, root: Path, url: str, cpus: int) -> tuple[str, BusySampler, float]:
    from study.launch import main as launch_main

    path = root / f"{grid['name']}.yaml"
    path.write_text(yaml.safe_dump(grid))
    sampler = BusySampler()
    sampler.start()
    t0 = time.time()
    rc = launch_main(["--grid", str(path), "--tracking-uri", url, "--num-cpus", str(cpus),
                      "--storage-path", str(root / "ray"), "--quiet", "--new"])
    wall = time.time() - t0
    sampler.stop()
    if rc != 0:
        raise SystemExit(f"the launch failed (exit {rc})")
    return grid["name"], sampler, wall


def overhead(args, root: Path, url: str) -> dict:
    from mlflow.tracking import MlflowClient

    if args.oai:
        from oai_cache import build

        store, _ = build(Path(args.oai_root), subjects=args.subjects)
        axes = [(m, s, b) for b in ("all", "<25", "25-30", ">=30") for s in ("all", "female", "male")
                for m in ("leg_strength", "gait_speed_short", "gait_400m", "chair_stand")][:args.cells]
        cells = {"cohort": ["oai"], "measure": sorted({a[0] for a in axes}), "sex": sorted({a[1] for a in axes}),
                 "bmi": sorted({a[2] for a in axes})}
    else:
        store = Path(args.store) if args.store else build_store(root, args.subjects)
        cells = {"cohort": ["oai"], "measure": ["leg_strength", "gait_speed_short"]}
    grid = {"question": "What does a cached fc-only trial cost beyond its training?", "name": "bench_overhead",
            "store": str(store), "grid": cells,
            "search": {"lr": {"loguniform": [1e-4, 1e-2]}}, "trials_per_cell": args.trials,
            "optuna_startup_trials": args.trials,
            "configs_per_trial": args.configs_per_trial if args.configs_per_trial == "auto" else int(args.configs_per_trial),
            "shared_tune_run": {"auto": "auto", "true": True, "false": False}[args.shared_tune_run],
            "train": {"epochs": args.epochs, "batch_size": 8, "optimizer": "sgd", "momentum": 0.9,
                      "freeze": "fc", "weights": "none", "compiled_head": not args.torch_head},
            "split": {"val": 0.2, "test": 0.2, "seed": 0}, "resources_per_trial": {"cpu": 1, "gpu": 0}}
    name, sampler, wall = run_launch(grid, root, url, args.cpus)
    client = MlflowClient(url)
    exp = client.get_experiment_by_name(name)
    launch = client.search_runs([exp.experiment_id], "tags.run_type = 'launch'",
                                order_by=["attributes.start_time DESC"])[0]
    trials = [r for r in client.search_runs([exp.experiment_id], "tags.run_type = 'trial'", max_results=1000)
              if r.data.tags["mlflow.parentRunId"] != launch.info.run_id]
    compute = sum(t.data.metrics["time_compute_s"] for t in trials)
    phase = (max(t.info.end_time for t in trials) - launch.info.start_time) / 1000
    slots = min(args.cpus, len(trials))
    per_trial = (phase * slots - compute) / len(trials)
    mean_compute = compute / len(trials)
    cell_runs = client.search_runs([exp.experiment_id], "tags.run_type = 'cell'", max_results=1000)
    in_trial = sum(t.data.metrics["time_trial_s"] for t in trials)
    by_cell: dict[str, list] = {}
    for t in trials:
        by_cell.setdefault(t.data.tags["mlflow.parentRunId"], []).append(t)
    cell_start = {c.info.run_id: c.info.start_time for c in cell_runs}
    # a cell's first trial run created after its cell run: worker start, imports, Tune's first scheduling
    first_gap = [(min(t.info.start_time for t in ts) - cell_start[c]) / 1000 for c, ts in by_cell.items()]
    return {"mode": "overhead", "subjects": args.subjects, "cells": len(cell_runs), "trials": len(trials),
            "epochs": args.epochs, "trainer": "torch (engine.fit)" if args.torch_head else "compiled head",
            "configs_per_trial": args.configs_per_trial, "shared_tune_run": args.shared_tune_run,
            "tune_trials": len({t.data.tags.get("tune_trial_id") for t in trials}),
            "cpus": args.cpus, "launch_wall_s": round(wall, 1), "trial_phase_wall_s": round(phase, 1),
            "compute_per_trial_s": round(mean_compute, 2),
            "setup_per_trial_s": round(sum(t.data.metrics["time_setup_s"] for t in trials) / len(trials), 2),
            "overhead_per_trial_s": round(per_trial, 2),
            # inside run_trial beyond its compute (setup, MLflow, checkpoint) vs outside it (Tune, workers)
            "in_trial_overhead_per_trial_s": round((in_trial - compute) / len(trials), 2),
            "outside_trial_per_trial_s": round((phase * slots - in_trial) / len(trials), 2),
            "cell_to_first_trial_s": round(sum(first_gap) / len(first_gap), 1),
            "build_per_trial_s": mean_metric(trials, "time_build_s"),
            # a worker's age at its first trial: process start, imports (one worker per cell and slot)
            "worker_start_s": mean_metric(first_of_workers(trials), "time_worker_age_s"),
            "workers": len(first_of_workers(trials)),
            **{f"cell_{k}": mean_metric(cell_runs, k) for k in ("time_test_eval_s", "time_size_saliency_s",
                                                                "time_log_model_s")},
            "overhead_fraction": round(per_trial / (per_trial + mean_compute), 3),
            **tune_trial_waits(trials),
            "cpu_s_by_process": sampler.cpu_by_process(), "top_processes": sampler.top_processes(),
            "busy_fraction": round(sampler.busy_fraction(), 3)}


def pair_trainers(old_epochs: int, epochs: int) -> dict:
    """One trial's training at OAI size in this process, one thread, old vs new trainer, beside
    the physical floor measured now (benchmarks/head_trainer.py, hardware_floor.py): the same
    synthetic features (3,515 x 15 x 512, 70/15 subject split), SGD at the seed's settings.
    The old trainer (engine.fit) runs old_epochs and is extrapolated to `epochs`."""
    import torch

    import head_trainer as hb
    from hardware_floor import floor, machine_limits

    torch.set_num_threads(1)
    data = hb.make_features(3515, 15)
    parts = {name: (np.ascontiguousarray(data["feats"][data["part"] == code]), data["labels"][data["part"] == code],
                    data["rows"][data["part"] == code]) for name, code in (("train", 0), ("val", 1))}
    old = hb.run_old(parts, "sgd", old_epochs, check=False)
    new = hb.run_head_trainer(parts, "sgd", 1, epochs, 1, "float32")
    cell = hb.run_head_trainer(parts, "sgd", 10, epochs, 1, "float32")  # a cell's 10 in one pass
    fl = floor(parts["train"][0].shape[0], parts["val"][0].shape[0], epochs, machine_limits(data["feats"]))
    return {"old_trainer_cpu_s_per_trial": round(old["cpu_s"] * epochs / old_epochs, 1),
            "old_trainer_wall_s_per_trial": round(old["wall_s"] * epochs / old_epochs, 1),
            "new_trainer_cpu_s_per_trial": round(new["cpu_s"], 2), "new_trainer_wall_s_per_trial": round(new["wall_s"], 2),
            "new_trainer_k10_cpu_s_per_config": round(cell["cpu_s"] / 10, 3),
            "floor_shuffled_read_s": round(fl["read_floor_shuffled_s"], 2), "floor_flop_s": round(fl["flop_floor_s"], 3),
            "floor_k10_per_config_s": round(fl["read_floor_shuffled_s"] / 10 + fl["flop_floor_s"], 3)}


def tune_trial_waits(trials) -> dict:
    """Per Tune trial, what its worker spent before it against the trial itself. A trial's span:
    its configuration runs' first start to last end (the trainable from its MLflow runs' creation
    to its report and checkpoint). Its wait: for a worker's first trial the worker's age when the
    trial entered (process start, imports: `time_worker_age_s`), else the gap since the worker's
    previous trial ended (Tune's scheduling, result and checkpoint handling, actor reset)."""
    spans: dict[str, dict] = {}
    for t in trials:
        s = spans.setdefault(t.data.tags.get("tune_trial_id") or t.info.run_id, {
            "worker": (t.data.tags.get("node_id"), t.data.tags.get("worker_pid")), "start": t.info.start_time,
            "end": t.info.end_time or t.info.start_time, "age": t.data.metrics.get("time_worker_age_s", 0.0)})
        s["start"], s["end"] = min(s["start"], t.info.start_time), max(s["end"], t.info.end_time or 0)
    by_worker: dict[tuple, list] = {}
    for s in spans.values():
        by_worker.setdefault(s["worker"], []).append(s)
    first, gaps = [], []
    for ss in by_worker.values():
        ss.sort(key=lambda s: s["start"])
        first.append(ss[0]["age"])
        gaps += [(b["start"] - a["end"]) / 1000 for a, b in zip(ss, ss[1:])]
    span = sum((s["end"] - s["start"]) / 1000 for s in spans.values())
    return {"tune_trial_span_s": round(span / len(spans), 2),
            "wait_first_trial_of_worker_s": round(sum(first) / len(first), 2),
            "wait_between_trials_s": round(sum(gaps) / len(gaps), 3) if gaps else None,
            "scheduling_overhead_vs_trial_time": round((sum(first) + sum(gaps)) / span, 3),
            "scheduling_overhead_reused_workers_vs_trial_time": round(sum(gaps) / span, 3) if gaps else None}


def mean_metric(runs, key: str) -> float | None:
    values = [r.data.metrics[key] for r in runs if key in r.data.metrics]
    return round(sum(values) / len(values), 2) if values else None


def first_of_workers(trials) -> list:
    """Each worker process's first trial (workers by node and pid)."""
    first: dict[tuple, object] = {}
    for t in sorted(trials, key=lambda t: t.info.start_time):
        first.setdefault((t.data.tags.get("node_id"), t.data.tags.get("worker_pid")), t)
    return list(first.values())


def busy(args, root: Path, url: str) -> dict:
    from study.config import load_grid

    grid_path = Path(args.grid)
    raw = yaml.safe_load(grid_path.read_text())
    raw["name"] = "bench_busy"
    if args.store:
        raw["store"] = args.store
    load_grid(grid_path)  # the shipped grid must parse as it is
    name, sampler, wall = run_launch(raw, root, url, args.cpus)
    return {"mode": "busy", "grid": str(grid_path), "store": raw["store"], "cpus": args.cpus,
            "launch_wall_s": round(wall, 1), "busy_fraction": round(sampler.busy_fraction(), 3)}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=("overhead", "busy"))
    p.add_argument("--store", default=None, help="an existing store (default: build a synthetic one)")
    p.add_argument("--subjects", type=int, default=None,
                   help="synthetic OAI participants (overhead; default 160, with --oai 3515)")
    p.add_argument("--trials", type=int, default=4, help="trials per cell (overhead; 2 cells)")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--grid", default=str(REPO / "ablations" / "demo.yaml"), help="grid to run (busy)")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--oai", action="store_true", help="OAI-size store with a prefilled feature cache (overhead)")
    p.add_argument("--oai-root", default="/tmp/bench_oai", help="where --oai builds (and reuses) its store")
    p.add_argument("--cells", type=int, default=48, help="cells of the OAI grid (--oai)")
    p.add_argument("--torch-head", action="store_true", help="trials on engine.fit, not the compiled head")
    p.add_argument("--configs-per-trial", default="auto",
                   help="the grid's configs_per_trial (auto: a cell's 10 in one Tune trial; 1: unbatched)")
    p.add_argument("--shared-tune-run", default="auto", choices=("auto", "true", "false"),
                   help="the grid's shared_tune_run (auto: the cells share one Tune run when they batch)")
    p.add_argument("--pair-trainers", action="store_true",
                   help="after the launch, time one trial's training old (engine.fit) vs new and the floor (overhead)")
    p.add_argument("--old-epochs", type=int, default=2, help="epochs the old trainer runs (extrapolated)")
    return p


def main(argv: list[str] | None = None) -> dict:
    from mlflow_server import server

    args = get_args_parser().parse_args(argv)
    args.subjects = args.subjects or (3515 if args.oai else 160)
    with tempfile.TemporaryDirectory(prefix="bench_launch_", dir="/tmp") as tmp:
        root = Path(tmp)
        info = server.start(root / "mlflow", port=server.free_port(), timeout=120)
        try:
            out = (overhead if args.mode == "overhead" else busy)(args, root, info.url)
        finally:
            server.stop(root / "mlflow")
    out["load_avg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    if args.mode == "overhead" and args.pair_trainers:
        out.update(pair_trainers(args.old_epochs, args.epochs))
        out["load_avg_after_trainers"] = Path("/proc/loadavg").read_text().split()[:3]
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
