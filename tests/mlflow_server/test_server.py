"""The local tracking server: lifecycle, tracking through proxied artifacts, the registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import mlflow
import pytest
from mlflow import MlflowClient

from mlflow_server import server


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_start_is_idempotent_and_stop_kills_the_group(tmp_path):
    home = tmp_path / "home"
    info = server.start(home, port=server.free_port())
    try:
        assert info.home == home.resolve()
        assert server.status(home) == info
        assert server.start(home) == info, "a second start must return the running server"
        assert (home / "mlflow.db").is_file() and (home / "artifacts").is_dir()
    finally:
        assert server.stop(home) is True
    assert server.status(home) is None
    assert _group_gone(info.pid), "helper processes of the server outlived stop()"
    assert not (home / "server.json").exists()
    assert server.stop(home) is False


def test_start_reports_the_log_tail_when_the_server_dies(tmp_path, monkeypatch):
    fake = [sys.executable, "-c", "import sys; print('boom: no database'); sys.exit(3)", "--"]
    monkeypatch.setattr(server, "_mlflow_command", lambda: fake)
    with pytest.raises(RuntimeError, match="(?s)exited with code 3.*boom: no database"):
        server.start(tmp_path, port=server.free_port(), timeout=10)
    assert server.status(tmp_path) is None


def test_start_refuses_a_taken_port(tmp_path, mlflow_server):
    with pytest.raises(RuntimeError, match=f"Port {mlflow_server.port} .* in use"):
        server.start(tmp_path, port=mlflow_server.port)


def test_run_params_metrics_and_artifacts_round_trip(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server.url)
    experiment_id = client.create_experiment(f"roundtrip-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment_id, tags={"run_type": "trial"})
    client.log_param(run.info.run_id, "lr", "0.001")
    client.log_metric(run.info.run_id, "val_acc", 0.75, step=3)
    note = tmp_path / "note.txt"
    note.write_text("thigh slices 15\n")
    client.log_artifact(run.info.run_id, str(note), artifact_path="notes")
    client.set_terminated(run.info.run_id)

    back = client.get_run(run.info.run_id)
    assert back.data.params == {"lr": "0.001"}
    assert back.data.metrics == {"val_acc": 0.75}
    assert back.data.tags["run_type"] == "trial"
    assert back.info.status == "FINISHED"
    # Proxied: clients address artifacts through the server, not a shared path.
    assert back.info.artifact_uri.startswith("mlflow-artifacts:/")
    stored = list((mlflow_server.home / "artifacts").rglob("note.txt"))
    assert len(stored) == 1, "the server, not the client, must write the artifact"
    local = client.download_artifacts(run.info.run_id, "notes/note.txt", str(tmp_path / "dl"))
    assert open(local).read() == "thigh slices 15\n"


def test_registry_alias_champion(mlflow_server, tmp_path, monkeypatch):
    client = MlflowClient(mlflow_server.url)
    experiment_id = client.create_experiment(f"registry-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment_id)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "MLmodel").write_text("flavors: {}\n")
    (model_dir / "weights.bin").write_bytes(b"\x00\x01tiny")
    client.log_artifacts(run.info.run_id, str(model_dir), artifact_path="model")
    client.set_terminated(run.info.run_id)

    name = f"thigh-test_{uuid.uuid4().hex[:6]}"
    client.create_registered_model(name)
    version = client.create_model_version(name, f"{run.info.artifact_uri}/model",
                                          run_id=run.info.run_id)
    client.set_registered_model_alias(name, "champion", version.version)

    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == version.version
    assert champion.run_id == run.info.run_id
    # models:/ URIs resolve through the global registry URI (MLflow 3.17 ignores the
    # registry_uri argument here and would create ./mlflow.db): set the env, as predict.py must.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.chdir(tmp_path)
    path = mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=str(tmp_path / "dl"))
    assert not (tmp_path / "mlflow.db").exists()
    assert open(os.path.join(path, "weights.bin"), "rb").read() == b"\x00\x01tiny"


def test_ensure_tracking_uri_honours_the_environment(monkeypatch):
    for key in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
        monkeypatch.setenv(key, "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")

    def no_start(*args, **kwargs):
        raise AssertionError("ensure_tracking_uri started a server although MLFLOW_TRACKING_URI is set")

    monkeypatch.setattr(server, "start", no_start)
    assert server.ensure_tracking_uri() == "http://tracking.example:5000"


def test_ensure_tracking_uri_reuses_the_local_server(mlflow_server, monkeypatch):
    for key in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
        monkeypatch.setenv(key, "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(server.HOME_ENV, str(mlflow_server.home))
    assert server.ensure_tracking_uri() == mlflow_server.url


def test_start_will_not_start_a_second_server_beside_a_live_unanswering_one(tmp_path):
    hung = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        url = f"http://127.0.0.1:{server.free_port()}"
        (tmp_path / "server.json").write_text(json.dumps({"url": url, "pid": hung.pid, "port": 1}))
        with pytest.raises(RuntimeError, match="alive but .* did not answer"):
            server.start(tmp_path, timeout=1.5)
    finally:
        hung.kill()
        hung.wait()
