"""MLflow tracking server with a model registry, run from a private home folder.

Backend store: ``<home>/mlflow.db`` (SQLite) or a PostgreSQL database; artifacts in
``<home>/artifacts`` served by the server itself (``--serve-artifacts``), so clients log to
``mlflow-artifacts:/`` URIs over HTTP and need no shared filesystem. Bound to 127.0.0.1.

    python -m mlflow_server start [--home DIR] [--port N] [--auth]
                                  [--backend-store-uri postgresql://USER@HOST:PORT/DB]
    python -m mlflow_server status [--home DIR]             # exit code 1 if not running
    python -m mlflow_server stop [--home DIR]

Home: ``--home``, else ``$THIGHMRI_MLFLOW_HOME``, else ``<repo>/runs/mlflow``; made 0700. Port:
``--port``, else 5050 if free, else any free port (recorded in ``<home>/server.json``).
``--auth`` turns on MLflow's basic auth with a generated admin password (``<home>/auth/``, 0600)
that this project's commands use by themselves. PostgreSQL passwords come from ``$PGPASSWORD``
or ``~/.pgpass``, never the URI. A home remembers its backend and auth (``config.json``).
``study/tracking.py`` calls :func:`ensure_tracking_uri`, which honours ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

if __package__ in (None, ""):  # run as a file: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlflow_server import auth, config, process  # noqa: E402

HOST = "127.0.0.1"  # local only: others reach it through ssh -L or a TLS proxy (see README)
DEFAULT_PORT = 5050  # not MLflow's 5000, which macOS AirPlay and many dev servers take
DEFAULT_WORKERS = 2  # uvicorn workers; the registry and a study's loggers need few
HOME_ENV = "THIGHMRI_MLFLOW_HOME"
# MLflow 3's UI opens a fresh browser in its GenAI view; this route opens "Model training"
UI_EXPERIMENTS = "#/experiments?workflowType=machine_learning"
REPO_ROOT = Path(__file__).resolve().parents[1]
SERVER_ENV_DEFAULTS = config.SERVER_ENV_DEFAULTS  # kept importable from here


@dataclass(frozen=True)
class ServerInfo:
    """A running server: ``url`` is the tracking URI and the UI address."""

    url: str
    pid: int  # also the process group id (started with start_new_session=True)
    port: int
    home: Path
    auth: bool = False  # MLflow basic auth on: clients need a user and password
    backend_store_uri: str = ""  # never holds a password


def resolve_home(home: str | os.PathLike | None = None) -> Path:
    """The server's home: the argument, else ``$THIGHMRI_MLFLOW_HOME``, else ``<repo>/runs/mlflow``."""
    if home is None:
        home = os.environ.get(HOME_ENV) or REPO_ROOT / "runs" / "mlflow"
    return Path(home).expanduser().resolve()


def _state_file(home: Path) -> Path:
    return home / "server.json"


def _log_file(home: Path) -> Path:
    return home / "server.log"


def _healthy(url: str, timeout: float = 2.0) -> bool:
    # No proxies: an http_proxy set for the cluster must not intercept 127.0.0.1.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{url}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # as uvicorn binds: a port whose last server just stopped (TIME_WAIT) is free again
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _mlflow_command() -> list[str]:
    # The mlflow of the running interpreter's venv, not whichever is first on PATH.
    exe = Path(sys.executable).parent / "mlflow"
    if exe.is_file() and os.access(exe, os.X_OK):
        return [str(exe)]
    return [sys.executable, "-m", "mlflow"]


def _log_tail(home: Path, n_lines: int = 30) -> str:
    try:
        lines = _log_file(home).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(lines[-n_lines:])


def _read_state(home: Path) -> dict | None:
    try:
        state = json.loads(_state_file(home).read_text())
        state["info"] = ServerInfo(url=state["url"], pid=int(state["pid"]), port=int(state["port"]), home=home,
                                   auth=bool(state.get("auth")), backend_store_uri=state.get("backend_store_uri", ""))
        return state
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def _is_ours(state: dict) -> bool:
    """Whether the recorded pid is still the server this home started (not a reused pid)."""
    return process.is_same_process(state["info"].pid, state.get("process"), state.get("command"))


def _write_state(info: ServerInfo, command: list[str], identity: dict | None) -> None:
    state = {"url": info.url, "pid": info.pid, "port": info.port, "home": str(info.home),
             "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command,
             "process": identity, "auth": info.auth, "backend_store_uri": info.backend_store_uri}
    tmp = _state_file(info.home).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(_state_file(info.home))  # atomic: readers never see half a file


