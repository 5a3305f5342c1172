"""Local MLflow tracking server with a model registry, for one machine.

SQLite backend store (``<home>/mlflow.db``) and a local artifact folder (``<home>/artifacts``)
served by the server itself (``--serve-artifacts``), so clients log to ``mlflow-artifacts:/``
URIs over HTTP and need no shared filesystem. Bound to 127.0.0.1.

    python -m mlflow_server start [--home DIR] [--port N]   # prints the UI address
    python -m mlflow_server status [--home DIR]             # exit code 1 if not running
    python -m mlflow_server stop [--home DIR]

Home: ``--home``, else ``$THIGHMRI_MLFLOW_HOME``, else ``<repo>/runs/mlflow``. Port: ``--port``,
else 5050 if free, else any free port (the one in use is recorded in ``<home>/server.json``).
``study/launch.py`` calls :func:`ensure_tracking_uri`, which honours ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HOST = "127.0.0.1"  # local only; a shared server is a separate deployment (see README)
DEFAULT_PORT = 5050  # not MLflow's 5000, which macOS AirPlay and many dev servers take
DEFAULT_WORKERS = 2  # uvicorn workers; the registry and a study's loggers need few
HOME_ENV = "THIGHMRI_MLFLOW_HOME"
# MLflow 3's UI opens a fresh browser in its GenAI view; this route opens "Model training"
UI_EXPERIMENTS = "#/experiments?workflowType=machine_learning"
REPO_ROOT = Path(__file__).resolve().parents[1]

# Set for the server process unless the caller's environment already says otherwise.
SERVER_ENV_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",  # no internet here; never phone home
    "DO_NOT_TRACK": "true",
    # The GenAI job runner spawns ~8 huey consumers and doubles start-up time; unused here.
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}


@dataclass(frozen=True)
class ServerInfo:
    """A running server: ``url`` is the tracking URI and the UI address."""

    url: str
    pid: int  # also the process group id (started with start_new_session=True)
    port: int
    home: Path


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _group_alive(pgid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)  # reap the leader if we started it, else it stays a zombie
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
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


def _read_state(home: Path) -> ServerInfo | None:
    try:
        state = json.loads(_state_file(home).read_text())
        return ServerInfo(url=state["url"], pid=int(state["pid"]), port=int(state["port"]), home=home)
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def _write_state(info: ServerInfo, command: list[str]) -> None:
    state = {"url": info.url, "pid": info.pid, "port": info.port, "home": str(info.home),
             "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command}
    tmp = _state_file(info.home).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(_state_file(info.home))  # atomic: readers never see half a file


@contextlib.contextmanager
def _home_lock(home: Path):
    # Two launches starting at once must not start two servers on one SQLite file.
    with open(home / "server.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def status(home: str | os.PathLike | None = None) -> ServerInfo | None:
    """The server recorded in ``<home>/server.json`` if its process lives and ``/health`` answers."""
    home = resolve_home(home)
    info = _read_state(home)
    if info is None or not _pid_alive(info.pid) or not _healthy(info.url):
        return None
    return info


def start(home: str | os.PathLike | None = None, port: int | None = None, timeout: float = 60,
          *, workers: int = DEFAULT_WORKERS) -> ServerInfo:
    """Start the server in ``home`` (or return the healthy one already running there).

    Args:
        home: server home; see :func:`resolve_home`.
        port: port on 127.0.0.1; ``None`` means 5050 if free, else any free port. An explicit
            port that is taken is an error. Ignored when a server is already running in ``home``.
        timeout: seconds to wait for ``/health`` (start-up takes about 6-9 s).
        workers: uvicorn worker processes.

    Raises:
        RuntimeError: the port is taken, or the server process exited (message has its log tail).
        TimeoutError: ``/health`` did not answer within ``timeout`` (the server is killed).
    """
    home = resolve_home(home)
    home.mkdir(parents=True, exist_ok=True)
    with _home_lock(home):
        running = status(home)
        if running is not None:
            return running
        recorded = _read_state(home)
        if recorded is not None and _pid_alive(recorded.pid):
            # Alive but not answering (busy under a study's load?): a second server on the
            # same SQLite file would be worse than waiting.
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if _healthy(recorded.url, timeout=5):
                    return recorded
                time.sleep(1)
            raise RuntimeError(f"MLflow server pid {recorded.pid} recorded in {_state_file(home)} is "
                               f"alive but {recorded.url}/health did not answer within {timeout:.0f} s. "
                               f"Stop it with `python -m mlflow_server stop --home {home}`.")
        if port is None:
            port = DEFAULT_PORT if _port_free(DEFAULT_PORT) else free_port()
        elif not _port_free(port):
            raise RuntimeError(f"Port {port} on {HOST} is already in use; pass another port "
                               f"or none (then 5050 if free, else any free port).")
        (home / "artifacts").mkdir(exist_ok=True)
        command = _mlflow_command() + [
            "server",
            "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
            "--serve-artifacts", "--artifacts-destination", str(home / "artifacts"),
            "--host", HOST, "--port", str(port), "--workers", str(workers),
        ]
        env = {**SERVER_ENV_DEFAULTS, **os.environ}
        with open(_log_file(home), "w") as log:
            # New session = new process group, so stop() can kill uvicorn's workers too.
            proc = subprocess.Popen(command, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        info = ServerInfo(url=f"http://{HOST}:{port}", pid=proc.pid, port=port, home=home)
        deadline = time.monotonic() + timeout
        while not _healthy(info.url):
            if proc.poll() is not None:
                _kill_group(proc.pid)
                raise RuntimeError(f"MLflow server in {home} exited with code {proc.returncode} "
                                   f"before answering /health. Tail of {_log_file(home)}:\n"
                                   f"{_log_tail(home)}")
            if time.monotonic() > deadline:
                _kill_group(proc.pid)
                raise TimeoutError(f"MLflow server in {home} did not answer {info.url}/health within "
                                   f"{timeout:.0f} s. Tail of {_log_file(home)}:\n{_log_tail(home)}")
            time.sleep(0.25)
        _write_state(info, command)
        return info


def _kill_group(pgid: int, timeout: float = 20) -> None:
    """SIGTERM the process group, SIGKILL whatever is left after ``timeout``; wait until gone."""
    for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not _group_alive(pgid):
                return
            time.sleep(0.1)
    if _group_alive(pgid):
        raise RuntimeError(f"Process group {pgid} survived SIGKILL")


def stop(home: str | os.PathLike | None = None, timeout: float = 20) -> bool:
    """Stop the server recorded in ``home`` and all its helper processes.

    Returns:
        True if a server process group was killed, False if none was running.
    """
    home = resolve_home(home)
    info = _read_state(home)
    if info is None:
        return False
    was_running = _group_alive(info.pid)
    if was_running:
        _kill_group(info.pid, timeout)
    _state_file(home).unlink(missing_ok=True)
    return was_running


def ensure_tracking_uri() -> str:
    """The tracking URI to log to: ``$MLFLOW_TRACKING_URI`` if set, else the local server's URL.

    Starts the local server (default home) if it is not running. Also turns off MLflow's
    client telemetry in this process unless the environment already decides it.
    """
    for key in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
        os.environ.setdefault(key, "true")
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return start().url


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mlflow_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--home", default=None,
                        help=f"server home (default ${HOME_ENV} or <repo>/runs/mlflow)")
    parser.add_argument("--port", type=int, default=None,
                        help=f"port for start (default {DEFAULT_PORT} if free, else a free port)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds to wait for start-up")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    home = resolve_home(args.home)
    if args.action == "start":
        t0 = time.monotonic()
        info = start(home, port=args.port, timeout=args.timeout)
        print(f"MLflow UI and tracking URI: {info.url}  (pid {info.pid}, home {info.home}, "
              f"ready in {time.monotonic() - t0:.1f} s)")
        print(f"  export MLFLOW_TRACKING_URI={info.url}")
        print(f"  from a laptop: ssh -L {info.port}:127.0.0.1:{info.port} <this host>, "
              f"then open http://127.0.0.1:{info.port}/{UI_EXPERIMENTS}")
        return 0
    if args.action == "stop":
        print(f"stopped MLflow server in {home}" if stop(home) else f"no MLflow server running in {home}")
        return 0
    info = status(home)
    if info is None:
        print(f"no MLflow server running in {home}")
        return 1
    print(f"running: {info.url}  (pid {info.pid}, home {info.home})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
