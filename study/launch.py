"""Run a grid of strata, one Optuna search per cell, as Ray Tune trials logged to MLflow.

    python study/launch.py --grid ablations/demo.yaml
    python study/launch.py --grid ablations/bmi.yaml --ray-address auto --set train.epochs=20
    python study/launch.py --grid ablations/bmi.yaml --dry-run     # validate and show the cells
    python study/launch.py --grid ablations/bmi.yaml --resume      # continue the latest launch

Without --ray-address (or RAY_ADDRESS) a local Ray starts; without --tracking-uri (or
MLFLOW_TRACKING_URI) the local MLflow server from mlflow_server/ starts (or is reused).
The grid file and the store are checked in full before Ray starts, and the cluster (resources,
reachability of the store, storage and tracking server from every node, weights) before any
MLflow run is created. SIGINT/SIGTERM stop the launch gracefully and print the command that
resumes it; a killed launch resumes the same way (study/resume.py).

Exit codes: 0 every cell finished; 1 a cell failed; 2 bad input or a refused preflight;
128 + signal number when stopped by SIGINT (130) or SIGTERM (143).
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: make the repo's packages importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from study.config import GridConfig, GridError, load_grid, parse_override
from study.config_batches import configs_per_trial, shared_run_cells
from study.plan import CellPlan, PlanError, plan_cells
from study.launch_stats import close_statistics, format_pairs
from study.report import STRATA_PLOT, format_table, plot_accuracy, plot_strata, results_table

REPO_ROOT = Path(__file__).resolve().parents[1]
# what trials on other nodes must see of the driver's environment (a local Ray inherits it all)
# (S3: the endpoint and region, never the keys: each node has its own credentials or role)
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "TUNE_GLOBAL_CHECKPOINT_S", "THIGHMRI_FEATURE_CACHE",
                 "THIGHMRI_SOURCE_COMMIT", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", required=True, help="ablation YAML, e.g. ablations/demo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a grid setting, e.g. --set train.epochs=2 --set trials_per_cell=4")
    p.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster to join (default: start a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    p.add_argument("--num-gpus", type=int, default=None, help="GPUs for a local Ray (default: all it finds)")
    p.add_argument("--tracking-uri", default=None, help="MLflow server (default: MLFLOW_TRACKING_URI or the local server)")
    p.add_argument("--storage-path", default=os.environ.get("THIGHMRI_RAY_STORAGE", str(REPO_ROOT / "runs" / "ray")),
                   help="Ray Tune results and checkpoints (one folder per launch below it); must be shared "
                        "(NFS, s3://) on a multi-node cluster")
    p.add_argument("--results", default=None, help="write the per-cell results table (CSV) here")
    p.add_argument("--report-dir", default=os.environ.get("THIGHMRI_REPORT_DIR", str(REPO_ROOT / "runs" / "reports")),
                   help="the launch's HTML study report is written to <report-dir>/<launch run id>/report.html "
                        "(also logged on the launch run)")
    p.add_argument("--dry-run", action="store_true", help="validate the grid and store, print the cells, run nothing")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", nargs="?", const="latest", default=None, metavar="RUN_ID",
                        help="continue an unfinished launch: the latest of this grid and store, or RUN_ID")
    resume.add_argument("--new", action="store_true",
                        help="start a new launch even though the latest one is unfinished (its runs are marked KILLED)")
    p.add_argument("--max-cells", type=int, default=None, metavar="N",
                   help="cells running at once (default: enough to fill the cluster's trial slots, plus one; "
                        "each cell task is a process of about 1 GB)")
    p.add_argument("--quiet", action="store_true", help="no progress display (batch jobs); the results table only")
    return p


def load_and_plan(grid_path: str, overrides: list[str]) -> tuple[GridConfig, object, list[CellPlan]]:
    """Everything that can fail on bad input, before any compute: grid, store, every cell's split."""
    from data_prep.store import StoreError, open_store

    grid = load_grid(grid_path, dict(parse_override(o) for o in overrides))
    try:
        store = open_store(grid.store)  # a path, or a URL (s3://...) read through the node's store cache
    except (FileNotFoundError, ValueError, OSError, StoreError) as exc:
        raise GridError(f"{grid.source}: store {grid.store!r} cannot be opened: {exc}") from exc
    return grid, store, plan_cells(grid, store)


