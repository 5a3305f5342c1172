"""Run a grid of strata, one Optuna search per cell, as Ray Tune trials logged to MLflow.

    python study/launch.py --grid ablations/demo.yaml
    python study/launch.py --grid ablations/bmi.yaml --ray-address auto --set train.epochs=20
    python study/launch.py --grid ablations/bmi.yaml --dry-run     # validate and show the cells

Without --ray-address (or RAY_ADDRESS) a local Ray starts; without --tracking-uri (or
MLFLOW_TRACKING_URI) the local MLflow server from mlflow_server/ starts (or is reused).
The grid file and the store are checked in full before Ray starts.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: make the repo's packages importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from study.config import GridConfig, GridError, load_grid, parse_override
from study.plan import CellPlan, PlanError, plan_cells
from study.report import format_table, plot_accuracy, results_table

REPO_ROOT = Path(__file__).resolve().parents[1]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", required=True, help="ablation YAML, e.g. ablations/demo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a grid setting, e.g. --set train.epochs=2 --set trials_per_cell=4")
    p.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster to join (default: start a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    p.add_argument("--tracking-uri", default=None, help="MLflow server (default: MLFLOW_TRACKING_URI or the local server)")
    p.add_argument("--storage-path", default=os.environ.get("THIGHMRI_RAY_STORAGE", str(REPO_ROOT / "runs" / "ray")),
                   help="Ray Tune results and checkpoints; must be shared (NFS, s3://) on a multi-node cluster")
    p.add_argument("--results", default=None, help="write the per-cell results table (CSV) here")
    p.add_argument("--dry-run", action="store_true", help="validate the grid and store, print the cells, run nothing")
    return p


def load_and_plan(grid_path: str, overrides: list[str]) -> tuple[GridConfig, object, list[CellPlan]]:
    """Everything that can fail on bad input, before any compute: grid, store, every cell's split."""
    from data_prep.store import open_store

    grid = load_grid(grid_path, dict(parse_override(o) for o in overrides))
    try:
        store = open_store(grid.store)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise GridError(f"{grid.source}: store {grid.store!r} cannot be opened: {exc}") from exc
    return grid, store, plan_cells(grid, store)


def print_plan(grid: GridConfig, store, plans: list[CellPlan]) -> None:
    print(f"question: {grid.question}")
    print(f"store: {grid.store} (content hash {store.content_hash.split(':')[-1][:12]}), {len(store.subjects)} subjects")
    print(f"{len(plans)} cell(s) x {grid.trials_per_cell} trials; search: "
          + ", ".join(f"{p.name}~{p.kind}{list(p.values)}" for p in grid.search))
    for plan in plans:
        c = plan.counts()
        print(f"  {plan.cell.name:<44} n={c['n']:<5} train/val/test={c['n_train']}/{c['n_val']}/{c['n_test']} "
              f"high in train={c['n_train_high']}  ({plan.threshold_rule}: {plan.threshold:.4g})")


