"""Register the model of the best cell for a measure and point the `champion` alias at it.

    python study/promote.py --measure leg_strength                    # across all experiments
    python study/promote.py --measure leg_strength --experiment demo --cohort oai

Selection uses validation accuracy only (the number trials were chosen on), never the test
accuracy that the cell reports; ties go to the larger validation set, then the newer run.
The registered model is `thigh-<measure>`; the new version gets aliases `candidate` and
(unless --no-champion) `champion`, which study/predict.py loads.
"""

from __future__ import annotations

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import sys
from dataclasses import dataclass

from study.config import MEASURES


def registered_name(measure: str) -> str:
    return f"thigh-{measure}"


@dataclass
class Promotion:
    name: str
    version: str
    cell: str
    run_id: str
    val_acc: float
    test_acc: float | None
    aliases: tuple[str, ...]


def select_cell_run(client, *, measure: str, experiment: str | None = None, cohort: str | None = None):
    """The finished cell run with a logged model and the best validation accuracy for a measure."""
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = [e.name for e in client.search_experiments()]
            raise ValueError(f"experiment {experiment!r} not found; experiments: {', '.join(names)}")
        exp_ids = [exp.experiment_id]
    else:
        exp_ids = [e.experiment_id for e in client.search_experiments()]
    query = (f"tags.run_type = 'cell' and params.measure = '{measure}' and attributes.status = 'FINISHED'")
    if cohort:
        query += f" and params.cohort = '{cohort}'"
    runs = [r for r in client.search_runs(exp_ids, query, max_results=5000)
            if "model_uri" in r.data.tags and "best_val_acc" in r.data.metrics]
    if not runs:
        raise ValueError(f"no finished cell run with a model for measure {measure!r}"
                         + (f", cohort {cohort!r}" if cohort else "")
                         + (f" in experiment {experiment!r}" if experiment else "")
                         + "; run study/launch.py first")
    return max(runs, key=lambda r: (r.data.metrics["best_val_acc"], r.data.metrics.get("n_val", 0),
                                    r.info.start_time))


def promote(*, measure: str, tracking_uri: str, experiment: str | None = None, cohort: str | None = None,
            champion: bool = True) -> Promotion:
    import mlflow
    from mlflow.tracking import MlflowClient

    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; allowed: {', '.join(MEASURES)}")
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    run = select_cell_run(client, measure=measure, experiment=experiment, cohort=cohort)
    name = registered_name(measure)
    tags = {"cell": run.data.tags.get("cell", ""), "source_run_id": run.info.run_id,
            "selected_by": "best_val_acc", "val_acc": f"{run.data.metrics['best_val_acc']:.4f}"}
    if "test_acc" in run.data.metrics:
        tags["test_acc"] = f"{run.data.metrics['test_acc']:.4f}"
    version = mlflow.register_model(run.data.tags["model_uri"], name, tags=tags)
    aliases = ("candidate", "champion") if champion else ("candidate",)
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version.version)
    client.update_registered_model(name, description=(
        f"ResNet18 classifying high vs low {measure} from axial mid-thigh MRI. "
        f"'champion' is the version study/predict.py uses; versions are chosen by validation accuracy."))
    return Promotion(name=name, version=str(version.version), cell=tags["cell"], run_id=run.info.run_id,
                     val_acc=run.data.metrics["best_val_acc"], test_acc=run.data.metrics.get("test_acc"),
                     aliases=aliases)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Register the best cell's model and set the champion alias.")
    p.add_argument("--measure", required=True, choices=MEASURES)
    p.add_argument("--experiment", default=None, help="restrict to one experiment (grid name)")
    p.add_argument("--cohort", default=None, help="restrict to cells of one cohort, e.g. oai")
    p.add_argument("--no-champion", action="store_true", help="only set the 'candidate' alias")
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or the local server")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    from study.tracking import resolve_tracking_uri

    try:
        promo = promote(measure=args.measure, tracking_uri=resolve_tracking_uri(args.tracking_uri),
                        experiment=args.experiment, cohort=args.cohort, champion=not args.no_champion)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    test = f", test acc {promo.test_acc:.3f}" if promo.test_acc is not None else ""
    print(f"registered {promo.name} version {promo.version} from cell {promo.cell} "
          f"(val acc {promo.val_acc:.3f}{test}); aliases: {', '.join(promo.aliases)}")
    print(f"load it with: models:/{promo.name}@{promo.aliases[-1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
