"""Build journal of a Zarr store: what an unfinished build or append has done so far.

    from data_prep.store.journal import read_journal
    header, entries = read_journal("data/demo.zarr")   # (None, []) when no build is unfinished

`<store>/build_journal.jsonl` (JOURNAL) exists only while a build or append is unfinished.
Line 1 is a header: the build key, whether it appends, the cohort, the recipe and `base` (for
an append, the store's previous subjects, normalisation, slice digests and attributes; empty
for a new store). Each later line is one participant read, appended after that
participant's slices are in place. StoreWriter (writer.py) writes it and replays it
to resume; `finish()` deletes it; verify_store reports a leftover one. Pseudonyms only, no PHI.

Durability (JournalWriter): every line is flushed to the OS as it is written, but fsynced at
most once per SYNC_INTERVAL_S (and when the journal is closed, at finish). So a killed
build process (SIGKILL, crash, Ctrl-C) loses nothing that was journaled: the OS still writes
the flushed lines and the participants' files. An OS crash or power loss may lose the last
second or so of journal lines; those participants are simply redone on resume. Their image
files are not fsynced either, so after such a crash a journaled participant's slices may be
damaged or missing: `build_store.py --verify STORE`, which re-hashes every slice against the
`slice_digest` recorded from the worker's images, is how a store that survived one is checked.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from data_prep.preprocess import Recipe

JOURNAL = "build_journal.jsonl"  # inside the store while a build or append is unfinished
SYNC_INTERVAL_S = 1.0  # at most one journal fsync per interval (see the module docstring)


def write_journal_header(path: Path, build_key: str, append: bool, recipe: Recipe,
                         base: dict) -> None:
    """Start a journal: its header line, replacing any older journal in one atomic step."""
    header = {"type": "header", "build_key": build_key, "append": append,
              "cohort": build_key.split(":", 1)[0], "recipe": recipe.to_dict(), "base": base}
    tmp = path / (JOURNAL + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(header, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / JOURNAL)  # atomic: a journal always starts with a whole header


class JournalWriter:
    """Appends participant lines to an existing journal (after write_journal_header).

    Each line is flushed at once (a killed process loses none), fsynced at most once per
    `sync_interval` seconds and on close(): an OS crash may lose the last interval's lines.
    """

    def __init__(self, path: Path, sync_interval: float = SYNC_INTERVAL_S):
        self._file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
        self._interval = sync_interval
        self._synced = time.monotonic()

    def append(self, entry: dict) -> None:
        """One participant line; a resume skips that participant once this returns."""
        self._file.write(json.dumps(entry, sort_keys=True) + "\n")
        self._file.flush()
        now = time.monotonic()
        if now - self._synced >= self._interval:
            os.fsync(self._file.fileno())
            self._synced = now

    def close(self) -> None:
        """Flush, fsync and close (idempotent)."""
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()


def read_journal(path: str | os.PathLike) -> tuple[dict | None, list[dict]]:
    """(header, participant entries) of the store's build journal; (None, []) if none.

    A torn last line (the writer was killed while appending it) is dropped and cut from
    the file, so the next append starts on a clean line.
    """
    journal = Path(path) / JOURNAL
    if not journal.is_file():
        return None, []
    data = journal.read_bytes()
    header, entries, good = None, [], 0
    for line in data.splitlines(keepends=True):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("torn line")
            rec = json.loads(line)
        except ValueError:
            break
        good += len(line)
        if rec.get("type") == "header":
            header = rec
        else:
            entries.append(rec)
    if good != len(data):
        with open(journal, "r+b") as f:
            f.truncate(good)
    return header, entries


def jsonable_rows(df: pd.DataFrame) -> list[dict]:
    """DataFrame rows as JSON-able dicts (NaN -> None) for the journal."""
    out = []
    for rec in df.to_dict("records"):
        clean = {}
        for k, v in rec.items():
            if isinstance(v, (np.integer,)):
                v = int(v)
            elif isinstance(v, (float, np.floating)):
                v = None if np.isnan(v) else float(v)
            clean[k] = v
        out.append(clean)
    return out

