"""Promotion in two recorded steps: register a cell's model as `candidate`, then, separately,
make a version `champion` with who, when and why.

    # step 1: the model of one cell of one launch on one store becomes the candidate
    python study/promote.py --experiment demo --measure leg_strength --store data/demo.zarr
        [--cohort oai | --cell oai__leg_strength__sex-female__bmi-lt25] [--launch RUN_ID]
    # step 2: a person decides; refused if the test result does not beat its baseline
    python study/promote.py --measure leg_strength --to champion 3 --reason "replicates on OAI" [--force]
    #   (VERSION may be an alias: `--to champion candidate` promotes what candidate points at now)

Step 1 looks in ONE experiment (the grid's name) at ONE launch (the latest one that ran on
the given store, or --launch), for ONE cell (default: the pooled cell of the cohort, sex and
BMI "all"; the cohort may be omitted when the launch has only one), on ONE store: the store's
content hash (--store opens it, or --store-hash) must be the launch's and the cell's, so a
model trained on another store (e.g. the synthetic demo store of the same cohort) is never a
candidate. The validation score the trials were selected on (`best_val_score`: the cell run's,
else the best of its trial runs', else `best_val_acc` of runs logged before it) is recorded,
never a test number. The version `thigh-<measure>` gets alias `candidate` and tags naming its
experiment, launch, cell, store hash, selection metric, who and when; its description is the
model card stored with the model (study/model_card.py).

Step 2 moves `champion` to a registered version only if its cell's own comparison with its
baseline says it beats it: the cell metric `test_vs_baseline_p_holm` (the exact McNemar test
against the majority predictor, Holm-adjusted over the launch's cells: the cell was one of
many tested) when the cell has it, else `test_vs_baseline_p`, else `test_perm_p` (runs logged
before either: a permutation p-value that is 1 when test accuracy does not exceed the
training-majority baseline `test_baseline_acc`), below --alpha (default 0.05), with
test_acc > test_baseline_acc. A cell that reported validation numbers (seed replication)
has no test and is refused too. --force overrides and is recorded. Tags: promoted_by,
promoted_at (UTC), promotion_reason, promotion_forced, the test used and its p-value, and the
version that was champion before.
"""

from __future__ import annotations

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import getpass
import math
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timezone

from study.config import MEASURES, Cell

SELECTION_METRICS = ("best_val_score", "best_val_acc")  # what trials were selected on, old runs last
# the cell's own test against its baseline, the launch-adjusted one first, older runs' last
BASELINE_TESTS = ("test_vs_baseline_p_holm", "test_vs_baseline_p", "test_perm_p")


class PromotionError(ValueError):
    """A selection or promotion refused; the message says why and what to do."""


def registered_name(measure: str) -> str:
    return f"thigh-{measure}"


def who() -> str:
    """The person promoting: the MLflow username when the server has auth, else the OS user."""
    return os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()


@dataclass
class Candidate:
    name: str
    version: str
    cell: str
    run_id: str
    launch_id: str
    selected_on: str
    val_score: float


def _launch(client, experiment_id: str, store_hash: str, launch: str | None):
    from study.resume import launch_runs

    if launch:
        run = client.get_run(launch)
        if run.info.experiment_id != experiment_id or run.data.tags.get("run_type") != "launch":
            raise PromotionError(f"--launch {launch} is not a launch run of this experiment")
        if run.data.params.get("store_hash") != store_hash:
            raise PromotionError(f"--launch {launch} ran on store {run.data.params.get('store_hash', '?')[:16]}, "
                                 f"not on the given store {store_hash[:16]}")
        return run
    runs = launch_runs(client, experiment_id, store_hash)
    if not runs:
        others = {r.data.params.get("store_hash", "?")[:16] for r in
                  client.search_runs([experiment_id], "tags.run_type = 'launch'", max_results=200)}
        raise PromotionError(f"no launch of this experiment ran on store {store_hash[:16]}; launches ran on "
                             f"stores {sorted(others) or 'none'}: a model from another store is never a candidate")
    return runs[0]


def _selection_score(client, experiment_id: str, cell_run) -> tuple[str, float]:
    """(metric, value) the cell's trial was selected on; never a test metric."""
    from study import tracking

    if "best_val_score" in cell_run.data.metrics:
        return "best_val_score", float(cell_run.data.metrics["best_val_score"])
    trials = tracking.children(client, experiment_id, cell_run.info.run_id, "tags.run_type = 'trial'")
    scores = [t.data.metrics["best_val_score"] for t in trials if "best_val_score" in t.data.metrics]
    if scores:
        return "best_val_score", float(max(scores))
    if "best_val_acc" in cell_run.data.metrics:
        return "best_val_acc", float(cell_run.data.metrics["best_val_acc"])
    raise PromotionError(f"cell run {cell_run.info.run_id} has no validation score")


