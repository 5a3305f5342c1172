"""Cohort specs: map a cohort's own tables and DICOM conventions to canonical measures.

A spec is a YAML file (data_prep/cohorts/oai.yaml, somma.yaml, volunteers.yaml); write your
own for a new cohort or a different release and pass its path to build_store.py.

    from data_prep.cohorts import load_spec, load_cohort_table
    spec = load_spec("oai")
    table, report = load_cohort_table(spec, "synth/oai/tables")

Spec keys (unknown keys are an error):
    name: cohort name stored with each subject (and mixed into the pseudonym)
    key: key column (same values as the DICOM PatientID)
    tables: list of {file, delimiter, encoding, skip_rows}; joined on the key (outer join)
    missing_values: extra cell values meaning missing (beyond blanks and ".x: ..." codes)
    fields: canonical field -> {column | columns, map, combine, only_if, unit} or null
    dicom: {visit_folder, series_description: [regex, ...]}
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

SPEC_DIR = Path(__file__).resolve().parent / "cohorts"

# Canonical measures, their direction ("higher" = a larger raw value is better function)
# and unit. The single source of truth; the store copies it into its attributes.
MEASURES: dict[str, dict[str, str]] = {
    "leg_strength": {"direction": "higher", "unit": "N or W (cohort-specific)"},
    "gait_speed_short": {"direction": "higher", "unit": "m/s"},
    "gait_400m": {"direction": "lower", "unit": "s"},
    "chair_stand": {"direction": "lower", "unit": "s for 5 stands"},
}
CANONICAL_FIELDS = ("sex", "age", "bmi", *MEASURES, "exercise")
CATEGORICAL_FIELDS = {"sex": ("male", "female"), "exercise": (0.0, 1.0)}

SPEC_KEYS = ("name", "key", "tables", "missing_values", "fields", "dicom", "notes")
TABLE_KEYS = ("file", "delimiter", "encoding", "skip_rows")
FIELD_KEYS = ("column", "columns", "map", "combine", "only_if", "unit", "notes")
ONLY_IF_KEYS = ("column", "codes")
DICOM_KEYS = ("visit_folder", "series_description")
COMBINE_RULES = ("mean_available", "max_available")

# "1: Male" -> code "1"; ".A: Not Expected" -> missing code ".A"
_CODED = re.compile(r"^\s*(\.?[A-Za-z0-9.+-]*)\s*:\s")


class CohortSpecError(ValueError):
    """A spec that cannot be used; the message lists every problem found."""


@dataclass
class CohortSpec:
    name: str
    key: str
    tables: list[dict[str, Any]]
    fields: dict[str, dict[str, Any] | None]
    dicom: dict[str, Any]
    missing_values: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def description_patterns(self) -> list[str]:
        return list(self.dicom.get("series_description", []))

    @property
    def visit_folder(self) -> str | None:
        return self.dicom.get("visit_folder")


def _unknown(d: dict, allowed: tuple[str, ...], where: str) -> list[str]:
    bad = sorted(set(d) - set(allowed))
    return [f"{where}: unknown key(s) {bad}; allowed keys: {list(allowed)}"] if bad else []


def parse_spec(raw: dict[str, Any], source: str = "<dict>") -> CohortSpec:
    """Validate a spec dict and return a CohortSpec; every problem is listed in one error."""
    if not isinstance(raw, dict):
        raise CohortSpecError(f"{source}: a cohort spec must be a mapping")
    problems = _unknown(raw, SPEC_KEYS, source)
    for req in ("name", "key", "tables", "fields", "dicom"):
        if req not in raw:
            problems.append(f"{source}: missing required key {req!r}")
    tables = raw.get("tables") or []
    for i, t in enumerate(tables):
        if not isinstance(t, dict) or "file" not in t:
            problems.append(f"{source}: tables[{i}] needs a 'file'")
        else:
            problems += _unknown(t, TABLE_KEYS, f"{source}: tables[{i}]")
    fields = raw.get("fields") or {}
    problems += _unknown(fields, CANONICAL_FIELDS, f"{source}: fields")
    for name, f in fields.items():
        if f is None:
            continue
        where = f"{source}: fields.{name}"
        if not isinstance(f, dict):
            problems.append(f"{where}: must be a mapping or null")
            continue
        problems += _unknown(f, FIELD_KEYS, where)
        if ("column" in f) == ("columns" in f):
            problems.append(f"{where}: give exactly one of 'column' or 'columns'")
        if "columns" in f and f.get("combine") not in COMBINE_RULES:
            problems.append(f"{where}: 'columns' needs combine: one of {list(COMBINE_RULES)}")
        if name in CATEGORICAL_FIELDS:
            if not isinstance(f.get("map"), dict):
                problems.append(f"{where}: needs a 'map' from cell code to one of "
                                f"{list(CATEGORICAL_FIELDS[name])}")
            else:
                bad = [v for v in f["map"].values() if v not in CATEGORICAL_FIELDS[name]]
                if bad:
                    problems.append(f"{where}: map values {bad} not in "
                                    f"{list(CATEGORICAL_FIELDS[name])}")
        if "only_if" in f:
            oi = f["only_if"]
            if not isinstance(oi, dict) or "column" not in oi or "codes" not in oi:
                problems.append(f"{where}: only_if needs 'column' and 'codes'")
            else:
                problems += _unknown(oi, ONLY_IF_KEYS, f"{where}.only_if")
    dicom = raw.get("dicom") or {}
    problems += _unknown(dicom, DICOM_KEYS, f"{source}: dicom")
    patterns = dicom.get("series_description")
    if not patterns or not isinstance(patterns, list):
        problems.append(f"{source}: dicom.series_description must be a list of regexes")
    else:
        for p in patterns:
            try:
                re.compile(p)
            except re.error as exc:
                problems.append(f"{source}: bad regex {p!r} in dicom.series_description: {exc}")
    if problems:
        raise CohortSpecError("Invalid cohort spec:\n  " + "\n  ".join(problems))
    return CohortSpec(
        name=str(raw["name"]), key=str(raw["key"]), tables=list(tables),
        fields={k: fields.get(k) for k in CANONICAL_FIELDS}, dicom=dict(dicom),
        missing_values=[str(v) for v in raw.get("missing_values") or []], source=source,
    )


def builtin_specs() -> list[str]:
    return sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))


def load_spec(name_or_path: str | Path) -> CohortSpec:
    """A built-in spec by name (`oai`, `somma`, `volunteers`) or a YAML file path."""
    path = Path(name_or_path)
    if not path.suffix and (SPEC_DIR / f"{name_or_path}.yaml").is_file():
        path = SPEC_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise CohortSpecError(
            f"Unknown cohort {str(name_or_path)!r}: not a built-in spec {builtin_specs()} "
            "and not an existing YAML file")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    return parse_spec(raw, source=path.name)


def _missing_label(cell: str, extra_missing: set[str]) -> str | None:
    """The missing-code label of a cell, or None when the cell holds a value."""
    if cell == "":
        return "blank"
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


def _read_tables(spec: CohortSpec, tables_dir: Path) -> pd.DataFrame:
    merged: pd.DataFrame | None = None
    for t in spec.tables:
        path = tables_dir / t["file"]
        if not path.is_file():
            raise FileNotFoundError(f"cohort {spec.name}: table {t['file']} not found under "
                                    f"{tables_dir}")
        df = pd.read_csv(
            path, sep=t.get("delimiter", ","), encoding=t.get("encoding", "utf-8"),
            dtype=str, keep_default_na=False, skiprows=t.get("skip_rows"),
        )
        df.columns = [c.strip() for c in df.columns]
        if spec.key not in df.columns:
            raise CohortSpecError(f"cohort {spec.name}: key column {spec.key!r} not in "
                                  f"{t['file']} (columns: {list(df.columns)})")
        df = df.apply(lambda s: s.str.strip())
        df = df[df[spec.key] != ""]
        if df[spec.key].duplicated().any():
            raise CohortSpecError(f"cohort {spec.name}: {t['file']} has "
                                  f"{int(df[spec.key].duplicated().sum())} duplicate keys")
        df = df.set_index(spec.key)
        if merged is None:
            merged = df
        else:
            overlap = [c for c in df.columns if c in merged.columns]
            merged = merged.join(df.drop(columns=overlap), how="outer")
    assert merged is not None
    return merged.fillna("")


def load_cohort_table(spec: CohortSpec, tables_dir: str | Path) -> tuple[pd.DataFrame, dict]:
    """Read a cohort's tables into canonical fields.

    Returns:
        (table, report). `table` is indexed by the original key (str) with columns `sex`
        ("male"/"female"/None), `age`, `bmi`, the canonical measures and `exercise` (float,
        NaN when missing). `report` holds per source column the count of each missing code,
        values that could not be parsed, and how many values each filter removed.
    """
    raw = _read_tables(spec, Path(tables_dir))
    extra_missing = set(spec.missing_values)
    report: dict[str, Any] = {"n_rows": int(len(raw)), "missing": {}, "unparsed": {},
                              "filtered": {}, "combined": {}}
    all_columns = set(raw.columns)
    wanted = []
    for f in spec.fields.values():
        if f:
            wanted += [f["column"]] if "column" in f else list(f["columns"])
            if "only_if" in f:
                wanted.append(f["only_if"]["column"])
    absent = sorted({c for c in wanted if c not in all_columns})
    if absent:
        raise CohortSpecError(f"cohort {spec.name}: column(s) {absent} named in the spec are "
                              f"not in the tables (available: {sorted(all_columns)})")

    def cells(column: str) -> tuple[pd.Series, list[str | None]]:
        """(cells with missing set to None, missing labels) and counts into the report."""
        raw_cells = [str(c) for c in raw[column]]
        labels = [_missing_label(c, extra_missing) for c in raw_cells]
        counts = Counter(lab for lab in labels if lab is not None)
        if counts:
            report["missing"][column] = dict(sorted(counts.items()))
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
        f = spec.fields.get(name)
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
        table[name] = values
    report["non_missing"] = {c: int(table[c].notna().sum()) for c in table.columns}
    return table, report