def print_plan(grid: GridConfig, store, plans: list[CellPlan]) -> None:
    print(f"question: {grid.question}")
    print(f"store: {grid.store} (content hash {store.content_hash.split(':')[-1][:12]}), {len(store.subjects)} subjects")
    print(f"{len(plans)} cell(s) x {grid.trials_per_cell} trials; search: "
          + ", ".join(f"{p.name}~{p.kind}{list(p.values)}" for p in grid.search))
    batched = {configs_per_trial(grid, plan.train) for plan in plans}
    if batched != {1}:
        print(f"configurations per Tune trial: {', '.join(map(str, sorted(batched)))} "
              f"(configs_per_trial: {grid.configs_per_trial}; fc heads on cached features train together)")
    shared = shared_run_cells(grid, plans)
    if shared:
        print(f"{len(shared)} cell(s) share one Tune run and its trial workers "
              f"(shared_tune_run: {grid.shared_tune_run})")
    for plan in plans:
        c = plan.counts()
        print(f"  {plan.cell.name:<44} n={c['n']:<5} train/val/test={c['n_train']}/{c['n_val']}/{c['n_test']} "
              f"high in train={c['n_train_high']}  ({plan.threshold_rule}: {plan.threshold:.4g})")


def resume_command(args) -> str:
    script = sys.argv[0] if sys.argv and sys.argv[0].endswith("launch.py") else "study/launch.py"
    parts = [sys.executable, script, "--grid", args.grid]
    for o in args.overrides:
        parts += ["--set", o]
    if args.tracking_uri:
        parts += ["--tracking-uri", args.tracking_uri]
    if args.ray_address:
        parts += ["--ray-address", args.ray_address]
    if args.num_cpus:
        parts += ["--num-cpus", str(args.num_cpus)]
    return " ".join(shlex.quote(p) for p in parts) + " --resume"


def ui_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    # workflowType: MLflow 3's UI otherwise opens a fresh browser in its GenAI view
    return f"{tracking_uri}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def open_launch(client, grid: GridConfig, store, plans: list[CellPlan], *, exp_id: str, storage_base: str,
                prior) -> tuple[str, str, dict[str, dict], list]:
    """Create the launch and cell runs (or reopen a resumed launch's); the cell contexts to run.

    Returns (launch run id, its storage path, rows of cells kept as finished, contexts to run).
    """
    from study import evaluation, resume, tracking
    from study.trainable import CellContext

    store_path = str(Path(grid.store).resolve()) if "://" not in grid.store else grid.store
    if prior is not None:
        launch_id, storage_path = prior.run_id, prior.storage_path
        resume.reopen(client, exp_id, prior)
        cell_runs = prior.cells
    else:
        launch_name = f"{grid.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        launch_id = tracking.create_run(client, exp_id, name=launch_name, run_type="launch",
                                        tags={"question": grid.question, "grid_file": grid.source,
                                              "grid_name": grid.name, "code_version": tracking.code_version(),
                                              "mlflow.note.content": grid.question, **resume.driver_tags()})
        storage_path = f"{storage_base.rstrip('/')}/{launch_id}"
        tracking.log_params(client, launch_id, {"store": grid.store, "store_hash": store.content_hash,
                                                "n_cells": len(plans), "trials_per_cell": grid.trials_per_cell,
                                                "threshold": grid.threshold, "storage_path": storage_path,
                                                "recipe": json.dumps(store.recipe.to_dict())})
        tracking.log_json(client, launch_id, grid.to_dict(), "resolved_grid.json")
        tracking.log_store_input(client, launch_id, store_path, store.content_hash)
        cell_runs = {}
    kept, contexts = {}, []
    for plan in plans:
        run = cell_runs.get(plan.cell.name)
        if run is not None and run.info.status == "FINISHED" and "model_uri" in run.data.tags:
            kept[plan.cell.name] = evaluation.row_from_run(run)
            continue
        if run is not None:
            cell_run = run.info.run_id
            tracking.reopen(client, cell_run)
        else:
            cell_run = tracking.create_run(client, exp_id, name=plan.cell.name, run_type="cell",
                                           parent_run_id=launch_id, tags={"cell": plan.cell.name,
                                                                          "measure": plan.cell.measure,
                                                                          "cohort": plan.cell.cohort})
            tracking.log_params(client, cell_run, {**plan.cell.axes, "threshold": plan.threshold,
                                                   "threshold_rule": plan.threshold_rule,
                                                   "direction": plan.direction, "store_hash": store.content_hash,
                                                   "split_seed": grid.split.seed})
            tracking.log_metrics(client, cell_run, plan.counts())
            tracking.log_store_input(client, cell_run, store_path, store.content_hash)
        contexts.append(CellContext(
            cell=plan.cell, store=store_path, store_hash=store.content_hash, train=plan.train or grid.train, split=plan.split,
            labels=plan.labels, threshold=plan.threshold, threshold_rule=plan.threshold_rule,
            direction=plan.direction, tracking_uri=client.tracking_uri, experiment_id=exp_id, cell_run_id=cell_run,
            cpus_per_trial=grid.resources_per_trial.cpu, gpus_per_trial=grid.resources_per_trial.gpu,
            protocol=plan.protocol, checkpoint_interval_s=grid.checkpoint_interval_s, select_on=grid.select_on,
            report_each_epoch=grid.scheduler != "none", outer_folds=tuple(plan.outer_folds)))
    return launch_id, storage_path, kept, contexts


