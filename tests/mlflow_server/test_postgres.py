"""A lab's server: MLflow with --auth on a real PostgreSQL (Debian's ``postgresql``), passwords
never on a command line; and a small launch + promote + predict on it (slow)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from server_helpers import STUDY_GRID, STUDY_MEASURE, as_lab_user, assert_anonymous_refused_admin_accepted

from mlflow_server import auth, config, server


def _group_cmdlines(pgid: int) -> list[bytes]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            if int(text[text.rindex(")") + 2:].split()[2]) == pgid:
                out.append((stat.parent / "cmdline").read_bytes())
        except (OSError, ValueError):
            continue
    return out


def test_lab_server_refuses_anonymous_writes_and_stores_in_postgres(lab_server, postgres):
    assert lab_server.auth and lab_server.backend_store_uri.startswith("postgresql+psycopg2://mlflow@")
    name = assert_anonymous_refused_admin_accepted(lab_server)
    assert postgres.psql(f"SELECT count(*) FROM experiments WHERE name = '{name}'") == "1"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc/<pid>/cmdline")
def test_no_password_on_any_command_line(lab_server, postgres):
    cmdlines = _group_cmdlines(lab_server.pid)
    assert len(cmdlines) >= 3  # mlflow, uvicorn and its workers
    admin = auth.read_credentials(lab_server.home).password
    for cmdline in cmdlines:
        assert postgres.password.encode() not in cmdline and admin.encode() not in cmdline, cmdline
    for path in lab_server.home.glob("*.json"):  # server.json records the command; config.json the URI
        assert postgres.password not in path.read_text() and admin not in path.read_text(), path


def test_a_password_in_the_uri_is_refused_before_anything_starts(tmp_path, postgres, capsys):
    uri = f"postgresql://mlflow:{postgres.password}@127.0.0.1:{postgres.port}/mlflow"
    with pytest.raises(ValueError, match="PGPASSWORD"):
        config.check_backend_store_uri(uri)
    assert server.main(["start", "--home", str(tmp_path), "--backend-store-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "~/.pgpass" in err and postgres.password not in err
    assert not (tmp_path / "server.json").exists() and not (tmp_path / "server.log").exists()
    with pytest.raises(ValueError, match="allowed schemes"):
        config.check_backend_store_uri("mysql://mlflow@db/mlflow")


def test_pgpass_file_instead_of_pgpassword(tmp_path, postgres, monkeypatch):
    for key in ("PGPASSWORD", "PGPASSFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.pgpass of the user running the tests
    home = tmp_path / "home"
    # no password anywhere: start fails at once with libpq's reason and says where the password goes
    with pytest.raises(RuntimeError, match=r"(?s)no password supplied.*\$PGPASSWORD or in ~/.pgpass"):
        server.start(home, port=server.free_port(), backend_store_uri=postgres.uri)
    assert server.status(home) is None and not (home / "server.log").exists()  # nothing was started
    pgpass = tmp_path / ".pgpass"  # libpq's format: host:port:database:user:password, mode 0600
    pgpass.write_text(f"{postgres.host}:{postgres.port}:{postgres.database}:{postgres.user}:{postgres.password}\n")
    pgpass.chmod(0o600)
    info = server.start(home, port=server.free_port(), backend_store_uri=postgres.uri)
    try:
        experiment = f"pgpass-{uuid.uuid4().hex[:6]}"
        MlflowClient(info.url).create_experiment(experiment)
        assert postgres.psql(f"SELECT count(*) FROM experiments WHERE name = '{experiment}'") == "1"
        # the home remembers its database: a plain start would reuse it, another one is refused
        with pytest.raises(ValueError, match="keeps its runs in postgresql"):
            server.start(home, backend_store_uri=f"sqlite:///{tmp_path / 'other.db'}")
    finally:
        server.stop(home)


@pytest.mark.slow
def test_launch_promote_predict_on_the_lab_server(lab_study, postgres, capsys):
    """The study's CLIs ran with no URI or password given (only the home): check PostgreSQL has
    it all, then predict the volunteers from the champion the same way."""
    from study.predict import main as predict_main

    runs = postgres.psql("SELECT t.value, count(*) FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                         "AND t.key = 'run_type' JOIN experiments e ON e.experiment_id = r.experiment_id "
                         f"WHERE e.name = '{STUDY_GRID['name']}' AND r.status = 'FINISHED' GROUP BY t.value ORDER BY 1")
    n_cells = len(STUDY_GRID["grid"]["measure"])
    assert runs.splitlines() == ["cell|%d" % n_cells, "launch|1", "trial|%d" % (n_cells * STUDY_GRID["trials_per_cell"])]
    aliases = postgres.psql("SELECT alias FROM registered_model_aliases "
                            f"WHERE name = 'thigh-{STUDY_MEASURE}' ORDER BY alias")
    assert aliases.splitlines() == ["candidate", "champion"]
    stored = list((lab_study["server"].home / "artifacts").rglob("MLmodel"))
    assert stored, "the model's files must be in the server's artifact store"

    vol = lab_study["cohort"] / "volunteers"
    out = lab_study["root"] / "predictions.csv"
    with as_lab_user(lab_study["server"].home):
        rc = predict_main(["--dicom", str(vol / "dicom"), "--labels", str(vol / "tables" / "volunteers.csv"),
                           "--out", str(out), "--salt-file", str(lab_study["root"] / "salt")])
        assert rc == 0, capsys.readouterr()
        assert os.environ["MLFLOW_TRACKING_USERNAME"] == "admin"  # found in the home, not given
    pred = pd.read_csv(out)
    assert len(pred) == 8 and pred["p_high"].between(0, 1).all()
