"""Build (or extend) a Zarr slice store from a cohort's DICOM tree and tables.

    export THIGHMRI_SALT=...   # or --salt-file salt.txt; see data_prep/pseudonyms.py:load_salt
    python data_prep/build_store.py --dicom synth/oai/dicom --tables synth/oai/tables \
        --cohort oai --out data/demo.zarr --size 128x256
    python data_prep/build_store.py --dicom synth/somma/dicom --tables synth/somma/tables \
        --cohort somma --out data/demo.zarr --size 128x256 --append
    python data_prep/build_store.py --verify data/demo.zarr

Each folder under the DICOM root's visit folder (`--visit`, default the spec's own visit;
e.g. `00m`), one level deep or `dicom.participant_depth` deep (batch folders), is one
participant (cohorts.participant_folders). Every unusable file or participant (reasons:
store.REASONS) is listed in the store's `ingest_problems` and in
`<store>.ingest_report.csv`, and the build goes on. Nothing printed names a participant by
anything but its pseudonym.

Participants are read, preprocessed, hashed and their slices compressed in parallel
(`--workers` processes, at most 2 x workers in flight; data_prep/ingest_worker.py); each
worker writes a participant's whole shard file (data_prep/shards.py) into the store's
staging folder, and this process alone assigns offsets in sorted folder order, renames the shard into place and writes the
journal: the store and its content hash are the same for any worker count. Interrupted
(killed, crashed)? Rerun the same command: it resumes from the store's journal and skips
finished participants. The store is marked complete only at the very end; until then
`open_store` refuses it.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import hmac
import json
import os
import shutil
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: data_prep from this checkout, not data_prep/
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import numpy as np
import pandas as pd
from tqdm import tqdm

from data_prep.cohorts import (MEASURES, CohortSpec, CohortSpecError, apply_column_overrides,
                               builtin_specs, load_cohort_table, load_spec, participant_folders,
                               select_visit)
from data_prep.ingest.worker import (ParticipantResult, classify_series_error,  # noqa: F401
                                     ordered_results, process_participant)
from data_prep.preprocess import Recipe
from data_prep.pseudonyms import SaltError, load_salt, pseudonym
from data_prep.store import (StoreError, StoreWriter, ingest_report_path, open_store,
                             read_journal, verify_store)
from data_prep.store.journal import jsonable_rows

# Seconds to pause after each participant is journaled: lets tests interrupt a build midway.
DELAY_ENV = "THIGHMRI_INGEST_DELAY_S"
SPACE_MARGIN = 64 << 20  # bytes kept free beyond the estimate: metadata, reports, journal
DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def space_needed(n_participants: int, recipe: Recipe, workers: int) -> int:
    """Bytes a build may write: every participant's slices in the recipe's dtype before
    compression (lz4 usually stores 85-90% of them), the shards in flight, and a margin."""
    shard = recipe.n_slices * recipe.size[0] * recipe.size[1] * np.dtype(recipe.dtype).itemsize
    return (n_participants + 2 * workers) * shard + SPACE_MARGIN


def check_free_space(out: Path, n_participants: int, recipe: Recipe, workers: int) -> None:
    """Refuse, before any participant is read, a build that the disk under `out` cannot hold."""
    need = space_needed(n_participants, recipe, workers)
    free = shutil.disk_usage(out).free
    if free < need:
        raise StoreError(
            f"{out}: this build may need {need / 2**30:.2f} GiB ({n_participants} participants "
            f"x {recipe.n_slices} slices of {recipe.size[0]}x{recipe.size[1]} {recipe.dtype} before "
            f"compression) and its disk has {free / 2**30:.2f} GiB free. Free space, build "
            "elsewhere (--out), or pass --skip-space-check if you know the slices compress well")


def build_key(*, spec: CohortSpec, recipe: Recipe, salt: bytes, folder_ids: list[str],
              table: pd.DataFrame) -> str:
    """Fingerprint of one build's inputs: a rerun resumes only when it is unchanged.

    "<cohort>:<hmac>" over recipe, DICOM conventions, the participant folders (as
    pseudonyms) and the canonical table; keyed with the salt so it reveals nothing.
    """
    h = hmac.new(salt, digestmod=hashlib.sha256)
    h.update(json.dumps({"recipe": recipe.to_dict(), "dicom": spec.dicom, "spec": spec.source,
                         "folders": folder_ids}, sort_keys=True, default=str).encode())
    h.update(table.sort_index().to_csv().encode())
    return f"{spec.name}:{h.hexdigest()[:32]}"


def build(*, dicom: Path, tables: Path, spec: CohortSpec, out: Path, recipe: Recipe,
          salt: bytes, workers: int = 1, append: bool = False, overwrite: bool = False,
          resume: bool = True, progress: bool = True, space_check: bool = True
          ) -> dict[str, Any]:
    """Ingest one cohort into the store at `out`; returns the build summary.

    Participants are processed in sorted folder order (in parallel with `workers`
    processes, which also compress the slices) and written in that order by this process
    alone, so the store is identical for any worker count. A rerun after an interruption
    resumes from the store's journal. Unless `space_check` is False, a build the disk
    cannot hold (check_free_space) is refused before any participant is read.
    """
    t0 = time.perf_counter()
    table, table_report = load_cohort_table(spec, tables)
    root = dicom / spec.visit_folder if spec.visit_folder else dicom
    folders = participant_folders(dicom, spec)
    folder_ids = [pseudonym(salt, spec.name, f.name) for f in folders]
    stray = sorted(p for p in root.iterdir() if p.is_file())
    problems: list[dict[str, Any]] = [
        {"source": f"<dicom root>/file#{i}", "reason": "not_dicom",
         "detail": "file outside participant folders", "skipped": False}
        for i, _ in enumerate(stray)]

    key = build_key(spec=spec, recipe=recipe, salt=salt, folder_ids=folder_ids, table=table)
    writer = StoreWriter.start(out, recipe, build_key=key, append=append, overwrite=overwrite,
                               resume=resume)
    done = writer.entries
    if [e["folder"] for e in done] != folder_ids[:len(done)]:
        raise StoreError(f"{out}: the build journal does not match the participant folders; "
                         "pass --overwrite (or --no-resume) to start again")
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    jobs = [(f, spec.description_patterns, recipe, writer.staged_path(len(done) + i))
            for i, f in enumerate(folders[len(done):])]
    if space_check:
        check_free_space(out, len(jobs), recipe, workers)
    rows = _table_rows(table)
    results = ordered_results(jobs, workers)
    bar = tqdm(total=len(folders), initial=len(done), desc=f"ingest {spec.name}",
               unit="participant", file=sys.stderr, disable=not progress)
    try:
        for res in results:
            entry = _entry(res, salt, spec, rows, writer)
            ingest = bool(entry.get("row"))
            writer.add(entry, res.images if ingest else None, res.stats, res.digests,
                       staged=res.staged if ingest else None)
            bar.update(1)
            if delay:
                time.sleep(delay)
    finally:
        bar.close()
        results.close()  # shuts the pool down when the loop is left early

    for e in writer.entries:
        problems += e["problems"]
    seen = {k for e in writer.entries for k in e["keys"]}
    for k in sorted(table.index):
        pid = pseudonym(salt, spec.name, k)
        if pid not in seen:
            problems.append({"source": pid, "reason": "table_only",
                             "detail": "table row without a DICOM folder", "skipped": True})
    ingested = [e["row"] for e in writer.entries if e.get("row")]
    fields = ("sex", "age", "bmi", *MEASURES, "exercise")
    summary = {
        "spec": spec.source, "visit": spec.visit, "visit_folder": spec.visit_folder,
        "series_description": spec.description_patterns,
        "n_table_rows": int(len(table)), "n_participant_folders": len(folders),
        "n_ingested": len(ingested), "n_slices": len(ingested) * recipe.n_slices,
        "n_table_rows_without_images": int(len(table)) - len(ingested),
        "measures_non_missing": {m: sum(r.get(m) is not None and r.get(m) == r.get(m)
                                        for r in ingested) for m in fields},
        "table_report": table_report,
    }
    provenance = {
        "tool": "data_prep/build_store.py", "cohort": spec.name, "spec": spec.source,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code_version": _code_version(),
    }
    n_resumed = writer.n_resumed
    digest = writer.finish(cohort=spec.name, cohort_summary=summary, ingest_problems=problems,
                           provenance=provenance)
    summary.update(content_hash=digest, seconds=round(time.perf_counter() - t0, 2),
                   problems_by_reason=dict(Counter(p["reason"] for p in problems)),
                   n_resumed=n_resumed, n_processed=len(jobs),
                   store_subjects=len(writer.rows), store_slices=writer.n_slices,
                   ingest_report=str(ingest_report_path(out)))
    return summary


def _entry(res: ParticipantResult, salt: bytes, spec: CohortSpec, table: dict[str, dict],
           writer: StoreWriter) -> dict[str, Any]:
    """The journal entry (pseudonyms only) for one participant's result; `table` maps each
    table key to its row as JSON-able values (`_table_rows`)."""
    folder_pid = pseudonym(salt, spec.name, res.folder)
    key = res.key if res.key is not None else res.folder
    pid = pseudonym(salt, spec.name, key)
    keys = sorted({pseudonym(salt, spec.name, k) for k in (*res.keys_seen, res.folder)})
    problems = [{"source": pid if p["file"] is None else f"{pid}/file#{p['file']}",
                 "reason": p["reason"], "detail": p["detail"], "skipped": p["fatal"]}
                for p in res.problems]
    entry: dict[str, Any] = {"folder": folder_pid, "keys": keys, "problems": problems}
    if any(p["fatal"] for p in res.problems):
        return entry
    if key not in table:
        problems.append({"source": pid, "reason": "no_table_row",
                         "detail": "no row with this key in the cohort tables", "skipped": True})
        return entry
    if writer.has_subject(pid):
        problems.append({"source": pid, "reason": "duplicate",
                         "detail": "already in the store (same cohort and key)", "skipped": True})
        return entry
    row = dict(table[key])
    row.update(subject_id=pid, cohort=spec.name, pixel_spacing_row_mm=float(res.spacing[0]),
               pixel_spacing_col_mm=float(res.spacing[1]))
    entry["row"] = row
    return entry


def _table_rows(table: pd.DataFrame) -> dict[str, dict]:
    """{key: row as JSON-able values}: one pass instead of a `.loc` per participant."""
    return dict(zip(table.index, jsonable_rows(table)))


def _code_version() -> str:
    try:
        from importlib.metadata import version
        return version("thighmri")
    except Exception:  # noqa: BLE001 - not installed: running from a checkout
        return "unknown"


def parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--size must look like ROWSxCOLS (e.g. 128x256), got {text!r}")
    return int(parts[0]), int(parts[1])


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dicom", type=Path, help="cohort DICOM root (e.g. synth/oai/dicom)")
    p.add_argument("--tables", type=Path, help="cohort tables root (e.g. synth/oai/tables)")
    p.add_argument("--cohort", help=f"built-in spec {builtin_specs()} or a spec YAML path")
    p.add_argument("--out", type=Path, help="Zarr store to create (or extend with --append)")
    p.add_argument("--salt-file", type=Path, help="pseudonym salt file (default: $THIGHMRI_SALT)")
    p.add_argument("--size", default="256x512", help="output ROWSxCOLS (default 256x512)")
    p.add_argument("--n-slices", type=int, default=15, help="central slices kept (default 15)")
    p.add_argument("--p-low", type=float, default=0.5, help="lower clip percentile")
    p.add_argument("--p-high", type=float, default=99.5, help="upper clip percentile")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="parallel processes reading DICOM (default: min(4, CPUs))")
    p.add_argument("--append", action="store_true", help="add this cohort to an existing store")
    p.add_argument("--no-resume", action="store_true",
                   help="do not resume an interrupted build of the same inputs (needs "
                        "--overwrite for a new store); by default a rerun resumes")
    p.add_argument("--visit", help="visit to ingest, one of the spec's `visits` (e.g. 24m); it "
                   "picks the DICOM folder and the table columns together (default: the "
                   "spec's own visit)")
    p.add_argument("--column", action="append", default=[], metavar="FIELD=COLUMN",
                   help="override the spec's column for a canonical field (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--skip-space-check", action="store_true",
                   help="start even when the disk has less free space than the slices need "
                        "uncompressed")
    p.add_argument("--verify", type=Path, metavar="STORE", help="check a store and exit")
    return p


def _resumable(out: Path) -> bool:
    """True when `out` holds an interrupted build (incomplete, with a journal)."""
    header, _ = read_journal(out)
    if header is None:
        return False
    try:
        open_store(out)
    except StoreError:
        return True
    return False


def _print_summary(s: dict[str, Any], out: Path) -> None:
    if s["n_resumed"]:
        print(f"resumed an interrupted build: {s['n_resumed']} participants were already "
              f"done, {s['n_processed']} processed now")
    print(f"store {out}: {s['store_subjects']} subjects, {s['store_slices']} slices in total")
    print(f"this build ({s['spec']}): {s['n_ingested']} participants ingested, "
          f"{s['n_slices']} slices, from {s['n_participant_folders']} DICOM folders and "
          f"{s['n_table_rows']} table rows ({s['n_table_rows_without_images']} rows not ingested)")
    if s["problems_by_reason"]:
        print(f"problems (details: {s['ingest_report']}, and the store's ingest_problems):")
        for reason, n in sorted(s["problems_by_reason"].items()):
            print(f"  {n:5d}  {reason}")
    print("non-missing values among ingested participants:")
    for m, n in s["measures_non_missing"].items():
        print(f"  {m:18s} {n}")
    print(f"content_hash {s['content_hash']}  ({s['seconds']} s)")


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.verify is not None:
        if not args.verify.exists():
            parser.error(f"--verify: {args.verify} does not exist")
        problems = verify_store(args.verify)
        for p in problems:
            print(f"PROBLEM: {p}")
        print(f"{args.verify}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
        return 0 if not problems else 1

    errors, spec, size = [], None, None
    for name in ("dicom", "tables", "cohort", "out"):
        if getattr(args, name) is None:
            errors.append(f"--{name} is required (or use --verify STORE)")
    for name in ("dicom", "tables"):
        path = getattr(args, name)
        if path is not None and not path.is_dir():
            errors.append(f"--{name} {path} is not a directory")
    if args.cohort is not None:
        try:
            spec = apply_column_overrides(select_visit(load_spec(args.cohort), args.visit),
                                          args.column or [])
        except (CohortSpecError, ValueError) as exc:
            errors.append(str(exc))
    if spec is not None and args.dicom is not None and args.dicom.is_dir():
        try:
            participant_folders(args.dicom, spec)  # the visit folder (and batches) exist
        except (CohortSpecError, OSError) as exc:
            errors.append(f"{exc} (under --dicom {args.dicom})")
    try:
        size = parse_size(args.size)
    except ValueError as exc:
        errors.append(str(exc))
    recipe = None
    if size is not None:
        try:
            recipe = Recipe(n_slices=args.n_slices, size=size, p_low=args.p_low,
                            p_high=args.p_high)
        except ValueError as exc:
            errors.append(str(exc))
    if args.workers < 1:
        errors.append(f"--workers must be >= 1, got {args.workers}")
    if args.out is not None:
        if args.append and args.overwrite:
            errors.append("--append and --overwrite exclude each other")
        elif args.append and not args.out.exists():
            errors.append(f"--append: {args.out} does not exist")
        elif (not args.append and args.out.exists() and not args.overwrite
              and (args.no_resume or not _resumable(args.out))):
            errors.append(f"--out {args.out} exists: pass --append to add a cohort or "
                          "--overwrite to replace it")
        if not args.out.parent.is_dir():
            errors.append(f"--out: parent folder {args.out.parent} does not exist")
    salt = None
    try:
        salt = load_salt(args.salt_file)
    except SaltError as exc:
        errors.append(str(exc))
    if errors:
        parser.error("\n  " + "\n  ".join(errors))

    try:
        summary = build(dicom=args.dicom, tables=args.tables, spec=spec, out=args.out,
                        recipe=recipe, salt=salt, workers=args.workers, append=args.append,
                        overwrite=args.overwrite, resume=not args.no_resume,
                        progress=not args.no_progress, space_check=not args.skip_space_check)
    except (StoreError, CohortSpecError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        _, done = read_journal(args.out)
        print(f"error: the disk holding {args.out} is full ({exc.strerror}). {len(done)} "
              "participant folder(s) of this build are safely in the store's journal: free "
              "space and rerun the same command to resume from there.", file=sys.stderr)
        return 1
    _print_summary(summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
