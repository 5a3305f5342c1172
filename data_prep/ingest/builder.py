"""Build (or extend) a Zarr slice store from one cohort's DICOM tree and tables.

    from data_prep.ingest import build
    summary = build(dicom=Path("synth/oai/dicom"), tables=Path("synth/oai/tables"),
                    spec=load_spec("oai"), out=Path("data/demo.zarr"), recipe=Recipe(),
                    salt=load_salt(), workers=2)

The command line is data_prep/build_store.py. Steps, in order:
1. the cohort table (data_prep/cohorts/tables.py: canonical fields, absent measures);
2. participants by header (data_prep/dicom/participants.py: every file under the visit's
   folder at any depth, grouped by PatientID; in parallel);
3. the plan: participants in key order; those without a table row, or already in the store
   (append), are reported and never read; the disk space check;
4. the participants, in parallel (worker.py), written in plan order by this process alone,
   so the store and its content hash are the same for any worker count; resumable from
   the store's journal after a kill or a full disk;
5. the report (report.py): every table row and participant that did not become a subject,
   every unusable file, every choice between thigh series, with pseudonyms only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from data_prep.cohorts import MEASURES, CohortSpec, load_cohort_table
from data_prep.dicom.acquisition import ACQUISITION_FIELDS
from data_prep.dicom.participants import Participant, ParticipantScan, find_participants
from data_prep.ingest.report import account, warning
from data_prep.ingest.worker import Job, ParticipantResult, ordered_results, worker_pool
from data_prep.preprocess import Recipe
from data_prep.pseudonyms import pseudonym
from data_prep.store import StoreError, StoreWriter, ingest_report_path
from data_prep.store.journal import jsonable_rows

# Seconds to pause after each participant is journaled: lets tests interrupt a build midway.
DELAY_ENV = "THIGHMRI_INGEST_DELAY_S"
SPACE_MARGIN = 64 << 20  # bytes kept free beyond the estimate: metadata, reports, journal


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
            f"x {recipe.n_slices} slices of {recipe.size[0]}x{recipe.size[1]} {recipe.dtype} "
            f"before compression) and its disk has {free / 2**30:.2f} GiB free. Free space, build "
            "elsewhere (--out), or pass --skip-space-check if you know the slices compress well")


def build_key(*, spec: CohortSpec, recipe: Recipe, salt: bytes,
              participants: list[Participant], table: pd.DataFrame) -> str:
    """Fingerprint of one build's inputs: a rerun resumes only when it is unchanged.

    "<cohort>:<hmac>" over recipe, DICOM conventions, every participant's key and files
    and the canonical table; keyed with the salt and truncated, so it reveals nothing.
    """
    h = hmac.new(salt, digestmod=hashlib.sha256)
    h.update(json.dumps({"recipe": recipe.to_dict(), "dicom": spec.dicom, "spec": spec.source,
                         "visit": spec.visit}, sort_keys=True, default=str).encode())
    for p in participants:
        h.update(json.dumps([p.key, p.parts, p.problems]).encode())
    h.update(table.sort_index().to_csv().encode())
    return f"{spec.name}:{h.hexdigest()[:32]}"


def build(*, dicom: Path, tables: Path, spec: CohortSpec, out: Path, recipe: Recipe,
          salt: bytes, workers: int = 1, append: bool = False, overwrite: bool = False,
          resume: bool = True, progress: bool = True, space_check: bool = True,
          max_rows_without_images: float = 0.0) -> dict[str, Any]:
    """Ingest one cohort into the store at `out`; returns the build summary (JSON-able).

    Unless `space_check` is False, a build the disk cannot hold (check_free_space) is
    refused before any participant is read. `summary["warning"]` is set when more than
    `max_rows_without_images` (a share; 0: any) of the table rows found no images.
    """
    t0 = time.perf_counter()
    table, table_report = load_cohort_table(spec, tables)
    pool = worker_pool(workers)
    try:
        found = find_participants(
            dicom, visit_folder=spec.visit_folder, other_visit_folders=spec.other_visit_folders,
            tag=spec.participant_tag, participant_depth=spec.participant_depth,
            map_fn=pool.map if pool else map, workers=workers)
        summary = _ingest(found, table, table_report, spec=spec, out=out, recipe=recipe,
                          salt=salt, pool=pool, workers=workers, append=append,
                          overwrite=overwrite, resume=resume, progress=progress,
                          space_check=space_check,
                          max_rows_without_images=max_rows_without_images)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def _ingest(found: ParticipantScan, table: pd.DataFrame, table_report: dict, *,
            spec: CohortSpec, out: Path,
            recipe: Recipe, salt: bytes, pool, workers: int, append: bool, overwrite: bool,
            resume: bool, progress: bool, space_check: bool,
            max_rows_without_images: float) -> dict[str, Any]:
    """Steps 3-5 of the module docstring, once the participants are known."""
    participants = found.participants
    pid = {p.key: pseudonym(salt, spec.name, p.key) for p in participants}
    key = build_key(spec=spec, recipe=recipe, salt=salt, participants=participants,
                    table=table)
    writer = StoreWriter.start(out, recipe, build_key=key, append=append, overwrite=overwrite,
                               resume=resume)
    problems = _tree_problems(found, table_report)
    todo, skipped = _plan(participants, table, pid, writer)
    problems += skipped
    done = writer.entries
    if [e.get("participant") for e in done] != [pid[p.key] for p in todo[:len(done)]]:
        raise StoreError(f"{out}: the build journal does not match the participants found; "
                         "pass --overwrite (or --no-resume) to start again")
    jobs = [Job(p, spec.description_patterns, recipe, writer.staged_path(len(done) + i))
            for i, p in enumerate(todo[len(done):])]
    if space_check:
        check_free_space(out, len(jobs), recipe, workers)
    rows = dict(zip(table.index, jsonable_rows(table)))  # one pass, not a .loc per participant
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    results = ordered_results(jobs, pool, workers)
    bar = tqdm(total=len(todo), initial=len(done), desc=f"ingest {spec.name}",
               unit="participant", file=sys.stderr,
               disable=None if progress else True)  # None: on a terminal only (quiet in logs)
    try:
        for res in results:
            entry = _entry(res, pid[res.key], spec, rows)
            ok = "row" in entry
            writer.add(entry, res.images if ok else None, res.stats, res.digests,
                       staged=res.staged if ok else None)
            bar.update(1)
            if delay:
                time.sleep(delay)
    finally:
        bar.close()
        results.close()  # cancels the jobs not started when the loop is left early

    for e in writer.entries:
        problems += e["problems"]
    seen = set(pid.values())
    row_pids = {k: pseudonym(salt, spec.name, k) for k in table.index}
    for k in sorted(table.index):
        if row_pids[k] not in seen:
            problems.append(_line(row_pids[k], "no_images", "table row, but no DICOM "
                                  f"participant with this {spec.participant_tag} among the "
                                  f"{len(participants)} found"))
    ingested = [e["row"] for e in writer.entries if e.get("row")]
    accounting = account(rows=row_pids.values(), participants=seen,
                         ingested=[r["subject_id"] for r in ingested], problems=problems,
                         n_rows_without_key=sum(map(len, table_report["rows_without_key"]
                                                    .values())))
    fields = ("sex", "age", "bmi", *MEASURES, "exercise")
    summary = {
        "spec": spec.source, "visit": spec.visit, "visit_folder": spec.visit_folder,
        "series_description": spec.description_patterns,
        "participant_tag": spec.participant_tag, "n_dicom_files": found.n_files,
        "n_files_outside_visit": found.n_outside_visit,
        "n_table_rows": int(len(table)), "n_dicom_participants": len(participants),
        "n_ingested": len(ingested), "n_slices": len(ingested) * recipe.n_slices,
        "n_table_rows_without_images": accounting["table_rows"]["not_ingested"].get(
            "no_images", 0),
        "measures_absent": table_report["absent_measures"],
        "measures_non_missing": {m: sum(r.get(m) is not None and r.get(m) == r.get(m)
                                        for r in ingested) for m in fields},
        "accounting": accounting, "table_report": table_report,
        # per ingested subject (pseudonym), the series' protocol values: the training range a
        # registered model carries (study/model_package.py); not part of the content hash
        "acquisition": {"fields": list(ACQUISITION_FIELDS), "by_subject": {
            e["row"]["subject_id"]: [e["acquisition"].get(f) for f in ACQUISITION_FIELDS]
            for e in writer.entries if e.get("row") and e.get("acquisition")}},
        "warning": warning(accounting, max_rows_without_images, spec.visit_folder),
    }
    provenance = {
        "tool": "data_prep/build_store.py", "cohort": spec.name, "spec": spec.source,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code_version": _code_version(),
    }
    n_resumed = writer.n_resumed
    digest = writer.finish(cohort=spec.name, cohort_summary=summary, ingest_problems=problems,
                           provenance=provenance)
    summary.update(content_hash=digest, n_resumed=n_resumed, n_processed=len(jobs),
                   store_subjects=len(writer.rows), store_slices=writer.n_slices,
                   ingest_report=str(ingest_report_path(out)))
    return summary


def _plan(participants: list[Participant], table: pd.DataFrame, pid: dict[str, str],
          writer: StoreWriter) -> tuple[list[Participant], list[dict[str, Any]]]:
    """(participants to read, in key order; report lines of those left out unread)."""
    journaled = {e.get("participant") for e in writer.entries}  # resumed: not duplicates
    todo, skipped = [], []
    for p in participants:
        if p.key not in table.index:
            skipped.append(_line(pid[p.key], "no_table_row", "no row with this key in the "
                                 "cohort tables: not read"))
        elif writer.has_subject(pid[p.key]) and pid[p.key] not in journaled:
            skipped.append(_line(pid[p.key], "duplicate", "already in the store (same "
                                 "cohort and key): not read"))
        else:
            todo.append(p)
    return todo, skipped


def _line(source: str, reason: str, detail: str, skipped: bool = True) -> dict[str, Any]:
    return {"source": source, "reason": reason, "detail": detail, "skipped": skipped}


def _tree_problems(found: ParticipantScan, table_report: dict) -> list[dict[str, Any]]:
    """Report lines for the problem files no participant could be given and the table
    rows with a blank key (no pseudonym exists for either)."""
    lines = [_line(f"<dicom root>/file#{i}", reason, detail, skipped=False)
             for i, (_, reason, detail) in enumerate(sorted(found.problems))]
    for file, numbers in table_report["rows_without_key"].items():
        lines += [_line(f"{file}#row{n}", "no_key", "blank key cell: cannot be matched to "
                        "images") for n in numbers]
    return lines


def _entry(res: ParticipantResult, pid: str, spec: CohortSpec, rows: dict[str, dict]
           ) -> dict[str, Any]:
    """The journal entry (pseudonyms only) for one participant's result; `rows` maps each
    table key to its row as JSON-able values."""
    problems = [_line(pid if p["file"] is None else f"{pid}/file#{p['file']}", p["reason"],
                      p["detail"], p["fatal"]) for p in res.problems]
    entry: dict[str, Any] = {"participant": pid, "problems": problems}
    if res.ok:
        entry["row"] = dict(rows[res.key], subject_id=pid, cohort=spec.name,
                            pixel_spacing_row_mm=float(res.spacing[0]),
                            pixel_spacing_col_mm=float(res.spacing[1]))
        entry["acquisition"] = res.acquisition  # kept in the journal: a resumed build has it
    return entry


def _code_version() -> str:
    try:
        from importlib.metadata import version
        return version("thighmri")
    except Exception:  # noqa: BLE001 - not installed: running from a checkout
        return "unknown"
