"""The local tracking server: lifecycle, tracking through proxied artifacts, the registry."""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from mlflow_server import process, server


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def _group_members(pgid: int) -> list[int]:
    """Pids of the processes in group ``pgid`` (Linux /proc)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2:].split()[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def _can_connect(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return False
    return True


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_start_is_idempotent_private_whitelisted_and_stop_kills_the_group(tmp_path, monkeypatch):
    # A user's shell may carry options MLflow's CLI reads from the environment: a public bind
    # through MLFLOW_UVICORN_OPTS / MLFLOW_GUNICORN_OPTS, another database or artifact root.
    monkeypatch.setenv("MLFLOW_UVICORN_OPTS", "--host 0.0.0.0")
    monkeypatch.setenv("MLFLOW_GUNICORN_OPTS", "--bind 0.0.0.0:5999")
    monkeypatch.setenv("MLFLOW_BACKEND_STORE_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    monkeypatch.setenv("MLFLOW_DEFAULT_ARTIFACT_ROOT", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("THIGHMRI_CANARY", "must-not-reach-the-server")
    home = tmp_path / "home"
    home.mkdir(mode=0o755)  # an existing, world-readable home is tightened
    info = server.start(home, port=server.free_port())
    try:
        assert info.home == home.resolve()
        assert server.status(home) == info
        assert server.start(home) == info, "a second start must return the running server"
        assert (home / "mlflow.db").is_file() and (home / "artifacts").is_dir()
        assert not (tmp_path / "elsewhere.db").exists()
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        members = _group_members(info.pid)
        assert len(members) >= 3, members  # mlflow, uvicorn, its workers
        for pid in members:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            names = {entry.split(b"=", 1)[0].decode() for entry in environ if entry}
            leaked = names & {"MLFLOW_UVICORN_OPTS", "MLFLOW_GUNICORN_OPTS", "MLFLOW_BACKEND_STORE_URI",
                              "MLFLOW_DEFAULT_ARTIFACT_ROOT", "THIGHMRI_CANARY"}
            assert not leaked, f"pid {pid} inherited {leaked}"
            assert b"0.0.0.0" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        # bound to 127.0.0.1 only: another loopback address of this machine gets no answer
        assert _can_connect("127.0.0.1", info.port) and not _can_connect("127.0.0.2", info.port)
        state = json.loads((home / "server.json").read_text())
        assert state["process"]["cmdline"][-len(state["command"]):] == state["command"]
        assert "--allowed-hosts" in state["command"]
    finally:
        assert server.stop(home) is True
    assert server.status(home) is None
    assert _group_gone(info.pid), "helper processes of the server outlived stop()"
    assert not (home / "server.json").exists()
    assert server.stop(home) is False


def test_the_server_refuses_a_foreign_host_header(mlflow_server):
    # DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends Host: evil.example
    def get(host: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", mlflow_server.port, timeout=10)
        conn.request("GET", "/api/2.0/mlflow/experiments/search?max_results=1", headers={"Host": host})
        status = conn.getresponse().status
        conn.close()
        return status

    assert get(f"127.0.0.1:{mlflow_server.port}") == 200
    assert get("localhost:8080") == 200  # ssh -L 8080:127.0.0.1:PORT
    assert get("evil.example") == 403
    assert get("192.168.1.20:5050") == 403  # MLflow's default would let private addresses in


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
    hung = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        url = f"http://127.0.0.1:{server.free_port()}"
        (tmp_path / "server.json").write_text(json.dumps(
            {"url": url, "pid": hung.pid, "port": 1, "process": process.identity(hung.pid)}))
        with pytest.raises(RuntimeError, match="alive but .* did not answer"):
            server.start(tmp_path, timeout=1.5)
    finally:
        hung.kill()
        hung.wait()


def _mlflow_like_state(pid: int, port: int, identity: dict | None) -> dict:
    command = ["/usr/bin/mlflow", "server", "--port", str(port)]
    return {"url": f"http://127.0.0.1:{port}", "pid": pid, "port": port, "command": command,
            **({"process": identity} if identity is not None else {})}


@pytest.mark.parametrize("recorded", ["other_start_time", "other_command", "no_identity"])
def test_stop_with_a_stale_pid_kills_nothing(tmp_path, recorded, capsys):
    # The server died; its pid (also its process group id) now belongs to another program.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        now = process.identity(bystander.pid)
        identity = {"other_start_time": {**now, "start": now["start"] + "0"},
                    "other_command": {**now, "cmdline": ["/usr/bin/mlflow", "server"]},
                    "no_identity": None}[recorded]  # no_identity: a server.json from before identities
        (tmp_path / "server.json").write_text(json.dumps(_mlflow_like_state(bystander.pid, 5999, identity)))
        assert server.status(tmp_path) is None
        assert server.main(["stop", "--home", str(tmp_path)]) == 0
        assert "stale" in capsys.readouterr().out
        time.sleep(0.3)
        assert bystander.poll() is None, "stop() killed a process that was not its server"
        assert not (tmp_path / "server.json").exists()
        assert server.stop(tmp_path) is False
    finally:
        bystander.kill()
        bystander.wait()


def test_start_replaces_a_stale_state_file(tmp_path):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        (tmp_path / "server.json").write_text(json.dumps(_mlflow_like_state(bystander.pid, 5999, None)))
        info = server.start(tmp_path, port=server.free_port())
        try:
            assert info.pid != bystander.pid and server.status(tmp_path) == info
        finally:
            assert server.stop(tmp_path) is True
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_identity_tells_a_reused_pid_apart():
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        recorded = process.identity(first.pid)
        assert recorded["cmdline"][-1] == "import time; time.sleep(30)"
        assert process.is_same_process(first.pid, recorded)
        assert not process.is_same_process(first.pid, {**recorded, "start": "0:0"})
        assert not process.is_same_process(os.getpid(), recorded)
    finally:
        first.kill()
        first.wait()
    assert process.identity(first.pid) is None and not process.is_same_process(first.pid, recorded)
