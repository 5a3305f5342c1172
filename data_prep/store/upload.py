"""Copy a finished store up to object storage and verify the copy there (read-only afterwards).

    python data_prep/store/upload.py upload data/study.zarr s3://lab-bucket/study.zarr
    python data_prep/store/upload.py verify s3://lab-bucket/study.zarr
    thigh-store upload data/study.zarr s3://lab-bucket/study.zarr     # the console script

Exit codes: 0 the copy verifies clean; 1 it has problems (listed); 2 refused (the local store
has problems, another store is at the URL, or the object storage refused access).

Ingest writes a local store (renames, fsyncs and a journal, which object storage does not
offer); this copies a finished one up: every file, the root metadata (`zarr.json`) last, so
that an interrupted copy is not a store at all, and then verifies the copy in place with the
same checks as `build_store.py --verify`, including the content hash recomputed from the
uploaded slices. Credentials come from the environment (remote.py), never from the URL.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: make the repo's packages importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import os
import posixpath
import sys
from pathlib import Path

from tqdm import tqdm

from data_prep.store.reader import open_store
from data_prep.store.remote import ROOT_METADATA, filesystem, redact
from data_prep.store.schema import StoreError, ingest_report_path
from data_prep.store.verify import verify_store


def upload_store(local: str | os.PathLike, url: str, *, progress: bool | None = None) -> list[str]:
    """Copy a finished local store to object storage, then verify the copy there.

    The local store must verify clean first. Every object is uploaded before the root
    metadata (`zarr.json`), so a copy interrupted half way is not a store at all; the
    ingest report CSV goes beside it (`<url>.ingest_report.csv`). An existing store at the
    URL is refused unless it already holds the same content hash (then nothing is copied).
    `progress`: a bar of bytes sent (None: only on a terminal).

    Returns:
        the problems verify_store finds in the uploaded copy ([] when it is sound).

    Raises:
        StoreError: the local store has problems, or another store is at the URL.
    """
    local = Path(local)
    problems = verify_store(local)
    if problems:
        raise StoreError(f"{local} has {len(problems)} problem(s); fix or rebuild it before uploading:\n  - "
                         + "\n  - ".join(problems))
    digest = open_store(local).content_hash
    fs, base = filesystem(url)
    if fs.exists(posixpath.join(base, ROOT_METADATA)):
        there = open_store(url, cache_dir=None).content_hash
        if there != digest:
            raise StoreError(f"{url} already holds another store (content hash {there}, this one {digest}); "
                             "delete it first or choose another URL")
        return verify_store(url)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    last = local / ROOT_METADATA
    order = [p for p in files if p != last] + [last]
    total = sum(p.stat().st_size for p in order)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"upload to {url}",
              disable=None if progress is None else not progress) as bar:
        for p in order:
            fs.put_file(str(p), posixpath.join(base, p.relative_to(local).as_posix()))
            bar.update(p.stat().st_size)
    report = ingest_report_path(local)
    if report.is_file():
        fs.put_file(str(report), f"{base.rstrip('/')}.ingest_report.csv")
    return verify_store(url)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Copy a finished store to object storage and verify it there, "
                                            "or verify a store at a URL.")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upload", help="copy a local store up, then verify the copy")
    up.add_argument("local", help="a finished local store, e.g. data/study.zarr")
    up.add_argument("url", help="where it goes, e.g. s3://lab-bucket/study.zarr")
    ve = sub.add_parser("verify", help="check a store at a URL (as build_store.py --verify)")
    ve.add_argument("url")
    args = p.parse_args(argv)
    try:
        problems = (upload_store(args.local, args.url) if args.command == "upload" else verify_store(args.url))
    except StoreError as exc:
        print(redact(f"error: {exc}"), file=sys.stderr)
        return 2
    except OSError as exc:  # s3fs: PermissionError (credentials), FileNotFoundError (bucket), ...
        print(redact(f"error: {args.url}: {type(exc).__name__}: {exc}; credentials and endpoint come from the "
                     "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)"), file=sys.stderr)
        return 2
    for problem in problems:
        print(redact(f"  - {problem}"))
    print(f"{args.url}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