@contextlib.contextmanager
def _home_lock(home: Path):
    # Two launches starting at once must not start two servers on one database.
    with open(home / "server.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def status(home: str | os.PathLike | None = None) -> ServerInfo | None:
    """The server recorded in ``<home>/server.json`` if it is still that process and ``/health`` answers."""
    state = _read_state(resolve_home(home))
    if state is None or not _is_ours(state) or not _healthy(state["info"].url):
        return None
    return state["info"]


def start(home: str | os.PathLike | None = None, port: int | None = None, timeout: float = 60, *,
          workers: int = DEFAULT_WORKERS, auth_on: bool | None = None, backend_store_uri: str | None = None,
          allowed_hosts: list[str] | None = None) -> ServerInfo:
    """Start the server in ``home`` (or return the healthy one already running there).

    Args:
        home: server home; see :func:`resolve_home`. Created, or tightened, to mode 0700.
        port: port on 127.0.0.1; ``None`` means 5050 if free, else any free port. An explicit
            port that is taken is an error. Ignored when a server is already running in ``home``.
        timeout: seconds to wait for ``/health`` (start-up takes about 6-12 s, more with auth).
        workers: uvicorn worker processes.
        auth_on: True turns on MLflow basic auth for this home for good; None keeps the home's
            setting (off for a new home); False for an auth home is an error.
        backend_store_uri: ``sqlite:///...`` or ``postgresql://USER@HOST:PORT/DB`` (no password:
            libpq reads ``$PGPASSWORD`` or ``~/.pgpass``); None keeps the home's (first start:
            ``<home>/mlflow.db``).
        allowed_hosts: Host headers to answer beside 127.0.0.1 and localhost (e.g. a reverse
            proxy's name); None keeps the home's.

    Raises:
        ValueError: a bad backend URI, or settings the home cannot switch to.
        RuntimeError: the port is taken, a server without auth runs where auth was asked for,
            the PostgreSQL backend cannot be reached (no password?), or the server process
            exited (message has its log tail).
        TimeoutError: ``/health`` did not answer within ``timeout`` (the server is killed).
        PermissionError: the home belongs to another user, or the server refuses the stored
            admin password.
    """
    home = auth.private_dir(resolve_home(home))
    with _home_lock(home):
        settings = config.resolve(home, backend_store_uri=backend_store_uri, auth=auth_on,
                                  allowed_hosts=allowed_hosts)
        state = _read_state(home)
        if state is not None and _is_ours(state):
            info = state["info"]
            if settings.auth and not info.auth:
                raise RuntimeError(f"The MLflow server in {home} (pid {info.pid}) runs without auth; stop it "
                                   f"(`python -m mlflow_server stop --home {home}`) and start it with --auth.")
            return _wait_for_running(info, timeout)
        _state_file(home).unlink(missing_ok=True)  # none, or stale: its pid is not our server
        if port is None:
            port = DEFAULT_PORT if _port_free(DEFAULT_PORT) else free_port()
        elif not _port_free(port):
            raise RuntimeError(f"Port {port} on {HOST} is already in use; pass another port "
                               f"or none (then 5050 if free, else any free port).")
        config.check_database(settings.backend_store_uri)
        auth.private_dir(home / "artifacts")
        command = _mlflow_command() + [
            "server",
            "--backend-store-uri", settings.backend_store_uri,
            "--serve-artifacts", "--artifacts-destination", str(home / "artifacts"),
            "--host", HOST, "--port", str(port), "--workers", str(workers),
            "--allowed-hosts", ",".join(settings.allowed_hosts),
        ] + (["--app-name", "basic-auth"] if settings.auth else [])
        env = config.server_environment(auth.prepare(home) if settings.auth else None)
        with open(_log_file(home), "w") as log:
            # New session = new process group, so stop() can kill uvicorn's workers too.
            proc = subprocess.Popen(command, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        info = ServerInfo(url=f"http://{HOST}:{port}", pid=proc.pid, port=port, home=home,
                          auth=settings.auth, backend_store_uri=settings.backend_store_uri)
        try:
            _wait_for_new(proc, info, timeout)
            if settings.auth:
                auth.check(info.url, auth.read_credentials(home))
        except BaseException:
            process.kill_group(proc.pid)
            raise
        config.write(home, settings)  # only a server that started fixes the home's settings
        _write_state(info, command, process.identity(proc.pid))
        return info


def _wait_for_new(proc: subprocess.Popen, info: ServerInfo, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _healthy(info.url):
        if proc.poll() is not None:
            raise RuntimeError(f"MLflow server in {info.home} exited with code {proc.returncode} before "
                               f"answering /health. Tail of {_log_file(info.home)}:\n{_log_tail(info.home)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"MLflow server in {info.home} did not answer {info.url}/health within "
                               f"{timeout:.0f} s. Tail of {_log_file(info.home)}:\n{_log_tail(info.home)}")
        time.sleep(0.25)


def _wait_for_running(info: ServerInfo, timeout: float) -> ServerInfo:
    # Ours but not answering (busy under a study's load?): a second server on the same
    # database would be worse than waiting.
    deadline = time.monotonic() + timeout
    while True:
        if _healthy(info.url, timeout=5):
            return info
        if time.monotonic() > deadline:
            raise RuntimeError(f"MLflow server pid {info.pid} recorded in {_state_file(info.home)} is alive "
                               f"but {info.url}/health did not answer within {timeout:.0f} s. Stop it with "
                               f"`python -m mlflow_server stop --home {info.home}`.")
        time.sleep(1)


def stop(home: str | os.PathLike | None = None, timeout: float = 20) -> bool:
    """Stop the server recorded in ``home`` and all its helper processes.

    Kills only a process that is still the recorded server (same start time and command line);
    a ``server.json`` whose pid has exited or now belongs to another process is stale: it is
    removed and nothing is killed.

    Returns:
        True if a server process group was killed, False if none was running (or stale).
    """
    home = resolve_home(home)
    state = _read_state(home)
    if state is None:
        return False
    ours = _is_ours(state)
    if ours:
        process.kill_group(state["info"].pid, timeout)
    _state_file(home).unlink(missing_ok=True)
    return ours


def _same_server(a: str, b: str) -> bool:
    loopback = {"localhost": "127.0.0.1"}
    pa, pb = urlsplit(a.rstrip("/")), urlsplit(b.rstrip("/"))
    return ((pa.scheme, loopback.get(pa.hostname, pa.hostname), pa.port, pa.path)
            == (pb.scheme, loopback.get(pb.hostname, pb.hostname), pb.port, pb.path))


def ensure_tracking_uri(explicit: str | None = None, home: str | os.PathLike | None = None) -> str:
    """The tracking URI to log to, with this process ready to authenticate to it.

    ``explicit`` if given, else ``$MLFLOW_TRACKING_URI``, else the URL of the server in ``home``
    (see :func:`resolve_home`), started if it is not running. When the URI is that home's
    server and it runs with ``--auth``, its admin credentials go into ``os.environ``
    (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``, unless already set), where MLflow clients of
    this process and of Ray workers started later find them. Also turns off MLflow's client
    telemetry here unless the environment already decides it.
    """
    for key in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
        os.environ.setdefault(key, "true")
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or start(home).url
    home_path = resolve_home(home)
    state = _read_state(home_path)
    if state is not None and state["info"].auth and _same_server(uri, state["info"].url):
        auth.use_local_credentials(home_path)
    return uri


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mlflow_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--home", default=None,
                        help=f"server home (default ${HOME_ENV} or <repo>/runs/mlflow)")
    parser.add_argument("--port", type=int, default=None,
                        help=f"port for start (default {DEFAULT_PORT} if free, else a free port)")
    parser.add_argument("--auth", action="store_true", default=None,
                        help="start with MLflow basic auth and a generated admin password (for good, for this home)")
    parser.add_argument("--backend-store-uri", default=None,
                        help="sqlite:///FILE or postgresql://USER@HOST:PORT/DB; password from $PGPASSWORD or "
                             "~/.pgpass, never here (default: the home's, first <home>/mlflow.db)")
    parser.add_argument("--allowed-hosts", default=None,
                        help="comma-separated Host headers to answer beside 127.0.0.1 and localhost, "
                             "e.g. a reverse proxy's mlflow.lab.example.org")
    parser.add_argument("--timeout", type=float, default=60, help="seconds to wait for start-up")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    home = resolve_home(args.home)
    if args.action == "start":
        t0 = time.monotonic()
        hosts = args.allowed_hosts.split(",") if args.allowed_hosts else None
        try:
            info = start(home, port=args.port, timeout=args.timeout, auth_on=args.auth,
                         backend_store_uri=args.backend_store_uri, allowed_hosts=hosts)
        except (ValueError, RuntimeError, TimeoutError, PermissionError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"MLflow UI and tracking URI: {info.url}  (pid {info.pid}, home {info.home}, "
              f"ready in {time.monotonic() - t0:.1f} s)")
        print(f"  backend store: {info.backend_store_uri}")
        print(f"  export MLFLOW_TRACKING_URI={info.url}")
        if info.auth:
            print(f"  basic auth on: user {auth.ADMIN_USERNAME}, password in {auth.credentials_file(home)} "
                  f"(this project's commands use it; a browser asks for it)")
        print(f"  from a laptop: ssh -L {info.port}:127.0.0.1:{info.port} <this host>, "
              f"then open http://127.0.0.1:{info.port}/{UI_EXPERIMENTS}")
        return 0
    if args.action == "stop":
        state = _read_state(home)
        if stop(home):
            print(f"stopped MLflow server in {home}")
        elif state is not None:
            print(f"{_state_file(home)} was stale: pid {state['info'].pid} is not its MLflow server any more "
                  f"(it exited, or the pid now belongs to another process); removed it, killed nothing")
        else:
            print(f"no MLflow server running in {home}")
        return 0
    info = status(home)
    if info is None:
        print(f"no MLflow server running in {home}")
        return 1
    print(f"running: {info.url}  (pid {info.pid}, home {info.home}, backend {info.backend_store_uri}, "
          f"auth {'on' if info.auth else 'off'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
