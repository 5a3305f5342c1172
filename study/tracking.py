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
import time
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
    """All params in one request per 100 (MLflow's batch limit); values as strings."""
    from mlflow.entities import Param

    items = [Param(k, "null" if v is None else str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    """All metrics of one step in one request (a trial logs ~6 per epoch)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i : i + 1000])


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, Any]) -> None:
    """Several tags in one request: readers never see some of them without the others."""
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_metric_steps(client: MlflowClient, run_id: str, steps: dict[int, dict[str, float]]) -> None:
    """Several steps' metrics in as few requests as possible (a resumed trial's backlog)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for step, m in sorted(steps.items())
             for k, v in m.items() if v is not None]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i : i + 1000])


def log_json(client: MlflowClient, run_id: str, obj: Any, filename: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / filename
        path.write_text(json.dumps(obj, indent=2, default=str))
        client.log_artifact(run_id, str(path))


def log_file(client: MlflowClient, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
    client.log_artifact(run_id, str(path), artifact_path)


def children(client: MlflowClient, experiment_id: str, parent_run_id: str, where: str = "") -> list:
    """Every run whose parent is parent_run_id (all pages), optionally filtered further."""
    query = f"tags.`{PARENT_TAG}` = '{parent_run_id}'" + (f" and {where}" if where else "")
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], query, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def end_open_children(client: MlflowClient, experiment_id: str, parent_run_id: str, status: str = "KILLED") -> int:
    """Mark child runs left RUNNING (trials stopped by the scheduler or killed) as ended."""
    runs = children(client, experiment_id, parent_run_id, "attributes.status = 'RUNNING'")
    for run in runs:
        client.set_terminated(run.info.run_id, status)
    return len(runs)


def end_open_tree(client: MlflowClient, experiment_id: str, launch_run_id: str, status: str = "KILLED") -> int:
    """Mark every run of a launch left RUNNING (its cells and their trials) as ended."""
    n = 0
    for cell in children(client, experiment_id, launch_run_id):
        n += end_open_children(client, experiment_id, cell.info.run_id, status)
        if cell.info.status == "RUNNING":
            client.set_terminated(cell.info.run_id, status)
            n += 1
    return n


def reopen(client: MlflowClient, run_id: str) -> None:
    """Set a KILLED/FAILED run back to RUNNING: a resumed cell or trial continues in it."""
    client.update_run(run_id, status="RUNNING")
