"""MLflow conventions: one experiment per grid, a launch run → a run per cell → a run per trial.

Runs are created with an explicit `MlflowClient` (never the fluent active-run stack), so the
driver, the per-cell Ray tasks and the trial workers can each write to the run they were handed.
Nothing here logs subject identifiers: stores only hold pseudonyms, and runs only hold counts,
metrics and models.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

REPO_ROOT = Path(__file__).resolve().parents[1]
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the local server (started if needed).

    For the local server run with --auth this also sets its credentials in os.environ.
    """
    from mlflow_server.server import ensure_tracking_uri

    return ensure_tracking_uri(explicit)


def code_version() -> str:
    """Git commit of the code that ran, with '+dirty' when the work tree had changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def get_or_create_experiment(client: MlflowClient, name: str, description: str | None = None) -> str:
    """The grid's experiment, shown in the UI's model-training view (runs table), not the GenAI one."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        exp_id = client.create_experiment(name)
    else:
        exp_id = exp.experiment_id
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp_id)
    client.set_experiment_tag(exp_id, "mlflow.experimentKind", "custom_model_development")
    if description:
        client.set_experiment_tag(exp_id, "mlflow.note.content", description)
    return exp_id


def create_run(client: MlflowClient, experiment_id: str, *, name: str, run_type: str,
               parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> str:
    all_tags = {RUN_NAME_TAG: name, "run_type": run_type, **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    return client.create_run(experiment_id, tags=all_tags, run_name=name).info.run_id


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    for key, value in params.items():
        client.log_param(run_id, key, "null" if value is None else str(value)[:6000])


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    for key, value in metrics.items():
        if value is None:
            continue
        client.log_metric(run_id, key, float(value), step=step or 0)


def log_json(client: MlflowClient, run_id: str, obj: Any, filename: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / filename
        path.write_text(json.dumps(obj, indent=2, default=str))
        client.log_artifact(run_id, str(path))


def log_file(client: MlflowClient, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
    client.log_artifact(run_id, str(path), artifact_path)


def end_open_children(client: MlflowClient, experiment_id: str, parent_run_id: str, status: str = "KILLED") -> int:
    """Mark child runs left RUNNING (trials stopped by the scheduler or killed) as ended."""
    runs = client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'")
    for run in runs:
        client.set_terminated(run.info.run_id, status)
    return len(runs)
