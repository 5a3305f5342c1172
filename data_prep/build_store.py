"""Build (or extend) a Zarr slice store from a cohort's DICOM tree and tables.

    export THIGHMRI_SALT=...   # or --salt-file salt.txt; see data_prep/store.py:load_salt
    python data_prep/build_store.py --dicom synth/oai/dicom --tables synth/oai/tables \
        --cohort oai --out data/demo.zarr --size 128x256
    python data_prep/build_store.py --dicom synth/somma/dicom --tables synth/somma/tables \
        --cohort somma --out data/demo.zarr --size 128x256 --append
    python data_prep/build_store.py --verify data/demo.zarr

Each folder directly under the DICOM root (after the spec's visit folder, e.g. `00m`) is one
participant. Participants without a usable axial thigh series or without a table row are
listed in the store's `ingest_problems` and skipped. Nothing printed names a participant by
anything but its pseudonym.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from tqdm import tqdm

from data_prep.cohorts import (MEASURES, CohortSpec, CohortSpecError, builtin_specs,
                               load_cohort_table, load_spec)
from data_prep.dicom_series import (DicomSeriesError, load_volume, scan_tree,
                                    select_thigh_series)
from data_prep.preprocess import Recipe, apply_recipe
from data_prep.store import (SaltError, StoreError, StoreWriter, load_salt, pseudonym,
                             verify_store)


@dataclass
class ParticipantResult:
    folder: str  # folder name under the DICOM root (PHI: in memory only)
    key: str | None  # PatientID from the chosen series (PHI: in memory only)
    images: np.ndarray | None = None
    stats: dict[str, Any] | None = None
    problems: list[dict[str, Any]] = field(default_factory=list)  # reason, detail, fatal


def process_participant(folder: Path, patterns: list[str], recipe: Recipe) -> ParticipantResult:
    """Scan one participant's folder, pick and load the thigh series, apply the recipe."""
    scan = scan_tree(folder)
    result = ParticipantResult(folder=folder.name, key=None)
    for s in scan.skipped:
        result.problems.append({"reason": f"file skipped: {s.reason}", "detail": "", "fatal": False})
    selection = select_thigh_series(scan.series, patterns)
    if selection.series is None:
        result.problems.append({"reason": "no axial thigh series", "detail": selection.note,
                                "fatal": True})
        return result
    series = selection.series
    result.key = series.patient_key or folder.name
    if len(selection.candidates) > 1:
        result.problems.append({"reason": "several thigh series", "detail": selection.note,
                                "fatal": False})
    keys = {s.patient_key for s in scan.series}
    if len(keys) > 1:
        result.problems.append({"reason": "several PatientIDs in one folder",
                                "detail": f"{len(keys)} distinct IDs; used the thigh series'",
                                "fatal": False})
    try:
        volume, _ = load_volume(series)
        result.images, result.stats = apply_recipe(volume, recipe)
    except (DicomSeriesError, ValueError) as exc:
        detail = str(exc)
        for i, path in enumerate(sorted(series.files)):  # file names may embed UIDs
            detail = detail.replace(path.name, f"file#{i}")
        result.problems.append({"reason": "unusable thigh series", "detail": detail,
                                "fatal": True})
    return result


def _process(args: tuple[Path, list[str], Recipe]) -> ParticipantResult:
    return process_participant(*args)