def select_candidate(client, *, experiment: str, measure: str, store_hash: str, cohort: str | None = None,
                     cell: str | None = None, launch: str | None = None):
    """(cell run, launch run, selection metric, value) of the one cell asked for."""
    from study import tracking

    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise PromotionError(f"experiment {experiment!r} not found; experiments: {', '.join(names)}")
    launch_run = _launch(client, exp.experiment_id, store_hash, launch)
    cells = tracking.children(client, exp.experiment_id, launch_run.info.run_id, "tags.run_type = 'cell'")
    of_measure = [r for r in cells if r.data.params.get("measure") == measure]
    if cell is None:
        cohorts = sorted({r.data.params.get("cohort", "") for r in of_measure})
        if cohort is None:
            if len(cohorts) != 1:
                raise PromotionError(f"launch {launch_run.info.run_name} has {measure} cells of cohorts {cohorts}; "
                                     "pass --cohort or --cell")
            cohort = cohorts[0]
        cell = Cell(cohort=cohort, measure=measure).name  # the pooled cell: sex and BMI "all"
    found = [r for r in of_measure if r.data.tags.get("cell") == cell]
    if not found:
        names = sorted(r.data.tags.get("cell", "?") for r in of_measure)
        raise PromotionError(f"launch {launch_run.info.run_name} has no {measure} cell {cell!r}; its cells: {names}")
    run = found[0]
    if run.data.params.get("store_hash") != store_hash:
        raise PromotionError(f"cell {cell} ran on store {run.data.params.get('store_hash', '?')[:16]}, not "
                             f"{store_hash[:16]}")
    if run.info.status != "FINISHED" or "model_uri" not in run.data.tags:
        raise PromotionError(f"cell {cell} of launch {launch_run.info.run_name} has not finished with a model "
                             f"(status {run.info.status}); resume the launch first")
    metric, value = _selection_score(client, exp.experiment_id, run)
    return run, launch_run, metric, value