def write_results(client, launch_id: str, grid: GridConfig, rows: list[dict], *, report=None):
    """The per-cell table and plots, logged on the launch run; returns the table.

    Args:
        report: keyword arguments of study.study_report.write_report but the table and figures
            (out_dir, experiment_id, tracking_uri, settings, pairs): the HTML report is written
            there and logged too (a failure is tagged `report_error` and printed, not raised).
    """
    from study import tracking

    df = results_table(rows, family_by=grid.multiplicity_family)
    with tempfile.TemporaryDirectory() as tmp:
        df.to_csv(Path(tmp) / "cells.csv", index=False)
        (Path(tmp) / "cells.txt").write_text(format_table(df) + "\n")
        plot_accuracy(df, Path(tmp) / "accuracy_vs_baseline.png", grid.question)
        plot_strata(df, Path(tmp) / STRATA_PLOT, grid.question)
        for name in ("cells.csv", "cells.txt", "accuracy_vs_baseline.png", STRATA_PLOT):
            tracking.log_file(client, launch_id, Path(tmp) / name)
        if report is not None:
            from study.study_report import write_report

            figures = {"Figure 3 per stratum: accuracy (95% CI) beside the majority-class and size+age baselines":
                       Path(tmp) / STRATA_PLOT,
                       "Every cell: test accuracy (95% CI), baselines, validation accuracy":
                       Path(tmp) / "accuracy_vs_baseline.png"}
            try:
                path = write_report(client, grid=grid, df=df, launch_id=launch_id, figures=figures, **report)
                tracking.log_file(client, launch_id, path)
                df.attrs["report_path"] = str(path)
            except Exception as exc:  # the table and plots above stand without it
                print(f"warning: the HTML report failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                client.set_tag(launch_id, "report_error", f"{type(exc).__name__}: {exc}"[:5000])
    n_ok = int((df["status"] == "ok").sum())
    tracking.log_metrics(client, launch_id, {"cells_ok": n_ok, "cells_failed": len(df) - n_ok})
    return df


def run_launch(args, grid: GridConfig, store, plans: list[CellPlan], tracking_uri: str) -> int:
    """Preflight, then create or resume the launch and run its cells; the exit code."""
    import ray
    from mlflow.tracking import MlflowClient

    from study import preflight, progress, resume, tracking
    from study.runner import cells_at_once, run_cells, trial_slots
    from study.search import concurrency_per_cell

    client = MlflowClient(tracking_uri)
    exp_id = tracking.get_or_create_experiment(client, grid.name, grid.question)
    prior = None
    try:
        if args.resume:
            prior = resume.select(client, exp_id, grid_dict=grid.to_dict(), store_hash=store.content_hash,
                                  which=args.resume)
        else:
            latest = resume.latest(client, exp_id, store.content_hash)
            if latest is not None and latest.status != "FINISHED" and not latest.alive() and not args.new:
                raise resume.ResumeError(f"{latest.describe()} is unfinished. Continue it with\n  {resume_command(args)}"
                                         "\nor start a new launch with --new (its unfinished runs are then marked KILLED)")
    except resume.ResumeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    storage_base = args.storage_path if prior is None else prior.storage_path.rsplit("/", 1)[0]
    try:
        if args.ray_address:
            # workers on other nodes do not inherit this process's environment; the job's does
            env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
            ray.init(address=args.ray_address, namespace=progress.NAMESPACE, log_to_driver=False,
                     runtime_env={"env_vars": env})
        else:
            ray.init(num_cpus=args.num_cpus, num_gpus=args.num_gpus, namespace=progress.NAMESPACE,
                     include_dashboard=False, log_to_driver=False)
        problems = preflight.check_cluster(grid, store_hash=store.content_hash, tracking_uri=tracking_uri,
                                           storage_path=storage_base)
        if problems:
            print(f"error: {grid.source}: {len(problems)} problem(s) with this cluster (nothing was started):\n  - "
                  + "\n  - ".join(problems), file=sys.stderr)
            return 2
        if prior is None:
            latest = resume.latest(client, exp_id, store.content_hash)
            if latest is not None and latest.status != "FINISHED" and not latest.alive():
                resume.retire(client, exp_id, latest)  # replaced: its leftovers are not left RUNNING
        t0 = time.time()
        launch_id, storage_path, kept, contexts = open_launch(client, grid, store, plans, exp_id=exp_id,
                                                              storage_base=storage_base, prior=prior)
        hub = progress.start_hub(launch_id)
        for ctx in contexts:
            ctx.progress_hub = progress.hub_name(launch_id)
        res = ray.cluster_resources()
        max_conc = concurrency_per_cell(grid, max(1, len(contexts)), res.get("CPU", 1), res.get("GPU", 0))
        max_cells = args.max_cells or cells_at_once(len(contexts), trial_slots(grid, res), max_conc)
        if not args.quiet:
            print(f"launch {'resumed' if prior else 'started'}: {ui_link(tracking_uri, exp_id, launch_id)}")
            print(f"ray: {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs; {len(contexts)} cell(s) to run"
                  + (f", {len(kept)} kept from before" if kept else "") + f"; up to {max_conc} trial(s) per cell and {max_cells} cell(s) at once",
                  flush=True)
        done_before = {c.cell.name: len(tracking.children(client, exp_id, c.cell_run_id, "attributes.status = 'FINISHED'"))
                       for c in contexts} if prior is not None else {}
        display = progress.Display([c.cell.name for c in contexts],
                                   trials={c.cell.name: grid.trials_per_cell * max(1, len(c.outer_folds))
                                           for c in contexts},
                                   epochs=grid.train.epochs, quiet=args.quiet, done_before=done_before)
        try:
            rows, signum = run_cells(contexts, grid, storage_path=storage_path, max_concurrent=max_conc,
                                     client=client, launch_run_id=launch_id, display=display, hub=hub,
                                     heartbeat=(lambda: resume.beat(client, launch_id), resume.HEARTBEAT_S),
                                     max_cells=max_cells)
        finally:
            display.close()
        rows = {**kept, **rows}
        ordered = [{**p.counts(), **rows[p.cell.name]} for p in plans if p.cell.name in rows]
        pairs = []
        try:
            ordered, pairs = close_statistics(client, launch_id, grid, plans, ordered)
        except Exception as exc:  # the cells' own results still stand; say what is missing
            print(f"warning: multiplicity / paired comparisons failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            client.set_tag(launch_id, "statistics_error", f"{type(exc).__name__}: {exc}"[:5000])
        settings = {"launch run": launch_id, "store": grid.store, "store content hash": store.content_hash,
                    "code version": tracking.code_version(), "storage path": storage_path,
                    "overrides (--set)": " ".join(args.overrides) or "none", "protocol": grid.protocol,
                    "selection metric": grid.select_on, "trials per cell": grid.trials_per_cell,
                    "configurations per Tune trial": ", ".join(
                        sorted({str(configs_per_trial(grid, p.train)) for p in plans})),
                    "cells sharing one Tune run (shared_tune_run)": len(shared_run_cells(grid, plans)),
                    "cells": len(plans), "epochs": grid.train.epochs, "weights": grid.train.weights}
        df = write_results(client, launch_id, grid, ordered, report={
            "out_dir": Path(args.report_dir) / launch_id, "experiment_id": exp_id, "tracking_uri": tracking_uri,
            "settings": settings, "pairs": pairs})
        if signum is not None:
            tracking.end_open_tree(client, exp_id, launch_id)
            client.set_terminated(launch_id, "KILLED")
        else:
            client.set_terminated(launch_id, "FINISHED" if (df["status"] == "ok").all() else "FAILED")
    finally:
        if ray.is_initialized():
            ray.shutdown()
    print()
    print(format_table(df))
    if pairs:
        print("\n" + format_pairs(pairs))
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.results, index=False)
    print(f"\n{len(df)} cell(s) in {time.time() - t0:.0f} s. MLflow UI: {ui_link(tracking_uri, exp_id, launch_id)}")
    if df.attrs.get("report_path"):
        print(f"report: {df.attrs['report_path']}")
    if signum is not None:
        unfinished = int((df["status"] != "ok").sum())
        print(f"stopped by {__import__('signal').Signals(signum).name}: {unfinished} cell(s) unfinished. "
              f"Resume with:\n  {resume_command(args)}", flush=True)
        return 128 + signum
    return 0 if (df["status"] == "ok").all() else 1


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        grid, store, plans = load_and_plan(args.grid, args.overrides)
    except (GridError, PlanError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet or args.dry_run:
        print_plan(grid, store, plans)
    if args.dry_run:
        return 0
    from study.tracking import COMMIT_ENV, code_version, resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # Ray workers inherit it
    os.environ.setdefault(COMMIT_ENV, code_version())  # every run's mlflow.source.git.commit
    # one "View run" line per cell and trial buries the results table; the launch prints
    # the launch run's UI link instead (set this to false to get them back)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # our display owns the terminal
    # Tune's experiment snapshot (trial states, searcher) every few seconds, not every 10+ s:
    # a driver killed without warning then loses at most that much bookkeeping on --resume
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    return run_launch(args, grid, store, plans, tracking_uri)


if __name__ == "__main__":
    raise SystemExit(main())
