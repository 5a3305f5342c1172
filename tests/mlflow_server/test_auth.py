"""``start --auth``: anonymous requests refused, the generated admin accepted, secrets kept private."""

from __future__ import annotations

import json
import os
import stat
import uuid

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from server_helpers import CLIENT_ENV, assert_anonymous_refused_admin_accepted, rest

from mlflow_server import auth, server


def test_auth_server_refuses_anonymous_writes_and_keeps_its_secrets(tmp_path, monkeypatch):
    for key in CLIENT_ENV:
        monkeypatch.delenv(key, raising=False)
    home = tmp_path / "home"
    port = server.free_port()
    info = server.start(home, port=port, auth_on=True)
    try:
        assert info.auth
        name = assert_anonymous_refused_admin_accepted(info)
        # MLflow's own client without credentials is refused too
        with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
            MlflowClient(info.url).create_experiment(f"anon-{uuid.uuid4().hex[:6]}")
        # this project's clients find the credentials from the home, as launch/promote/predict do
        monkeypatch.setenv(server.HOME_ENV, str(home))
        assert server.ensure_tracking_uri(info.url.replace("127.0.0.1", "localhost")).endswith(str(port))
        client = MlflowClient(info.url)
        assert client.get_experiment_by_name(name) is not None
        run = client.create_run(client.create_experiment(f"authed-{uuid.uuid4().hex[:6]}"))
        client.log_metric(run.info.run_id, "test_acc", 0.75)
        # a colleague the admin adds may read (default_permission READ) but not write or move @champion
        admin = auth.read_credentials(home)
        assert rest(info.url, "/api/2.0/mlflow/users/create", {"username": "colleague", "password": "a-long-password-123"},
                    admin.username, admin.password) == 200
        client.create_registered_model("thigh-auth_test")
        version = client.create_model_version("thigh-auth_test", f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
        colleague = ("colleague", "a-long-password-123")
        assert rest(info.url, f"/api/2.0/mlflow/runs/get?run_id={run.info.run_id}", None, *colleague) == 200
        assert rest(info.url, "/api/2.0/mlflow/runs/create", {"experiment_id": run.info.experiment_id}, *colleague) == 403
        assert rest(info.url, "/api/2.0/mlflow/registered-models/alias", {"name": "thigh-auth_test", "alias": "champion",
                                                                         "version": version.version}, *colleague) == 403
        # private: the home and auth folders 0700, every secret 0600, no password in state files
        for path in (home, home / "auth", home / "artifacts"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
        for secret in ("credentials", "secret_key", "basic_auth.ini"):
            assert stat.S_IMODE((home / "auth" / secret).stat().st_mode) == 0o600, secret
        password = auth.read_credentials(home).password
        for path in (home / "server.json", home / "config.json", home / "server.log", home / "auth" / "basic_auth.ini"):
            assert password not in path.read_text(), path
        # auth is for good: a plain start returns the auth server; asking to drop auth is an error
        assert server.start(home) == info
        with pytest.raises(ValueError, match="--auth"):
            server.start(home, auth_on=False)
    finally:
        assert server.stop(home)
    # a restart keeps the users database, the secret key and the password (start checks it)
    again = server.start(home, port=port)
    try:
        assert again.auth and rest(again.url, "/api/2.0/mlflow/experiments/search?max_results=5") == 401
        assert MlflowClient(again.url).get_run(run.info.run_id).data.metrics == {"test_acc": 0.75}
    finally:
        server.stop(home)


def test_a_secret_others_can_read_is_refused(tmp_path):
    (tmp_path / "auth").mkdir()
    path = auth.credentials_file(tmp_path)
    path.write_text("[mlflow]\nmlflow_tracking_username = admin\nmlflow_tracking_password = x\n")
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        auth.read_credentials(tmp_path)


def test_ensure_tracking_uri_leaves_other_servers_and_given_credentials_alone(tmp_path, monkeypatch):
    for key in CLIENT_ENV:
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "auth").mkdir()
    auth.credentials_file(tmp_path).write_text("[mlflow]\nmlflow_tracking_username = admin\n"
                                               "mlflow_tracking_password = local-secret\n")
    auth.credentials_file(tmp_path).chmod(0o600)
    (tmp_path / "server.json").write_text(json.dumps({"url": "http://127.0.0.1:5999", "pid": 1, "port": 5999,
                                                      "auth": True}))
    # another server: its own credentials, never this home's admin password
    assert server.ensure_tracking_uri("https://mlflow.example.org", home=tmp_path) == "https://mlflow.example.org"
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ
    # credentials the user set win
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "alices")
    server.ensure_tracking_uri("http://localhost:5999", home=tmp_path)
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "alices"
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    server.ensure_tracking_uri("http://localhost:5999/", home=tmp_path)
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "local-secret"