def register_candidate(client, *, experiment: str, measure: str, store_hash: str, cohort: str | None = None,
                       cell: str | None = None, launch: str | None = None) -> Candidate:
    """Step 1: register the cell's model and point `candidate` at it (tags record the choice)."""
    import mlflow

    if measure not in MEASURES:
        raise PromotionError(f"unknown measure {measure!r}; allowed: {', '.join(MEASURES)}")
    run, launch_run, metric, value = select_candidate(client, experiment=experiment, measure=measure,
                                                      store_hash=store_hash, cohort=cohort, cell=cell, launch=launch)
    name = registered_name(measure)
    tags = {"cell": run.data.tags["cell"], "source_run_id": run.info.run_id, "experiment": experiment,
            "launch_run_id": launch_run.info.run_id, "store_hash": store_hash, "selected_by": metric,
            "selection_value": f"{value:.4f}", "reported_partition": run.data.tags.get("reported_partition", "test"),
            "candidate_by": who(), "candidate_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    version = mlflow.register_model(run.data.tags["model_uri"], name, tags=tags)
    card = model_card(client, run.data.tags["model_uri"])
    client.update_model_version(name, version.version, description=card or (
        "No model card: this model was logged before study/model_package.py stored one."))
    client.update_registered_model(name, description=(
        f"ResNet18 classifying high vs low {measure} from axial mid-thigh MRI (research only, not a medical "
        "device). Each version's description is its model card. `candidate`: chosen by study/promote.py on "
        "validation; `champion`: promoted by a person with a recorded reason, what study/predict.py uses."))
    client.set_registered_model_alias(name, "candidate", version.version)
    return Candidate(name=name, version=str(version.version), cell=tags["cell"], run_id=run.info.run_id,
                     launch_id=launch_run.info.run_id, selected_on=metric, val_score=value)


def model_card(client, model_uri: str) -> str | None:
    """The Markdown card stored with a logged model (study/model_package.py), or None."""
    import tempfile
    from pathlib import Path

    import mlflow

    from study.model_package import CARD_FILE

    try:
        location = client.get_logged_model(model_uri.rstrip("/").rsplit("/", 1)[-1]).artifact_location
        with tempfile.TemporaryDirectory(prefix="thigh-card-") as tmp:
            path = mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/artifacts/{CARD_FILE}", dst_path=tmp)
            return Path(path).read_text()
    except Exception:  # noqa: BLE001 - a model logged before cards, or not a logged model
        return None


def baseline_verdict(metrics: dict[str, float], partition: str, alpha: float) -> tuple[bool, str, str, float]:
    """(beats, why, test used, p) from a cell's metrics: its own test against its baseline."""
    if partition != "test":
        return False, f"the cell reported {partition} numbers (seed replication): no test to beat a baseline", "", math.nan
    used = next((t for t in BASELINE_TESTS if t in metrics), None)
    if used is None or "test_acc" not in metrics or "test_baseline_acc" not in metrics:
        return False, "the cell has no test-versus-baseline result", "", math.nan
    p, acc, base = metrics[used], metrics["test_acc"], metrics["test_baseline_acc"]
    beats = acc > base and p < alpha
    why = (f"test acc {acc:.3f} vs training-majority baseline {base:.3f}, {used} = {p:.3g} "
           f"({'<' if p < alpha else '>='} alpha {alpha})")
    return beats, why, used, float(p)


def promote_champion(client, *, measure: str, version: str, reason: str, force: bool = False,
                     alpha: float = 0.05) -> dict[str, str]:
    """Step 2: move `champion` to `version` with who/when/why tags; PromotionError if refused."""
    name = registered_name(measure)
    if not reason.strip():
        raise PromotionError("--reason is required: say why this version becomes the champion")
    if not str(version).isdigit():  # an alias, e.g. "candidate": the version it points at now
        try:
            version = client.get_model_version_by_alias(name, str(version)).version
        except Exception as exc:  # noqa: BLE001
            raise PromotionError(f"{name} has no alias {version!r} ({type(exc).__name__})") from None
    try:
        mv = client.get_model_version(name, str(version))
    except Exception as exc:  # noqa: BLE001 - mlflow raises RestException / MlflowException
        raise PromotionError(f"{name} has no version {version} ({type(exc).__name__})") from None
    source = mv.tags.get("source_run_id")
    if not source:
        raise PromotionError(f"{name} version {version} was not registered by promote.py step 1 (no source_run_id)")
    run = client.get_run(source)
    beats, why, used, p = baseline_verdict(run.data.metrics, mv.tags.get("reported_partition", "test"), alpha)
    if not beats and not force:
        raise PromotionError(f"refused: {name} version {version} does not beat its baseline ({why}); "
                             "pass --force with a --reason to promote it anyway")
    try:
        previous = client.get_model_version_by_alias(name, "champion").version
    except Exception:  # noqa: BLE001 - no champion yet
        previous = ""
    tags = {"promoted_by": who(), "promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "promotion_reason": reason.strip()[:4000], "promotion_forced": str(bool(force and not beats)).lower(),
            "baseline_test": used or "none", "baseline_p": "" if math.isnan(p) else f"{p:.4g}",
            "baseline_check": why[:4000], "replaced_champion_version": str(previous)}
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    client.set_registered_model_alias(name, "champion", str(version))
    tags["version"] = str(version)
    return tags


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Register one cell's model as candidate; promote a version to champion.")
    p.add_argument("--measure", required=True, choices=MEASURES)
    p.add_argument("--experiment", help="step 1: the experiment (grid name) to select in")
    p.add_argument("--store", help="step 1: the store the model must have been trained on (its content hash)")
    p.add_argument("--store-hash", help="step 1: that store's content hash, instead of --store")
    p.add_argument("--cohort", help="step 1: cohort of the pooled cell (needed when the launch has several)")
    p.add_argument("--cell", help="step 1: a named cell instead of the pooled one, e.g. oai__leg_strength__sex-female__bmi-lt25")
    p.add_argument("--launch", help="step 1: a launch run id (default: the latest launch on the store)")
    p.add_argument("--to", choices=["champion"], help="step 2: promote VERSION to champion")
    p.add_argument("version", nargs="?", help="step 2: the registered version to promote (or an alias: candidate)")
    p.add_argument("--reason", default="", help="step 2: why (recorded as a tag)")
    p.add_argument("--force", action="store_true", help="step 2: promote even if it does not beat its baseline")
    p.add_argument("--alpha", type=float, default=0.05, help="step 2: significance level of the baseline test")
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or the local server")
    return p


def main(argv: list[str] | None = None) -> int:
    p = get_args_parser()
    args = p.parse_args(argv)
    if args.to and not args.version:
        p.error("--to champion needs the VERSION to promote")
    if not args.to and (args.version or args.force or args.reason):
        p.error("VERSION, --reason and --force belong to step 2 (--to champion)")
    if not args.to and (not args.experiment or not (args.store or args.store_hash)):
        p.error("step 1 needs --experiment and --store (or --store-hash)")
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from study.tracking import resolve_tracking_uri

    try:
        store_hash = args.store_hash
        if not args.to and args.store:
            from data_prep.store import open_store

            store_hash = open_store(args.store).content_hash
        uri = resolve_tracking_uri(args.tracking_uri)
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        if args.to:
            tags = promote_champion(client, measure=args.measure, version=args.version, reason=args.reason,
                                    force=args.force, alpha=args.alpha)
            forced = " (forced: it does not beat its baseline)" if tags["promotion_forced"] == "true" else ""
            print(f"{registered_name(args.measure)} version {tags['version']} is now champion{forced}; "
                  f"{tags['baseline_check']}; by {tags['promoted_by']} at {tags['promoted_at']}")
            return 0
        cand = register_candidate(client, experiment=args.experiment, measure=args.measure, store_hash=store_hash,
                                  cohort=args.cohort, cell=args.cell, launch=args.launch)
    except (PromotionError, MlflowException, ValueError, RuntimeError, OSError) as exc:  # StoreError too
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"registered {cand.name} version {cand.version} from cell {cand.cell} (selected on {cand.selected_on} "
          f"{cand.val_score:.3f}); alias: candidate")
    print(f"to make it the champion: python study/promote.py --measure {args.measure} --to champion "
          f"{cand.version} --reason \"...\"")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
