"""What a server home is started with: its backend store, auth, allowed hosts, and environment.

A home remembers its settings in ``<home>/config.json`` at the first start, so a later
``start`` (or the one ``study/launch.py`` does through ``ensure_tracking_uri``) gets the same
database and the same auth without repeating the options; asking a home for another backend
or to drop auth is an error rather than a silent switch.

The server process gets a whitelisted environment (:func:`server_environment`): MLflow's CLI
reads many options from variables (``MLFLOW_UVICORN_OPTS="--host 0.0.0.0"`` or
``MLFLOW_GUNICORN_OPTS`` add a public bind, ``MLFLOW_BACKEND_STORE_URI``,
``MLFLOW_DEFAULT_ARTIFACT_ROOT``, ...), and a login shell's leftovers must not change what
``start`` asked for.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

# Host headers the server answers by default (MLflow's own default also takes every private
# network address: 10.*, 192.168.*, ...). Any port: `ssh -L 8080:127.0.0.1:5050` sends :8080.
LOOPBACK_HOSTS = ("127.0.0.1", "127.0.0.1:*", "localhost", "localhost:*")
BACKEND_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg2")
# psycopg2 (a dependency), the driver MLflow documents; SQLAlchemy 2.1 would pick psycopg 3 for
# a bare postgresql://, 2.0 psycopg2: naming it gives the same driver under both
POSTGRES_DRIVER = "postgresql+psycopg2"

# Set for the server unless the caller's environment says otherwise.
SERVER_ENV_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",  # no internet here; never phone home
    "DO_NOT_TRACK": "true",
    # The GenAI job runner spawns ~8 huey consumers and doubles start-up time; unused here.
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}
# Passed through from the caller: where programs and ~/.pgpass are, language and time zone,
# and libpq's ways to get a password or TLS settings that never show on a command line.
SERVER_ENV_PASSTHROUGH = (
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR",
    "PGPASSWORD", "PGPASSFILE", "PGSSLMODE", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY", "PGSSLCRL",
    "PGCONNECT_TIMEOUT", "PGSERVICEFILE",
)


@dataclass(frozen=True)
class HomeConfig:
    """A home's sticky settings (``<home>/config.json``).

    Attributes:
        backend_store_uri: SQLAlchemy URI of runs and registry; never holds a password.
        auth: MLflow's basic-auth app is on (users and passwords; see ``auth.py``).
        allowed_hosts: Host headers the server answers (DNS-rebinding guard), MLflow's
            ``--allowed-hosts``; ``LOOPBACK_HOSTS`` plus any a reverse proxy sends.
    """

    backend_store_uri: str
    auth: bool = False
    allowed_hosts: tuple[str, ...] = field(default=LOOPBACK_HOSTS)


def config_file(home: Path) -> Path:
    return home / "config.json"


def check_backend_store_uri(uri: str) -> str:
    """``uri`` if it is a SQLite or PostgreSQL URI without a password; else ValueError.

    A bare ``postgresql://`` comes back as ``postgresql+psycopg2://`` (the driver installed).

    A password in the URI would be on the server's command line, which every local user can
    read (``ps``, ``/proc/<pid>/cmdline``). libpq reads it from ``$PGPASSWORD``, ``~/.pgpass``
    or ``$PGPASSFILE`` instead.
    """
    parts = urlsplit(uri)
    if parts.scheme not in BACKEND_SCHEMES:
        raise ValueError(f"--backend-store-uri {parts.scheme or uri!r}: allowed schemes are "
                         f"{', '.join(BACKEND_SCHEMES)} (e.g. postgresql://mlflow@db.example.org/mlflow)")
    if parts.scheme.startswith("postgresql"):
        if parts.password is not None or "password" in parse_qs(parts.query):
            raise ValueError("--backend-store-uri holds a password, which would show in `ps` to every "
                             "user of this machine. Remove it from the URI and set PGPASSWORD in the "
                             "environment, or add a line host:port:database:user:password to ~/.pgpass "
                             "(mode 0600) or the file $PGPASSFILE names.")
        if not parts.path.strip("/"):
            raise ValueError(f"--backend-store-uri {uri!r} names no database; "
                             f"e.g. postgresql://mlflow@db.example.org:5432/mlflow")
        if parts.scheme == "postgresql":
            return parts._replace(scheme=POSTGRES_DRIVER).geturl()
    return uri


def check_database(uri: str, timeout: int = 10) -> None:
    """Connect once to a PostgreSQL backend, so that a missing password or a server that is down
    is one clear error now, not minutes of MLflow's connection retries. SQLite: nothing to check.

    Raises:
        RuntimeError: the connection failed; the message has libpq's reason and where the password goes.
    """
    parts = urlsplit(uri)
    if not parts.scheme.startswith("postgresql"):
        return
    import psycopg2

    try:
        psycopg2.connect(parts._replace(scheme="postgresql").geturl(), connect_timeout=timeout).close()
    except psycopg2.Error as exc:
        raise RuntimeError(f"cannot connect to the backend store {uri}: {str(exc).strip()}\n"
                           "Is PostgreSQL up, and is the password in $PGPASSWORD or in ~/.pgpass "
                           "(a line host:port:database:user:password, mode 0600; or the file $PGPASSFILE names)?") from exc


def resolve(home: Path, *, backend_store_uri: str | None, auth: bool | None,
            allowed_hosts: list[str] | None) -> HomeConfig:
    """The settings to start ``home`` with: the arguments, else what it was started with before.

    Args:
        backend_store_uri: None keeps the recorded one (first start: ``<home>/mlflow.db``).
        auth: None keeps the recorded setting (first start: off); True turns it on for good.
        allowed_hosts: extra Host headers beside the loopback ones; None keeps the recorded.

    Raises:
        ValueError: a backend other than the recorded one, ``auth=False`` for an auth home, or
            a bad backend URI.
    """
    recorded = read(home)
    if backend_store_uri is not None:
        backend_store_uri = check_backend_store_uri(backend_store_uri)
        if recorded and backend_store_uri != recorded.backend_store_uri:
            raise ValueError(f"{home} keeps its runs in {recorded.backend_store_uri}; it cannot switch to "
                             f"{backend_store_uri}. Use another --home for another database.")
    if auth is False and recorded and recorded.auth:
        raise ValueError(f"{home} was started with --auth; it cannot run without it")
    backend = backend_store_uri or (recorded.backend_store_uri if recorded else f"sqlite:///{home / 'mlflow.db'}")
    hosts = recorded.allowed_hosts if recorded else LOOPBACK_HOSTS
    if allowed_hosts is not None:
        hosts = tuple(dict.fromkeys([*LOOPBACK_HOSTS, *allowed_hosts]))
    return HomeConfig(backend_store_uri=backend, auth=bool(auth or (recorded and recorded.auth)),
                      allowed_hosts=hosts)


def read(home: Path) -> HomeConfig | None:
    try:
        data = json.loads(config_file(home).read_text())
    except FileNotFoundError:
        return None
    return HomeConfig(backend_store_uri=data["backend_store_uri"], auth=bool(data.get("auth")),
                      allowed_hosts=tuple(data.get("allowed_hosts", LOOPBACK_HOSTS)))


def write(home: Path, config: HomeConfig) -> None:
    tmp = config_file(home).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(asdict(config), indent=2) + "\n")
    tmp.replace(config_file(home))


def server_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The server's whole environment: whitelisted variables of ours, defaults, then ``extra``."""
    env = dict(SERVER_ENV_DEFAULTS)
    env.update({key: os.environ[key] for key in (*SERVER_ENV_DEFAULTS, *SERVER_ENV_PASSTHROUGH)
                if key in os.environ})
    env.update(extra or {})
    return env