def run_grid(grid: GridConfig, store, plans: list[CellPlan], *, tracking_uri: str, ray_address: str | None,
             num_cpus: int | None, storage_path: str) -> tuple[list[dict], dict[str, str]]:
    import ray
    from mlflow.tracking import MlflowClient

    from study import tracking
    from study.search import concurrency_per_cell, remote_cell_runner
    from study.trainable import CellContext

    client = MlflowClient(tracking_uri)
    exp_id = tracking.get_or_create_experiment(client, grid.name, grid.question)
    launch_name = f"{grid.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    parent = tracking.create_run(client, exp_id, name=launch_name, run_type="launch",
                                 tags={"question": grid.question, "grid_file": grid.source,
                                       "code_version": tracking.code_version(),
                                       "mlflow.note.content": grid.question})
    tracking.log_params(client, parent, {"store": grid.store, "store_hash": store.content_hash,
                                         "n_cells": len(plans), "trials_per_cell": grid.trials_per_cell,
                                         "threshold": grid.threshold, "recipe": json.dumps(store.recipe.to_dict())})
    tracking.log_json(client, parent, grid.to_dict(), "resolved_grid.json")
    status = "FAILED"
    try:
        if ray_address:
            ray.init(address=ray_address, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        res = ray.cluster_resources()
        max_conc = concurrency_per_cell(grid, len(plans), res.get("CPU", 1), res.get("GPU", 0))
        print(f"ray: {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs; up to {max_conc} trial(s) per cell at once")
        runner = remote_cell_runner()
        futures = []
        for plan in plans:
            cell_run = tracking.create_run(client, exp_id, name=plan.cell.name, run_type="cell",
                                           parent_run_id=parent, tags={"cell": plan.cell.name,
                                                                       "measure": plan.cell.measure,
                                                                       "cohort": plan.cell.cohort})
            tracking.log_params(client, cell_run, {**plan.cell.axes, "threshold": plan.threshold,
                                                   "threshold_rule": plan.threshold_rule,
                                                   "direction": plan.direction, "store_hash": store.content_hash,
                                                   "split_seed": grid.split.seed})
            tracking.log_metrics(client, cell_run, plan.counts())
            ctx = CellContext(cell=plan.cell, store=str(Path(grid.store).resolve()) if "://" not in grid.store else grid.store,
                              store_hash=store.content_hash, train=grid.train, split=plan.split, labels=plan.labels,
                              threshold=plan.threshold, threshold_rule=plan.threshold_rule, direction=plan.direction,
                              tracking_uri=tracking_uri, experiment_id=exp_id, cell_run_id=cell_run,
                              cpus_per_trial=grid.resources_per_trial.cpu, gpus_per_trial=grid.resources_per_trial.gpu,
                              protocol=grid.protocol)
            futures.append(runner.remote(ctx, grid, storage_path=storage_path, max_concurrent=max_conc))
        results = ray.get(futures)
        for plan, r in zip(plans, results):
            r.update({k: v for k, v in plan.counts().items() if k not in r})
        df = results_table(results)
        with tempfile.TemporaryDirectory() as tmp:
            df.to_csv(Path(tmp) / "cells.csv", index=False)
            (Path(tmp) / "cells.txt").write_text(format_table(df) + "\n")
            plot_accuracy(df, Path(tmp) / "accuracy_vs_baseline.png", grid.question)
            for name in ("cells.csv", "cells.txt", "accuracy_vs_baseline.png"):
                tracking.log_file(client, parent, Path(tmp) / name)
        n_ok = int((df["status"] == "ok").sum())
        tracking.log_metrics(client, parent, {"cells_ok": n_ok, "cells_failed": len(df) - n_ok})
        status = "FINISHED" if n_ok == len(df) else "FAILED"
        return results, {"experiment_id": exp_id, "parent_run_id": parent}
    finally:
        client.set_terminated(parent, status)
        if ray.is_initialized():
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        grid, store, plans = load_and_plan(args.grid, args.overrides)
    except (GridError, PlanError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_plan(grid, store, plans)
    if args.dry_run:
        return 0
    from study.tracking import resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # Ray workers inherit it
    # one "View run" line per cell and trial buries the results table; the launch prints
    # the launch run's UI link at the end (set this to false to get them back)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    t0 = time.time()
    results, ids = run_grid(grid, store, plans, tracking_uri=tracking_uri, ray_address=args.ray_address,
                            num_cpus=args.num_cpus, storage_path=args.storage_path)
    df = results_table(results)
    print()
    print(format_table(df))
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.results, index=False)
    # workflowType: MLflow 3's UI otherwise opens a fresh browser in its GenAI view
    print(f"\n{len(df)} cell(s) in {time.time() - t0:.0f} s. MLflow UI: {tracking_uri}/#/experiments/{ids['experiment_id']}"
          f"/runs/{ids['parent_run_id']}?workflowType=machine_learning")
    return 0 if (df["status"] == "ok").all() else 1


if __name__ == "__main__":
    raise SystemExit(main())
