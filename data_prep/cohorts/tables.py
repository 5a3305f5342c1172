"""Cohort tables: read a cohort's CSV/TSV tables into canonical fields, as its spec says.

    from data_prep.cohorts import load_cohort_table, load_spec
    table, report = load_cohort_table(load_spec("oai"), "synth/oai/tables")

The spec (data_prep/cohorts/spec.py) names the files, delimiters, encodings, the key and visit
columns and, per canonical field, the source column(s); this module joins the tables on the
key, keeps the chosen visit's rows, turns missing codes (blanks, ".A: Not Expected", spec
`missing_values`, no row in a table) into NaN/None with counts, reads coded cells ("1: Male"),
applies maps, combine rules (mean/max of available columns), only_if filters and divide_by,
and reports what it did. data_prep/build_store.py calls it once per build.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_prep.cohorts.spec import (CANONICAL_FIELDS, CATEGORICAL_FIELDS, MEASURES, CohortSpec,
                                    CohortSpecError, field_columns)

# Same logger name as before the split from cohorts.py, so existing log filters still match.
log = logging.getLogger("data_prep.cohorts")

# Marks a cell of a joined table whose key has no row in that table (counted as "no_row").
_NO_ROW = "\x00no_row"

# "1: Male" -> code "1"; ".A: Not Expected" -> missing code ".A"
_CODED = re.compile(r"^\s*(\.?[A-Za-z0-9.+-]*)\s*:\s")


def load_cohort_table(spec: CohortSpec, tables_dir: str | Path) -> tuple[pd.DataFrame, dict]:
    """Read a cohort's tables into canonical fields for the spec's visit.

    Returns:
        (table, report). `table` is indexed by the original key (str) with columns `sex`
        ("male"/"female"/None), `age`, `bmi`, the canonical measures and `exercise` (float,
        NaN when missing). `report["missing"]` maps every source column read to
        {missing code: count} (codes: "blank", ".", ".A", ..., "no_row" for a participant
        absent from that column's table, or a spec `missing_values` entry); `missing_labels`
        one full label per code; `unparsed` counts values that are neither missing nor
        parseable; `filtered` what each only_if removed; `combined` how combined fields were
        formed; `uncertain` the columns whose names the spec marks as unconfirmed;
        `absent_measures` maps each canonical measure whose columns are not in the tables (a
        release holding only some measures) to those columns: the measure is NaN for every
        row and a warning is logged. Any other field's column missing is a CohortSpecError.
        `rows_without_key` lists, per table file, the data rows (1-based, in the file's
        order) whose key cell is blank: they cannot be matched to images and are dropped.
    """
    tables_report: list[dict[str, Any]] = []
    raw = _read_tables(spec, Path(tables_dir), tables_report)
    extra_missing = set(spec.missing_values)
    fields = spec.resolved_fields()
    report: dict[str, Any] = {"n_rows": int(len(raw)), "visit": spec.visit,
                              "visit_folder": spec.visit_folder, "tables": tables_report,
                              "overrides": list(spec.overrides), "missing": {},
                              "missing_labels": {}, "unparsed": {}, "filtered": {},
                              "combined": {}, "uncertain": {}, "absent_measures": {},
                              "rows_without_key": {}}
    for t in tables_report:
        rows = t.pop("rows_without_key")
        if rows:
            report["rows_without_key"][t["file"]] = rows
    all_columns = set(raw.columns)
    absent = {name: [c for c in field_columns(f) if c not in all_columns]
              for name, f in fields.items() if f}
    absent = {name: cols for name, cols in absent.items() if cols}
    required = sorted({c for name, cols in absent.items() if name not in MEASURES for c in cols})
    if required:
        raise CohortSpecError(f"cohort {spec.name}: column(s) {required} named in the spec are "
                              f"not in the tables (available: {sorted(all_columns)}); only "
                              f"measures {list(MEASURES)} may be absent from a release")
    for name, cols in absent.items():  # a release without this measure: build the others
        report["absent_measures"][name] = cols
        fields[name] = None
        log.warning("cohort %s: %s is not in this release: column(s) %s are not in the "
                    "tables; it is left empty (NaN) and recorded in the store, and a study "
                    "grid asking for it is refused", spec.name, name, cols)
    for name, f in fields.items():
        if f and f.get("uncertain"):
            report["uncertain"][name] = {"columns": field_columns(f),
                                         "note": str(f["uncertain"])}
            log.warning("cohort %s: %s reads %s, a column name the spec marks as uncertain "
                        "(%s); confirm it or override it with --column", spec.name, name,
                        field_columns(f), f["uncertain"])

    def cells(column: str) -> tuple[pd.Series, list[str | None]]:
        """(cells with missing set to None, missing labels) and counts into the report."""
        raw_cells = [str(c) for c in raw[column]]
        labels = [_missing_label(c, extra_missing) for c in raw_cells]
        counts = Counter(lab for lab in labels if lab is not None)
        report["missing"][column] = dict(sorted(counts.items()))
        for c, lab in zip(raw_cells, labels):
            if lab is not None and lab not in report["missing_labels"]:
                report["missing_labels"][lab] = "no row in this table" if c == _NO_ROW else c
        values = [c if lab is None else None for c, lab in zip(raw_cells, labels)]
        return pd.Series(values, index=raw.index, dtype=object), labels

    def numeric(column: str) -> pd.Series:
        values, _ = cells(column)
        out, bad = [], 0
        for v in values:
            if v is None:
                out.append(math.nan)
                continue
            try:
                out.append(float(_code(v)))
            except ValueError:
                bad += 1
                out.append(math.nan)
        if bad:
            report["unparsed"][column] = report["unparsed"].get(column, 0) + bad
        return pd.Series(out, index=raw.index, dtype=float)

    table = pd.DataFrame(index=raw.index)
    table.index.name = "key"
    for name in CANONICAL_FIELDS:
        f = fields.get(name)
        if f is None:
            table[name] = None if name == "sex" else math.nan
            continue
        if name in CATEGORICAL_FIELDS:
            values, _ = cells(f["column"])
            # case-insensitive: "F"/"f", "Yes"/"yes" are the same answer
            mapping = {str(k).strip().lower(): v for k, v in f["map"].items()}
            mapped, bad = [], 0
            for v in values:
                if v is None:
                    mapped.append(None)
                elif _code(v).lower() in mapping or v.lower() in mapping:
                    mapped.append(mapping.get(_code(v).lower(), mapping.get(v.lower())))
                else:
                    bad += 1
                    mapped.append(None)
            if bad:
                report["unparsed"][f["column"]] = bad
            if name == "sex":
                table[name] = pd.Series(mapped, index=raw.index, dtype=object)
            else:
                table[name] = pd.Series([math.nan if m is None else float(m) for m in mapped],
                                        index=raw.index, dtype=float)
            continue
        if "columns" in f:
            sides = np.vstack([numeric(c).to_numpy() for c in f["columns"]])
            n_avail = np.sum(~np.isnan(sides), axis=0)
            with np.errstate(all="ignore"):
                reducer = np.nanmean if f["combine"] == "mean_available" else np.nanmax
                combined = np.where(n_avail > 0, reducer(np.where(n_avail > 0, sides, 0.0),
                                                         axis=0), np.nan)
            report["combined"][name] = {
                "rule": f["combine"], "columns": list(f["columns"]),
                "from_all": int(np.sum(n_avail == len(f["columns"]))),
                "from_some": int(np.sum((n_avail > 0) & (n_avail < len(f["columns"])))),
                "none": int(np.sum(n_avail == 0)),
            }
            values = pd.Series(combined, index=raw.index, dtype=float)
        else:
            values = numeric(f["column"])
        if "only_if" in f:
            cond_col = f["only_if"]["column"]
            cond, _ = cells(cond_col)
            ok_codes = {str(c) for c in f["only_if"]["codes"]}
            keep = cond.map(lambda v: v is not None and _code(v) in ok_codes).astype(bool)
            removed = int((~keep & values.notna()).sum())
            report["filtered"][name] = {"by": cond_col, "codes": sorted(ok_codes),
                                        "removed": removed}
            values = values.where(keep, math.nan)
        if "divide_by" in f:  # unit conversion, e.g. NDA interview_age in months -> years
            values = values / float(f["divide_by"])
        table[name] = values
    report["non_missing"] = {c: int(table[c].notna().sum()) for c in table.columns}
    return table, report


def _read_tables(spec: CohortSpec, tables_dir: Path,
                 table_report: list[dict[str, Any]] | None = None) -> pd.DataFrame:
    merged: pd.DataFrame | None = None
    visit_rows = spec.visit_rows()
    for t in spec.tables:
        path = tables_dir / t["file"]
        if not path.is_file():
            raise FileNotFoundError(f"cohort {spec.name}: table {t['file']} not found under "
                                    f"{tables_dir}")
        skip = t.get("skip_rows")
        if t.get("description_row"):  # NDA: line 2 describes each column in words
            first = list(range(skip)) if isinstance(skip, int) else list(skip or [])
            skip = sorted({*first, len(first) + 1})
        df = pd.read_csv(
            path, sep=t.get("delimiter", ","), encoding=t.get("encoding", "utf-8"),
            dtype=str, keep_default_na=False, skiprows=skip,
        )
        df.columns = [c.strip() for c in df.columns]
        if spec.key not in df.columns:
            raise CohortSpecError(f"cohort {spec.name}: key column {spec.key!r} not in "
                                  f"{t['file']} (columns: {list(df.columns)})")
        df = df.apply(lambda s: s.str.strip())
        blank = df[spec.key] == ""
        rows_without_key = [int(i) + 1 for i in np.flatnonzero(blank.to_numpy())]
        df = df[~blank]
        n_read = len(df)
        visit_column = t.get("visit_column")
        if visit_column:
            if visit_column not in df.columns:
                raise CohortSpecError(f"cohort {spec.name}: visit_column {visit_column!r} not "
                                      f"in {t['file']} (columns: {list(df.columns)})")
            assert visit_rows is not None  # parse_spec requires rows for every visit
            df = df[df[visit_column].isin(visit_rows)]
        if df[spec.key].duplicated().any():
            hint = ("" if visit_column else
                    "; a table with one row per visit needs visit_column in the spec")
            raise CohortSpecError(f"cohort {spec.name}: {t['file']} has "
                                  f"{int(df[spec.key].duplicated().sum())} duplicate keys"
                                  f"{hint}")
        if table_report is not None:
            table_report.append({"file": t["file"], "rows_read": int(n_read),
                                 "rows_kept": int(len(df)), "visit_column": visit_column,
                                 "visit_rows": visit_rows if visit_column else None,
                                 "rows_without_key": rows_without_key})
        df = df.set_index(spec.key)
        if merged is None:
            merged = df
        else:
            # A column in several tables (NDA: sex, interview_age) comes from the first table
            # that has a row for the participant.
            overlap = [c for c in df.columns if c in merged.columns]
            merged = merged.join(df.drop(columns=overlap), how="outer")
            for c in overlap:
                merged[c] = merged[c].fillna(df[c].reindex(merged.index))
    assert merged is not None
    return merged.fillna(_NO_ROW)


def _missing_label(cell: str, extra_missing: set[str]) -> str | None:
    """The missing-code label of a cell, or None when the cell holds a value."""
    if cell == "":
        return "blank"
    if cell == _NO_ROW:
        return "no_row"
    if cell in extra_missing:
        return cell
    if cell.startswith("."):
        m = _CODED.match(cell)
        return m.group(1) if m else cell
    return None


def _code(cell: str) -> str:
    """'1: Male' -> '1'; 'F' -> 'F'; '23.5' -> '23.5'."""
    m = _CODED.match(cell)
    return m.group(1) if m else cell
