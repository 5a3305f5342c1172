"""The ingest report: every table row and DICOM participant accounted for, with a category.

    from data_prep.ingest.report import account, summary_lines
    accounting = account(rows=row_pids, participants=dicom_pids, ingested=subject_pids,
                         problems=problems)
    print("\n".join(summary_lines(accounting, report_path)))

`problems` are the report's lines (store/schema.py REPORT_COLUMNS; categories REASONS):
pseudonyms, `<pseudonym>/file#k`, `<dicom root>/file#k` or `<table file>#row<k>` as
sources, never a name, ID or file name. `account` checks that every table row and every
DICOM participant that did not become a subject has a line that says why (an internal
invariant of the builder), and counts them by category for the end-of-build summary.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from data_prep.store.schema import FILE_REASONS, REASONS


def account(*, rows: Iterable[str], participants: Iterable[str], ingested: Iterable[str],
            problems: list[dict[str, Any]], n_rows_without_key: int = 0) -> dict[str, Any]:
    """Counts per category of what did not become a subject (JSON-able).

    Args:
        rows: pseudonyms of the table rows (one per key).
        participants: pseudonyms of the DICOM participants found.
        ingested: pseudonyms of this build's new subjects.
        problems: the report's lines of this build.
        n_rows_without_key: table rows dropped for a blank key (reported as `no_key`).

    Returns:
        {"table_rows": {n, ingested, not_ingested: {category: n}}, "dicom_participants":
        the same, "files": {category: n} (file-level, participant kept), "notes":
        {category: n} (e.g. several_thigh_series)}.
    """
    rows, participants, ingested = set(rows), set(participants), set(ingested)
    why: dict[str, str] = {}  # pseudonym -> the first reason it was left out
    for p in problems:  # "<pseudonym>" or "<pseudonym>/file#k" (a file that failed the load)
        if p["skipped"]:
            why.setdefault(p["source"].split("/", 1)[0], p["reason"])
    lost = sorted((rows | participants) - ingested - set(why))
    assert not lost, f"{len(lost)} rows/participants left out without a report line"
    kept = [p["reason"] for p in problems if not p["skipped"]]
    files = Counter(r for r in kept if r in FILE_REASONS)
    notes = Counter(r for r in kept if r not in FILE_REASONS)

    def part(ids: set[str], extra: dict[str, int]) -> dict[str, Any]:
        missing = Counter(why[i] for i in ids - ingested)
        missing.update(extra)
        return {"n": len(ids) + sum(extra.values()), "ingested": len(ids & ingested),
                "not_ingested": dict(sorted(missing.items()))}

    return {"table_rows": part(rows, {"no_key": n_rows_without_key} if n_rows_without_key
                               else {}),
            "dicom_participants": part(participants, {}),
            "files": dict(sorted(files.items())), "notes": dict(sorted(notes.items()))}


def rows_without_images(accounting: dict[str, Any]) -> tuple[int, int]:
    """(table rows that found no images, table rows)."""
    rows = accounting["table_rows"]
    return rows["not_ingested"].get("no_images", 0), rows["n"]


def warning(accounting: dict[str, Any], max_share: float, visit: str | None) -> str | None:
    """The loud end-of-build warning when more than `max_share` of the table rows found no
    images (0: any), else None."""
    n, total = rows_without_images(accounting)
    if not n or n <= max_share * total:
        return None
    where = f"under the visit folder {visit!r}" if visit else "under --dicom"
    return (f"WARNING: {n} of {total} table rows ({n / total:.0%}) found no images {where} "
            f"(report category no_images; allowed: {max_share:.0%}, "
            "--max-rows-without-images). Check --dicom, --visit and the spec's key and "
            "dicom.participant_tag against your release before training on this store.")


def summary_lines(accounting: dict[str, Any], report_path: str) -> list[str]:
    """The end-of-build account, one category per line, for the command line."""
    out = []
    for what, label in (("table_rows", "table rows"), ("dicom_participants",
                                                        "DICOM participants")):
        a = accounting[what]
        lost = sum(a["not_ingested"].values())
        out.append(f"{label}: {a['n']}, ingested {a['ingested']}, not ingested {lost}"
                   + (":" if lost else ""))
        out += [f"  {n:5d}  {reason:22s} {REASONS.get(reason, '')}"
                for reason, n in a["not_ingested"].items()]
    for what, label in (("files", "files not used (their participants may still be in)"),
                        ("notes", "notes (participants kept)")):
        if accounting[what]:
            out.append(f"{label}:")
            out += [f"  {n:5d}  {reason:22s} {REASONS.get(reason, '')}"
                    for reason, n in accounting[what].items()]
    out.append(f"every line, with pseudonyms only: {report_path} (and the store's "
               "ingest_problems)")
    return out
