"""Build (or extend) a Zarr slice store from a cohort's DICOM tree and tables.

    export THIGHMRI_SALT=...   # or --salt-file salt.txt; see data_prep/pseudonyms.py:load_salt
    python data_prep/build_store.py --dicom synth/oai/dicom --tables synth/oai/tables \
        --cohort oai --out data/demo.zarr --size 128x256
    python data_prep/build_store.py --dicom synth/somma/dicom --tables synth/somma/tables \
        --cohort somma --out data/demo.zarr --size 128x256 --append
    python data_prep/build_store.py --verify data/demo.zarr

Participants are found by header, not by folder: every file under the visit's folder
(`--visit`, default the spec's own, e.g. `00m`), at any depth and in any folders (OAI's
`<visit>/<batch>/<ID>/<date>/<series>/<image>`, `<ID>/<visit>/<series>/...`), is grouped by
its PatientID (data_prep/dicom/participants.py), so a participant split over two batch
folders is one participant. Every table row and every DICOM participant that does not become
a subject, and every unusable file, is listed with a category (store/schema.py REASONS) in
the store's `ingest_problems` and in `<store>.ingest_report.csv`; the build goes on, prints
the counts per category, and ends with a WARNING when more than --max-rows-without-images of
the table rows found no images. Nothing printed names a participant by anything but its
pseudonym.

This file is the command line; the build is data_prep/ingest/ (builder.py: steps, in
parallel over `--workers` processes, resumable: rerun the same command after a kill or a
full disk). The store is marked complete only at the very end; until then `open_store`
refuses it.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: data_prep from this checkout, not data_prep/
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from data_prep.cohorts import (CohortSpecError, apply_column_overrides, builtin_specs,
                               load_spec, select_visit)
from data_prep.dicom.participants import DicomTreeError, participant_tag, scan_root
from data_prep.ingest import build, summary_lines
from data_prep.preprocess import Recipe
from data_prep.pseudonyms import SaltError, load_salt
from data_prep.store import StoreError, is_url, open_store, read_journal, verify_store

DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


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
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it shows only when stderr is a terminal)")
    p.add_argument("--max-rows-without-images", type=float, default=0.0, metavar="SHARE",
                   help="share of table rows that may find no images before the build ends "
                        "with a WARNING (default 0: any; e.g. 0.05)")
    p.add_argument("--skip-space-check", action="store_true",
                   help="start even when the disk has less free space than the slices need "
                        "uncompressed")
    p.add_argument("--verify", metavar="STORE",
                   help="check a store (a folder, or a URL such as s3://bucket/study.zarr) and exit")
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
    """The end of a build, most important last: what was ingested, what was not and why."""
    if s["n_resumed"]:
        print(f"resumed an interrupted build: {s['n_resumed']} participants were already "
              f"done, {s['n_processed']} processed now")
    print(f"store {out}: {s['store_subjects']} subjects, {s['store_slices']} slices in total")
    where = f"the folder {s['visit_folder']!r}" if s["visit_folder"] else "--dicom"
    outside = (f"; {s['n_files_outside_visit']} files outside {where} not read"
               if s["n_files_outside_visit"] else "")
    visit = f", visit {s['visit']}" if s["visit"] else ""
    print(f"this build ({s['spec']}{visit}): {s['n_ingested']} participants "
          f"ingested, {s['n_slices']} slices; {s['n_dicom_participants']} participants found "
          f"by {s['participant_tag']} in {s['n_dicom_files']} files under {where}{outside}")
    for measure, columns in s["measures_absent"].items():
        print(f"measure not in this release: {measure} (columns {', '.join(columns)} are "
              "not in the tables): left empty, recorded in the store")
    print("non-missing values among ingested participants:")
    for m, n in s["measures_non_missing"].items():
        print(f"  {m:18s} {n}")
    print("\n".join(summary_lines(s["accounting"], s["ingest_report"])))
    print(f"content_hash {s['content_hash']}  ({s['seconds']} s)")
    if s["warning"]:
        print(f"\n{s['warning']}")


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.verify is not None:
        if not is_url(args.verify) and not Path(args.verify).exists():
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
    if spec is not None:
        try:
            participant_tag(spec.participant_tag)
        except ValueError as exc:
            errors.append(str(exc))
    if spec is not None and args.dicom is not None and args.dicom.is_dir():
        try:
            scan_root(args.dicom, spec.visit_folder, spec.other_visit_folders)
        except (DicomTreeError, OSError) as exc:
            errors.append(f"cohort {spec.name}, visit {spec.visit or spec.visit_folder!r}: "
                          f"{exc}")
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
    if not 0.0 <= args.max_rows_without_images <= 1.0:
        errors.append("--max-rows-without-images is a share between 0 and 1, got "
                      f"{args.max_rows_without_images}")
    if args.out is not None and str(args.out).split("/")[0].endswith(":"):  # Path("s3://b/x") is "s3:/b/x"
        errors.append(f"--out {str(args.out).replace(':/', '://', 1)}: ingest writes a local store (it needs renames, fsync and its "
                      "journal to resume); build it locally, then copy it up and verify it with "
                      "`python data_prep/store/upload.py upload LOCAL URL`")
    elif args.out is not None:
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
                        progress=not args.no_progress, space_check=not args.skip_space_check,
                        max_rows_without_images=args.max_rows_without_images)
    except (StoreError, CohortSpecError, DicomTreeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        _, done = read_journal(args.out)
        print(f"error: the disk holding {args.out} is full ({exc.strerror}). {len(done)} "
              "participant(s) of this build are safely in the store's journal: free "
              "space and rerun the same command to resume from there.", file=sys.stderr)
        return 1
    _print_summary(summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
