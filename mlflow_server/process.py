"""Which process a pid is, and killing a process group only when it is the one we started.

A pid in ``server.json`` can outlive its server: after a crash or a reboot the kernel hands the
number to another process, and killing "the recorded pid" then kills someone else's work. So
``server.json`` records the server's identity when it starts (its start time and command line,
:func:`identity`) and ``stop`` kills only a process that still has the same identity.

Linux reads ``/proc``; elsewhere ``ps`` gives the start time and command line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def identity(pid: int) -> dict | None:
    """What makes ``pid`` this process and no later one: ``{"start": str, "cmdline": [str]}``.

    ``start`` is the boot id and the start time in clock ticks since boot (Linux) or ``ps``'s
    start time; a reused pid has another. ``None`` if no such process (or it cannot be read).
    """
    proc = Path(f"/proc/{pid}")
    if _BOOT_ID.is_file():
        try:
            stat = (proc / "stat").read_text()
            raw = (proc / "cmdline").read_bytes()
        except OSError:
            return None
        # field 22 (starttime); the command name in (...) may itself hold spaces or parentheses
        start_ticks = stat[stat.rindex(")") + 2:].split()[19]
        cmdline = [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]]
        return {"start": f"{_BOOT_ID.read_text().strip()}:{start_ticks}", "cmdline": cmdline}
    try:  # macOS and other systems without /proc
        out = [subprocess.run(["ps", "-p", str(pid), "-o", field], capture_output=True, text=True,
                              timeout=10).stdout.strip() for field in ("lstart=", "command=")]
    except (OSError, subprocess.SubprocessError):
        return None
    return {"start": out[0], "cmdline": out[1].split()} if out[0] else None


def is_same_process(pid: int, recorded: dict | None, command: list[str] | None = None) -> bool:
    """Whether ``pid`` is still the process recorded as ``recorded`` (see :func:`identity`).

    A state file written before identities were recorded (``recorded`` is None) is matched on
    the command line alone: the live process's must end with the recorded ``command``.
    """
    now = identity(pid)
    if now is None:
        return False
    if recorded:
        return now["start"] == recorded.get("start") and now["cmdline"] == recorded.get("cmdline")
    return bool(command) and now["cmdline"][-len(command):] == list(command)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def group_alive(pgid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)  # reap the leader if we started it, else it stays a zombie
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_group(pgid: int, timeout: float = 20) -> None:
    """SIGTERM the process group, SIGKILL whatever is left after ``timeout``; wait until gone.

    Callers check first that ``pgid`` is a group they started (:func:`is_same_process`).
    """
    for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not group_alive(pgid):
                return
            time.sleep(0.1)
    if group_alive(pgid):
        raise RuntimeError(f"Process group {pgid} survived SIGKILL")
