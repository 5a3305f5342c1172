"""Headless Chromium screenshot of the MLflow UI (a developer tool; tests do not need it).

    python mlflow_server/screenshot.py --url http://127.0.0.1:5050 --out ui.png [--path '#/experiments']
    python mlflow_server/screenshot.py --url http://127.0.0.1:5050 --out model.png \\
        --path '#/models/thigh-leg_strength'

Needs Chromium (Debian/Ubuntu: ``apt-get install -y chromium``) or set ``$CHROMIUM`` to its path.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str:
    """Path of a Chromium/Chrome executable: ``$CHROMIUM``, /usr/bin/chromium, or one on PATH."""
    for candidate in filter(None, (os.environ.get("CHROMIUM"), *CANDIDATES)):
        found = shutil.which(candidate)
        if found:
            return found
    raise FileNotFoundError(
        f"No Chromium found (tried $CHROMIUM and {', '.join(CANDIDATES)}). Install it with "
        "`apt-get update && apt-get install -y chromium` (Debian/Ubuntu) or set CHROMIUM=/path/to/chrome.")


def screenshot(url: str, out: str | os.PathLike, *, path: str = "", width: int = 1600,
               height: int = 1000, budget_ms: int = 15000, timeout: float = 90) -> Path:
    """Render ``url + path`` headless and write a PNG to ``out``.

    Args:
        url: server address, e.g. ``http://127.0.0.1:5050``.
        path: UI route appended to the URL, e.g. ``#/experiments`` or ``#/models``.
        budget_ms: virtual time the page gets to load and render its data before the shot.
    """
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)  # chromium exits 0 even when the page fails: judge by the file
    target = url.rstrip("/") + "/" + path.lstrip("/") if path else url
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:  # fresh profile: no locks, no state
        command = [
            find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            # no internet here: no first-run, update, sync or background calls
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={profile}", f"--window-size={width},{height}",
            f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", target,
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0 or not out.is_file():
        raise RuntimeError(f"Chromium failed (exit {result.returncode}) for {target}:\n"
                           f"{result.stderr[-2000:]}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="server address, e.g. http://127.0.0.1:5050")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--path", default="", help="UI route, e.g. '#/experiments' or '#/models'")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--budget-ms", type=int, default=15000, help="virtual time to let the page load")
    args = parser.parse_args(argv)
    try:
        out = screenshot(args.url, args.out, path=args.path, width=args.width, height=args.height,
                         budget_ms=args.budget_ms)
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
