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


def test_object_storage_probes_name_the_url_and_never_a_secret(two_cohort_store, s3_server, monkeypatch):
    """The per-node probe on s3:// store and storage (run here, as a probe task would run it)."""
    from data_prep.store import open_store, upload_store
    from study.preflight import probe_node, remove_storage_probe, write_storage_probe

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    bucket = s3_server.make_bucket("preflight-probe")
    store_url = f"{bucket}/two.zarr"
    assert upload_store(two_cohort_store, store_url, progress=False) == []
    digest = open_store(two_cohort_store).content_hash
    probe, problem = write_storage_probe(f"{bucket}/ray")
    assert problem is None and probe.startswith(f"{bucket}/ray/.preflight-")
    common = {"tracking_uri": "file:///nowhere", "weights": "none", "need_weights": False}
    assert probe_node(store=store_url, store_hash=digest, probe_file=probe, **common) == []

    remove_storage_probe(probe)  # what a node sees when the driver's object is not there for it
    gone = probe_node(store=f"{bucket}/missing.zarr", store_hash=digest, probe_file=probe, **common)
    assert len(gone) == 2, gone
    assert f"store '{bucket}/missing.zarr' cannot be opened" in gone[0] and "credentials" in gone[0]
    assert f"the storage path {bucket}/ray is not readable from this node" in gone[1]
    _, refused = write_storage_probe("s3://no-such-bucket-preflight/ray")
    assert refused.startswith("storage path s3://no-such-bucket-preflight/ray cannot be written from the driver")
    for text in [*gone, refused]:
        assert s3_server.secret_key not in text and s3_server.access_key not in text
