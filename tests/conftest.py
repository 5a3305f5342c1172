"""Shared fixtures: a real MLflow tracking server for the session, a real PostgreSQL, a real
S3-compatible server (moto's standalone server), and short temp dirs for Ray.

Tests that log to the server set ``MLFLOW_TRACKING_URI`` themselves (``monkeypatch.setenv``);
nothing here sets it globally.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlflow_server import server


@pytest.fixture(scope="session", autouse=True)
def feature_cache_dir(tmp_path_factory):
    """Frozen-feature cache in a temp dir, so tests never write into the repo's runs/."""
    import os

    path = tmp_path_factory.mktemp("feature_cache")
    old = os.environ.get("THIGHMRI_FEATURE_CACHE")
    os.environ["THIGHMRI_FEATURE_CACHE"] = str(path)  # also inherited by Ray workers started later
    yield path
    if old is None:
        os.environ.pop("THIGHMRI_FEATURE_CACHE", None)
    else:
        os.environ["THIGHMRI_FEATURE_CACHE"] = old


@pytest.fixture(scope="session", autouse=True)
def store_cache_dir(tmp_path_factory):
    """Node-local cache of stores on object storage in a temp dir (data_prep/store/remote.py)."""
    path = tmp_path_factory.mktemp("store_cache")
    old = os.environ.get("THIGHMRI_STORE_CACHE")
    os.environ["THIGHMRI_STORE_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("THIGHMRI_STORE_CACHE", None)
    else:
        os.environ["THIGHMRI_STORE_CACHE"] = old


@dataclass(frozen=True)
class S3Server:
    """moto's standalone S3 server on 127.0.0.1; `env` is what a client needs (credentials
    from the environment, as on a cluster). The secret is random per session so tests can
    check that it appears in no log, param or tag."""

    endpoint: str
    access_key: str
    secret_key: str

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (idempotent); returns "s3://name"."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)
        if name not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (`python -m moto.server`, a separate process) for the session."""
    import sys
    import time
    import urllib.error
    import urllib.request

    try:
        import moto.server  # noqa: F401
    except ImportError:  # never a skip: the object-storage tests would claim what they did not check
        pytest.fail("moto[server] not installed; it is in the test extra: pip install -e '.[test]'")
    port = server.free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.build_opener(urllib.request.ProxyHandler({})).open(endpoint, timeout=2).close()
                break
            except urllib.error.HTTPError:  # any HTTP answer: it is up
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto server did not start (exit {proc.poll()}); see {log.name}")
                time.sleep(0.2)
        yield S3Server(endpoint=endpoint, access_key="AKIA" + secrets.token_hex(8).upper(),
                       secret_key=secrets.token_urlsafe(30))
    finally:
        import signal

        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> server.ServerInfo:
    """A real tracking server (SQLite + proxied artifacts) in a temp home on a free port.

    Yields its :class:`mlflow_server.server.ServerInfo`; ``.url`` is the tracking URI.
    Stopped (whole process group) at the end of the session.
    """
    home = tmp_path_factory.mktemp("mlflow_home")
    info = server.start(home, port=server.free_port(), timeout=90)
    try:
        yield info
    finally:
        server.stop(home)


@pytest.fixture(scope="module")
def short_tmp() -> Path:
    """A short temp dir under /tmp: Ray's unix socket paths must stay <= 107 bytes.

    Module-scoped so module-scoped fixtures (a whole pipeline run) can use it; tests in one
    module share it, so give each its own subdirectory.
    """
    path = Path(tempfile.mkdtemp(prefix="tm", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def require_tool(path: str | None, what: str, install: str) -> str:
    """``path`` if it exists; else fail, saying how to install it (``make test`` does: system-deps).

    Never a skip: a suite that passes because its PostgreSQL or browser tests did not run
    would claim what it did not check."""
    if path and os.path.exists(path):
        return path
    pytest.fail(f"{what} not found; install it with `{install}` (`make test` runs `make system-deps`, which does)")


@dataclass(frozen=True)
class Postgres:
    """A running PostgreSQL cluster with a database ``database`` owned by role ``user``.

    ``uri`` has no password: the role's ``password`` reaches clients through ``$PGPASSWORD``
    or a ``.pgpass`` file, as in a lab's setup. ``psql`` runs SQL as the superuser.
    """

    host: str
    port: int
    user: str
    password: str
    database: str
    socket_dir: Path
    bin_dir: Path

    @property
    def uri(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"

    def psql(self, sql: str, database: str | None = None) -> str:
        """Run ``sql`` over the unix socket as the superuser; its unaligned, tuples-only output."""
        result = subprocess.run(
            [str(self.bin_dir / "psql"), "-h", str(self.socket_dir), "-p", str(self.port), "-U", "postgres",
             "-d", database or self.database, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql],
            capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"psql failed ({result.returncode}): {result.stderr}")
        return result.stdout.strip()


def _postgres_bin_dir() -> Path:
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                                                        key=lambda p: int(p.split("/")[-3]), reverse=True)), None)
    return Path(require_tool(found, "PostgreSQL (initdb)", "apt-get install -y postgresql")).resolve().parent


@pytest.fixture(scope="session")
def postgres() -> Postgres:
    """A real PostgreSQL (Debian's ``postgresql``) in a temp dir for the session, on a free port.

    Listens on 127.0.0.1 (password auth, scram-sha-256) and on a unix socket in a short /tmp
    dir (trust, for the superuser). As root it runs as the ``postgres`` user, since PostgreSQL
    refuses to run as root. Stopped and deleted at the end of the session.
    """
    bin_dir = _postgres_bin_dir()
    as_user: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))  # socket paths must stay short
    if os.geteuid() == 0:
        import pwd

        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root, PostgreSQL needs a 'postgres' user (Debian's postgresql package makes it)")
        os.chown(base, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = base / "data", server.free_port()
    password = secrets.token_urlsafe(16)

    def run(*command: str) -> None:
        result = subprocess.run([*as_user, *command], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{command[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")

    options = (f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={base} "
               "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
    pg = Postgres(host="127.0.0.1", port=port, user="mlflow", password=password, database="mlflow",
                  socket_dir=base, bin_dir=bin_dir)
    started = False
    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
            "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C")
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "postgres.log"), "-o", options, "-w",
            "-t", "60", "start")
        started = True
        pg.psql(f"CREATE ROLE mlflow LOGIN PASSWORD '{password}'", database="postgres")
        pg.psql("CREATE DATABASE mlflow OWNER mlflow", database="postgres")
        yield pg
    finally:
        if started:
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)
