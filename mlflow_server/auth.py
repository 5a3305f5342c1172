"""Basic auth for the local server: a generated admin password, and this project's clients using it.

``start --auth`` runs MLflow's ``basic-auth`` app (``pip install 'mlflow[auth]'``). Every request
but ``/health`` and static files must then carry a user and password; anonymous reads and writes
get 401. The first start writes, all mode 0600 in ``<home>/auth/`` (mode 0700):

    credentials       the admin user and its generated password, in the format of MLflow's own
                      ~/.mlflow/credentials (copy it there to use it from a notebook)
    secret_key        MLFLOW_FLASK_SERVER_SECRET_KEY (CSRF tokens of the UI's user pages)
    basic_auth.ini    MLflow's auth config (MLFLOW_AUTH_CONFIG_PATH): users database, default
                      permission; holds no password
    basic_auth.db     MLflow's users and permissions (SQLite)

The admin password reaches the server through its environment (MLFLOW_AUTH_ADMIN_PASSWORD),
never its command line. :func:`use_local_credentials` puts it in ``os.environ``
(MLFLOW_TRACKING_USERNAME/PASSWORD) for this project's own clients; Ray workers started after
that inherit it.
"""

from __future__ import annotations

import configparser
import os
import secrets
import stat
import urllib.error
import urllib.request
from base64 import b64encode
from dataclasses import dataclass
from pathlib import Path

ADMIN_USERNAME = "admin"
# Users the admin creates may read every experiment and model; writing needs a grant (or being
# the creator). MLflow's other choices: EDIT, MANAGE, NO_PERMISSIONS.
DEFAULT_PERMISSION = "READ"
USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


def auth_dir(home: Path) -> Path:
    return home / "auth"


def credentials_file(home: Path) -> Path:
    return auth_dir(home) / "credentials"


def is_enabled(home: Path) -> bool:
    """Whether ``home`` was ever started with ``--auth`` (then it always is: auth is sticky)."""
    return credentials_file(home).exists()


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if needed and make it 0700: only its owner may list or enter it.

    Raises:
        PermissionError: ``path`` belongs to another user (the message says whose folder it is).
    """
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if stat.S_IMODE(path.stat().st_mode) != 0o700:
        try:
            path.chmod(0o700)
        except PermissionError as exc:
            raise PermissionError(f"{path} belongs to uid {path.stat().st_uid}, not to you (uid {os.getuid()}); "
                                  f"use a home of your own (--home or $THIGHMRI_MLFLOW_HOME)") from exc
    return path


def _write_private(path: Path, text: str) -> None:
    # O_EXCL: never reuse (or follow a link planted at) an existing path; 0600 from the first byte
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def _read_private(path: Path) -> str:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:  # like ssh with a private key: a secret others can read is no secret
        raise PermissionError(f"{path} is readable by others (mode {mode:o}); run `chmod 600 {path}` "
                              f"and change the password if others may have read it")
    return path.read_text()


def read_credentials(home: Path) -> Credentials | None:
    """The admin credentials of an ``--auth`` home, or None for a home without auth."""
    path = credentials_file(home)
    if not path.exists():
        return None
    parser = configparser.ConfigParser()
    parser.read_string(_read_private(path))
    section = parser["mlflow"]
    return Credentials(section[USERNAME_ENV.lower()], section[PASSWORD_ENV.lower()])


def prepare(home: Path) -> dict[str, str]:
    """Create the auth files on first use; the environment the server needs to run with auth.

    Returns:
        ``MLFLOW_AUTH_CONFIG_PATH``, ``MLFLOW_FLASK_SERVER_SECRET_KEY`` and the admin's
        ``MLFLOW_AUTH_ADMIN_USERNAME``/``_PASSWORD`` (used by MLflow only to create the admin
        in an empty users database).
    """
    folder = private_dir(auth_dir(home))
    config = folder / "basic_auth.ini"
    if not config.exists():
        _write_private(config, "\n".join([
            "[mlflow]",
            f"default_permission = {DEFAULT_PERMISSION}",
            f"database_uri = sqlite:///{folder / 'basic_auth.db'}",
            f"admin_username = {ADMIN_USERNAME}",
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
            "grant_default_workspace_access = false",
        ]) + "\n")
    secret = folder / "secret_key"
    if not secret.exists():
        _write_private(secret, secrets.token_urlsafe(48) + "\n")
    if not credentials_file(home).exists():
        _write_private(credentials_file(home), "\n".join([
            "[mlflow]",
            f"{USERNAME_ENV.lower()} = {ADMIN_USERNAME}",
            f"{PASSWORD_ENV.lower()} = {secrets.token_urlsafe(24)}",
        ]) + "\n")
    creds = read_credentials(home)
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": _read_private(secret).strip(),
        "MLFLOW_AUTH_ADMIN_USERNAME": creds.username,
        "MLFLOW_AUTH_ADMIN_PASSWORD": creds.password,
    }


def check(url: str, creds: Credentials, timeout: float = 10) -> None:
    """Ask the server who ``creds`` are; raise if it does not accept them.

    Raises:
        PermissionError: 401/403: the users database has another password for the admin (it
            was changed through the API, or ``auth/`` was copied from another home).
    """
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/users/current")
    token = b64encode(f"{creds.username}:{creds.password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1: no proxy
    try:
        opener.open(request, timeout=timeout).close()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise PermissionError(f"the MLflow server at {url} refuses the admin password stored in "
                                  f"its home's auth/credentials (HTTP {exc.code}); the users database "
                                  f"has another one. Put the current password in that file.") from exc
        raise


def use_local_credentials(home: Path) -> bool:
    """Put the admin credentials of ``home`` in ``os.environ`` for MLflow clients of this process.

    Leaves credentials already in the environment alone (a shared server's own user).

    Returns:
        True if this set them.
    """
    if os.environ.get(USERNAME_ENV) or os.environ.get(PASSWORD_ENV):
        return False
    creds = read_credentials(home)
    if creds is None:
        return False
    os.environ[USERNAME_ENV] = creds.username
    os.environ[PASSWORD_ENV] = creds.password
    return True
