"""Preflight on a real local Ray: what can never run is refused before any MLflow run exists."""

from __future__ import annotations

import pytest
from launch_helpers import Launch, write_grid

pytestmark = pytest.mark.slow


def test_gpu_and_unloadable_weights_are_refused_before_any_run(two_cohort_store, mlflow_server, short_tmp, tmp_path):
    from mlflow.tracking import MlflowClient

    grid = write_grid(tmp_path / "preflight_refusal.yaml", two_cohort_store,
                      resources_per_trial={"cpu": 1, "gpu": 0.25}, train={"weights": "imagenet", "freeze": "fc"})
    torch_home = tmp_path / "torch_home"  # no cached ImageNet file, and no way to download one
    offline = {"TORCH_HOME": str(torch_home), "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    launch = Launch(["--grid", str(grid), "--tracking-uri", mlflow_server.url, "--num-cpus", "2",
                     "--storage-path", str(short_tmp / "preflight")], tmp_path / "launch.log", env=offline)
    assert launch.wait(timeout=300) == 2
    out = launch.output()
    assert "2 problem(s) with this cluster (nothing was started)" in out, out[-2000:]
    assert "resources_per_trial.gpu: 0.25 GPU per trial, but the cluster has no GPU" in out
    assert "--set resources_per_trial.gpu=0" in out
    assert "train.weights 'imagenet' cannot be loaded" in out and "resnet18-f37072fd.pth" in out
    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name("preflight_refusal")
    assert exp is None or not client.search_runs([exp.experiment_id])  # no run was created
