"""MLflow conventions: one experiment per grid, a launch run → a run per cell → a run per trial.

Runs are created with an explicit `MlflowClient` (never the fluent active-run stack), so the
driver, the per-cell Ray tasks and the trial workers can each write to the run they were handed.
Nothing here logs subject identifiers: stores only hold pseudonyms, and runs only hold counts,
metrics and models.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import tempfile
import time
import warnings
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


SOURCE_ENTRY_POINT = "study/launch.py"  # every run of a launch comes from its command line
COMMIT_ENV = "THIGHMRI_SOURCE_COMMIT"  # set by the driver; Ray workers (other nodes too) inherit it


@functools.lru_cache(maxsize=1)
def _git_commit() -> str:
    version = os.environ.get(COMMIT_ENV) or code_version()
    return version.split("+")[0]


def source_tags() -> dict[str, str]:
    """MLflow's own source tags (shown in its UI's Source column): the git commit of the code
    that ran (the driver's, forwarded to workers in THIGHMRI_SOURCE_COMMIT; `code_version` says
    whether the tree was dirty), the entry point and the source type (a local command line)."""
    from mlflow.entities import SourceType
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE

    tags = {MLFLOW_SOURCE_NAME: SOURCE_ENTRY_POINT, MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.LOCAL)}
    commit = _git_commit()
    if commit and commit != "unknown":
        tags[MLFLOW_GIT_COMMIT] = commit
    return tags


def store_dataset(store_path: str, content_hash: str):
    """The slice store as an MLflow dataset: source = its path (or URI), digest = its content
    hash (the first 32 hex digits: MLflow allows 36 characters; the full hash is the input's
    `content_hash` tag). Nothing about participants: a path and a hash."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    hexdigest = content_hash.split(":")[-1]
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local path is a local path
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(store_path)
    name = store_path.rstrip("/").rsplit("/", 1)[-1] or "store"
    return MetaDataset(source=source, name=name, digest=hexdigest[:32])


def log_store_input(client: MlflowClient, run_id: str, store_path: str, content_hash: str,
                    context: str = "training") -> None:
    """The store as the run's dataset input (MLflow UI: Datasets), tagged with its full hash."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    dataset = store_dataset(store_path, content_hash)._to_mlflow_entity()
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context),
                                                                    InputTag("content_hash", content_hash)])])


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
    all_tags = {RUN_NAME_TAG: name, "run_type": run_type, **source_tags(), **(tags or {})}
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