def build(*, dicom: Path, tables: Path, spec: CohortSpec, out: Path, recipe: Recipe,
          salt: bytes, workers: int = 1, append: bool = False, overwrite: bool = False,
          progress: bool = True) -> dict[str, Any]:
    """Ingest one cohort into the store at `out`; returns the build summary."""
    t0 = time.perf_counter()
    table, table_report = load_cohort_table(spec, tables)
    root = dicom / spec.visit_folder if spec.visit_folder else dicom
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    stray = [p for p in root.iterdir() if p.is_file()]
    problems: list[dict[str, Any]] = [
        {"source": "<dicom root>", "reason": "file outside participant folders", "detail": "",
         "skipped": True} for _ in stray]

    writer = (StoreWriter.append(out, recipe) if append
              else StoreWriter.create(out, recipe, overwrite=overwrite))
    jobs = [(f, spec.description_patterns, recipe) for f in folders]
    if workers > 1:
        pool = ProcessPoolExecutor(max_workers=workers)
        results = pool.map(_process, jobs, chunksize=1)
    else:
        pool, results = None, map(_process, jobs)
    ingested_keys: set[str] = set()
    try:
        for res in tqdm(results, total=len(jobs), desc=f"ingest {spec.name}", unit="participant",
                        file=sys.stderr, disable=not progress):
            key = res.key if res.key is not None else res.folder
            pid = pseudonym(salt, spec.name, key)
            fatal = False
            for p in res.problems:
                problems.append({"source": pid, "reason": p["reason"], "detail": p["detail"],
                                 "skipped": p["fatal"]})
                fatal |= p["fatal"]
            if fatal:
                continue
            if key not in table.index:
                problems.append({"source": pid, "reason": "no table row", "detail": "",
                                 "skipped": True})
                continue
            if writer.has_subject(pid):
                problems.append({"source": pid, "reason": "already in the store", "detail": "",
                                 "skipped": True})
                continue
            row = table.loc[key].to_dict()
            row.update(subject_id=pid, cohort=spec.name)
            writer.add_subject(row, res.images, res.stats)
            ingested_keys.add(key)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    ingested = table.loc[sorted(ingested_keys)]
    summary = {
        "spec": spec.source, "visit_folder": spec.visit_folder,
        "series_description": spec.description_patterns,
        "n_table_rows": int(len(table)), "n_participant_folders": len(folders),
        "n_ingested": len(ingested_keys), "n_slices": len(ingested_keys) * recipe.n_slices,
        "n_table_rows_without_images": int(len(table)) - len(ingested_keys),
        "measures_non_missing": {m: int(ingested[m].notna().sum())
                                 for m in ("sex", "age", "bmi", *MEASURES, "exercise")},
        "table_report": table_report,
    }
    provenance = {
        "tool": "data_prep/build_store.py", "cohort": spec.name, "spec": spec.source,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code_version": _code_version(),
    }
    digest = writer.finish(cohort=spec.name, cohort_summary=summary, ingest_problems=problems,
                           provenance=provenance)
    summary.update(content_hash=digest, seconds=round(time.perf_counter() - t0, 2),
                   problems_by_reason=dict(Counter(p["reason"] for p in problems)),
                   store_subjects=len(writer.rows), store_slices=writer.n_slices)
    return summary


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
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verify", type=Path, metavar="STORE", help="check a store and exit")
    return p


def _print_summary(s: dict[str, Any], out: Path) -> None:
    print(f"store {out}: {s['store_subjects']} subjects, {s['store_slices']} slices in total")
    print(f"this build ({s['spec']}): {s['n_ingested']} participants ingested, "
          f"{s['n_slices']} slices, from {s['n_participant_folders']} DICOM folders and "
          f"{s['n_table_rows']} table rows ({s['n_table_rows_without_images']} rows not ingested)")
    if s["problems_by_reason"]:
        print("problems (see the store's ingest_problems):")
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
            spec = load_spec(args.cohort)
        except CohortSpecError as exc:
            errors.append(str(exc))
    if spec is not None and spec.visit_folder and args.dicom is not None and args.dicom.is_dir():
        if not (args.dicom / spec.visit_folder).is_dir():
            errors.append(f"visit folder {spec.visit_folder!r} (from the {spec.name} spec) not "
                          f"found under --dicom {args.dicom}")
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
        elif not args.append and args.out.exists() and not args.overwrite:
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
                        overwrite=args.overwrite, progress=not args.no_progress)
    except (StoreError, CohortSpecError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _print_summary(summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
