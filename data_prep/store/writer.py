"""Writing a Zarr slice store: StoreWriter creates, appends to or resumes one (schema:
schema.py, reading: reader.py; ARCHITECTURE.md "Zarr store").

    from data_prep.store import StoreWriter
    writer = StoreWriter.start(path, recipe, build_key=key, append=False)
    writer.add(entry, staged=shard_path, stats=stats, digests=digests)   # per participant
    writer.finish(cohort=..., cohort_summary=..., ingest_problems=..., provenance=...)

Used by data_prep/ingest/builder.py. The journal (journal.py) makes a build resumable; shard
files come from the ingest workers (shards.py). Pseudonyms only:
nothing written here names a participant otherwise.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from data_prep.cohorts.spec import MEASURES
from data_prep.preprocess import Recipe
from data_prep.store.journal import (JOURNAL, JournalWriter, jsonable_rows, read_journal,
                                     write_journal_header)
from data_prep.store.reader import open_store
from data_prep.store.schema import (NORM_COLUMNS, REPORT_COLUMNS, SCHEMA_VERSION,
                                    STRING_COLUMNS, StoreError, content_hash,
                                    ingest_report_path, slice_digests, subjects_frame)
from data_prep.store.shards import (create_image_array, is_participant_sharded,
                                    remove_stray_shards, reset_staging, shard_key, write_shard)


class StoreWriter:
    """Streams subjects into a store, resumably; `finish()` writes `complete` last.

    `StoreWriter.start(path, recipe, build_key=..., append=...)` creates a store, prepares an
    append to a complete one, or resumes an interrupted build of the same `build_key` (a
    fingerprint of cohort, recipe, inputs and salt chosen by the caller). Progress lives in
    the journal `<store>/build_journal.jsonl`: a header line (the build key and, for an
    append, the store's previous table and attributes) and one line per participant read,
    written after that participant's image file is in place. Image files are the only data
    written before `finish()`; the slice index arrays, tables and attributes are rewritten
    from the journal by `finish()`, so a kill at any point (even inside finish) leaves a store
    that `open_store` refuses and the next `start` completes, with the previous cohorts'
    slices untouched. The journal holds pseudonyms only (no PHI).

    Sharded stores (`sharded`; shards.py): a worker writes a participant's shard
    into `<store>/build_staging/` (`staged_path`) and `add(..., staged=...)` only renames it
    to `images/c.<k>.0.0`. The images array's shape is set once, by `finish()` (which also
    deletes stray shards of participants never journaled), so in an unfinished store it is
    not meaningful (for an append it stays the previous size). Stores of the older layout
    (one chunk per slice) are written through zarr (`images=`), resized per participant.

    Durability: journal lines are flushed at once, fsynced at most about once per second and
    at `finish()`; image files are not fsynced. A killed process loses nothing journaled. An
    OS crash or power loss may lose the last second of journal lines (those participants are
    redone on resume) and damage journaled slices: `build_store.py --verify` (it re-hashes
    every slice against `slice_digest`) checks a store that survived one.
    """

    def __init__(self, path: Path, root: zarr.Group, recipe: Recipe, header: dict,
                 entries: list[dict]):
        self.path = path
        self.root = root
        self.recipe = recipe
        self.header = header
        self.entries = entries  # journaled participant entries of this build, in order
        self.n_resumed = len(entries)
        base = header["base"]
        self.rows = [dict(r) for r in base["rows"]]
        self.norm = [dict(r) for r in base["norm"]]
        for e in entries:
            if e.get("slice_count"):
                self.rows.append(dict(e["row"], slice_start=e["slice_start"],
                                      slice_count=e["slice_count"]))
                self.norm.append(dict(e["norm"]))
        self.n_slices = int(base["n_slices"]) + sum(int(e.get("slice_count") or 0)
                                                    for e in entries)
        # sha256 of every slice's bytes, in store order: the content hash is built from
        # these, so finish() need not read the images back
        self.digests = list(base.get("digests", [])) + [d for e in entries
                                                        for d in e.get("digests", [])]
        self._ids = {r["subject_id"] for r in self.rows}
        # Runtime config is not persisted: re-apply it on every open for writing. Empty
        # chunks are written too, so a missing chunk always means "never written".
        self.images = root["images"].with_config({"write_empty_chunks": True})
        self.sharded = is_participant_sharded(self.images, recipe)
        # files of participants that were not journaled before a kill: dropped (sharded: a
        # leftover shard beyond the journaled ones is replaced, or deleted by finish())
        self.staging = reset_staging(path, create=self.sharded)
        if not self.sharded and self.images.shape[0] != self.n_slices:
            self.images.resize((self.n_slices, *recipe.size))
        self._journal = JournalWriter(path / JOURNAL)

    @property
    def journal_path(self) -> Path:
        return self.path / JOURNAL

    def staged_path(self, job: int) -> Path | None:
        """Where a worker writes job `job`'s shard (shards.write_shard) for `add(staged=)`;
        None when this store's images are not sharded (then pass `images` to add)."""
        return self.staging / f"{job}.shard" if self.sharded else None

    @classmethod
    def start(cls, path: str | os.PathLike, recipe: Recipe, *, build_key: str,
              append: bool = False, overwrite: bool = False, resume: bool = True
              ) -> StoreWriter:
        """Create, append to, or resume the store at `path` (see the class docstring).

        Raises:
            StoreError: the store exists (create without overwrite), is incomplete with a
                journal of another build, or has a different recipe (append).
        """
        path = Path(path)
        header, entries = read_journal(path)
        if header is not None:
            attrs = _root_attrs(path)
            interrupted = attrs is not None and attrs.get("complete") is not True
            same = header.get("build_key") == build_key and header.get("append") == append
            if interrupted and same and resume:
                root = zarr.open_group(str(path), mode="r+")
                return cls(path, root, recipe, header, entries)
            if interrupted and not overwrite:
                what = "an append" if header.get("append") else "a build"
                raise StoreError(
                    f"{path} holds {what} of cohort {header.get('cohort')!r} that was "
                    "interrupted, with other inputs or settings than this one. Rerun that "
                    "command to finish it (it resumes), or pass --overwrite to start again"
                    + (" (the store's previous cohorts are then lost)." if header.get("append")
                       else "."))
        if append:
            store = open_store(path)  # must be complete: never append onto a half-written store
            if store.recipe != recipe:
                raise StoreError(
                    f"Cannot append: the store's recipe {store.recipe.to_dict()} differs from "
                    f"this build's {recipe.to_dict()}. One store holds one recipe; build a "
                    "new store.")
            rows = jsonable_rows(store.subjects)
            norm = jsonable_rows(store.normalisation)
            base = {"n_slices": int(store.images.shape[0]), "rows": rows, "norm": norm,
                    "digests": [bytes(d).hex() for d in store.root["slice_digest"][:]],
                    "attrs": {k: store.attrs.get(k) for k in
                              ("cohorts", "ingest_problems", "provenance")}}
            root = zarr.open_group(str(path), mode="r+")
            write_journal_header(path, build_key, append, recipe, base)
            root.attrs["complete"] = False  # after the journal: a rerun can always resume
        else:
            if path.exists() and not overwrite:
                raise StoreError(f"{path} exists; remove it, pass overwrite, or append to it")
            if path.exists():
                shutil.rmtree(path)
            root = zarr.open_group(str(path), mode="w")
            root.attrs.update({"schema_version": SCHEMA_VERSION, "complete": False,
                               "recipe": recipe.to_dict()})
            create_image_array(root, recipe)  # one shard per participant
            base = {"n_slices": 0, "rows": [], "norm": [], "digests": [], "attrs": {}}
            write_journal_header(path, build_key, append, recipe, base)
        header, entries = read_journal(path)
        return cls(path, root, recipe, header, entries)

    def has_subject(self, subject_id: str) -> bool:
        return subject_id in self._ids

    def add(self, entry: dict[str, Any], images: np.ndarray | None = None,
            stats: dict[str, Any] | None = None, digests: list[str] | None = None,
            staged: str | os.PathLike | None = None) -> None:
        """Record one participant: its slices (if ingested), then its journal line.

        Args:
            entry: JSON-able, pseudonyms only: `participant` (pseudonym), `problems`, and
                for an ingested participant `row` (subject_id, cohort, canonical fields,
                pixel spacing).
            images: uint16 (n_slices, rows, cols) for an ingested participant, else None.
            stats: apply_recipe's stats (normalisation window) with `images` or `staged`.
            digests: `slice_digests(images)` if already computed (e.g. by a worker).
            staged: instead of `images` (sharded stores only, with `digests`): a shard file
                a worker wrote with `shards.write_shard(images, staged_path(job))`; it is
                renamed into place (`images/c.<k>.0.0`) before the journal line is written.
        """
        entry = dict(entry, index=len(self.entries), slice_count=0)
        if images is not None or staged is not None:
            n = self.recipe.n_slices
            expected = (n, *self.recipe.size)
            if staged is not None:
                if not self.sharded:
                    raise StoreError("this store's images are not one shard per participant "
                                     "(an older layout): pass the images, not a staged shard")
                if digests is None or len(digests) != n:
                    raise StoreError(f"a staged shard needs its {n} slice digests")
            elif images.dtype != np.uint16 or images.shape != expected:
                raise StoreError(f"images must be uint16 {expected}, got {images.dtype} "
                                 f"{images.shape}")
            row = entry["row"]
            if row["subject_id"] in self._ids:
                raise StoreError(f"subject {row['subject_id']} is already in the store")
            start = self.n_slices
            if self.sharded:
                if start % n:  # every participant has n slices and appends keep the recipe
                    raise StoreError(f"slice_start {start} is not a multiple of {n}")
                if staged is None:
                    staged = self.staging / "writer.shard"
                    write_shard(images, staged)
                os.replace(staged, self.path / "images" / shard_key(start // n))
            else:
                self.images.resize((start + n, *self.recipe.size))
                self.images[start:start + n] = images
            digests = list(digests) if digests is not None else slice_digests(images)
            entry.update(slice_start=start, slice_count=n, digests=digests,
                         norm={c: float(stats[c]) for c in NORM_COLUMNS})
            self.digests += digests
            self.rows.append(dict(row, slice_start=start, slice_count=n))
            self.norm.append(dict(entry["norm"]))
            self._ids.add(row["subject_id"])
            self.n_slices += n
        self._journal.append(entry)  # a resume skips it from now on
        self.entries.append(entry)

    def finish(self, *, cohort: str, cohort_summary: dict[str, Any],
               ingest_problems: list[dict[str, Any]], provenance: dict[str, Any]) -> str:
        """Write index arrays, tables, attributes, report CSV, hash; then `complete` last."""
        self._journal.close()
        n = self.n_slices
        if self.sharded:  # the images array's shape is set here only (see class docstring)
            if self.images.shape[0] != n:
                self.images.resize((n, *self.recipe.size))
            remove_stray_shards(self.path / "images", n // self.recipe.n_slices)
            shutil.rmtree(self.staging, ignore_errors=True)
        subjects = subjects_frame(self.rows)
        cfg = {"write_empty_chunks": True}
        slice_subject = np.repeat(np.arange(len(subjects), dtype=np.int32),
                                  subjects["slice_count"].to_numpy())
        slice_position = np.concatenate(
            [np.arange(c, dtype=np.int16) for c in subjects["slice_count"]] or
            [np.zeros(0, np.int16)])
        for name, values, fill in (("slice_subject", slice_subject, -1),
                                   ("slice_position", slice_position, -1)):
            arr = self.root.create_array(name, shape=(n,), chunks=(max(1, min(n, 65536)),),
                                         dtype=values.dtype, fill_value=fill, config=cfg,
                                         overwrite=True)
            if n:
                arr[:] = values
        digests = np.frombuffer(bytes.fromhex("".join(self.digests)), dtype=np.uint8)
        arr = self.root.create_array("slice_digest", shape=(n, 32), chunks=(max(1, n), 32),
                                     dtype="uint8", fill_value=0, config=cfg, overwrite=True)
        if n:
            arr[:] = digests.reshape(n, 32)
        _write_table(self.root, "subjects", subjects, strings=STRING_COLUMNS)
        _write_table(self.root, "normalisation", pd.DataFrame(self.norm, columns=NORM_COLUMNS))
        base = self.header["base"]["attrs"]
        cohorts = dict(base.get("cohorts") or {})
        cohorts[cohort] = cohort_summary
        problems = list(base.get("ingest_problems") or [])
        problems += [dict(p, cohort=cohort) for p in ingest_problems]
        history = list((base.get("provenance") or {}).get("builds", []))
        history.append(provenance)
        counts = {
            "subjects": int(len(subjects)), "slices": int(n),
            "per_cohort": {str(k): int(v) for k, v in subjects["cohort"].value_counts()
                           .sort_index().items()},
            "ingest_problems": len(problems),
        }
        self.root.attrs.update({
            "measures": MEASURES, "cohorts": cohorts, "counts": counts,
            "ingest_problems": problems, "provenance": {"builds": history},
        })
        write_ingest_report(problems, ingest_report_path(self.path))
        digest = content_hash(self.root, self.recipe, subjects, digests=self.digests)
        self.root.attrs["content_hash"] = digest
        self.root.attrs["complete"] = True  # last: everything above is on disk
        self.journal_path.unlink(missing_ok=True)
        return digest


def _root_attrs(path: Path) -> dict | None:
    try:
        return dict(zarr.open_group(str(path), mode="r").attrs)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None


def write_ingest_report(problems: list[dict[str, Any]], csv_path: Path) -> None:
    """All ingest problems of the store as CSV (pseudonyms and relative paths only)."""
    df = pd.DataFrame(problems, columns=list(REPORT_COLUMNS))
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, csv_path)


def _write_table(root: zarr.Group, name: str, df: pd.DataFrame, strings: tuple = ()) -> None:
    group = root.create_group(name, overwrite=True)
    group.attrs.update({
        "columns": list(df.columns),
        "strings": {c: [None if v is None else str(v) for v in df[c]] for c in strings},
        "n_rows": int(len(df)),
    })
    for c in df.columns:
        if c in strings:
            continue
        values = df[c].to_numpy()
        group.create_array(c, shape=values.shape, chunks=(max(1, len(values)),),
                           dtype=values.dtype, fill_value=0)
        if len(values):
            group[c][:] = values
