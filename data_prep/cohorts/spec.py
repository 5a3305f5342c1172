"""Cohort specs: map a cohort's own tables and DICOM conventions to canonical measures.

A spec is a YAML file (data_prep/cohorts/oai.yaml, oai_nda.yaml, somma.yaml, volunteers.yaml);
write your own for a new cohort or release and pass its path to build_store.py. The keys, the
missing-code rules and how to map a real release are in data_prep/README.md. Reading a
cohort's tables with a spec (`load_cohort_table`) is data_prep/cohorts/tables.py.

    from data_prep.cohorts import load_spec, select_visit, apply_column_overrides
    spec = select_visit(load_spec("oai"), "24m")                 # folder 24m, prefix V03
    spec = apply_column_overrides(spec, ["leg_strength={V}REMAXF,{V}LEMAXF"])
    table, report = load_cohort_table(spec, "synth/oai/tables")  # data_prep/cohorts/tables.py

Spec keys (unknown keys are an error):
    name: cohort name stored with each subject (and mixed into the pseudonym)
    key: key column (same values as the DICOM PatientID)
    tables: list of {file, delimiter, encoding, skip_rows, description_row, visit_column};
        joined on the key (outer join; a column in several tables comes from the first
        table with a row for the participant)
    visit / visits: the chosen visit and, per visit, {folder, rows, V}: the DICOM folder, the
        value(s) of each table's visit_column to keep, the prefix substituted for {V}
    missing_values: extra cell values meaning missing (beyond blanks and ".x: ..." codes)
    fields: canonical field -> {column | columns, map, combine, only_if, divide_by, unit,
        uncertain, notes} or null
    dicom: {series_description: [regex, ...], visit_folder, participant_tag,
        participant_depth}: participants are found by header (data_prep/dicom/participants.py),
        the folder hints only narrow the scan or name participants whose files lack the tag
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SPEC_DIR = Path(__file__).resolve().parent  # the built-in specs: data_prep/cohorts/*.yaml

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

SPEC_KEYS = ("name", "key", "tables", "visit", "visits", "missing_values", "fields", "dicom",
             "notes")
TABLE_KEYS = ("file", "delimiter", "encoding", "skip_rows", "description_row", "visit_column")
VISIT_KEYS = ("folder", "rows", "V")
FIELD_KEYS = ("column", "columns", "map", "combine", "only_if", "divide_by", "unit",
              "uncertain", "notes")
ONLY_IF_KEYS = ("column", "codes")
DICOM_KEYS = ("visit_folder", "series_description", "participant_tag", "participant_depth")
# Placeholders allowed in column names: {V} = the visit's prefix, {visit} = the visit's name.
TEMPLATE_VARS = ("V", "visit")
_PLACEHOLDER = re.compile(r"{([^{}]*)}")
COMBINE_RULES = ("mean_available", "max_available")


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
    visit: str | None = None  # chosen key of `visits` (None when the spec has no visits)
    visits: dict[str, dict[str, Any]] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)  # "field=COLUMN" applied, in order

    @property
    def description_patterns(self) -> list[str]:
        return list(self.dicom.get("series_description", []))

    @property
    def participant_tag(self) -> str:
        """DICOM keyword whose value is the participant key (the table's `key` column)."""
        return str(self.dicom.get("participant_tag") or "PatientID")

    @property
    def participant_depth(self) -> int | None:
        """Folder level below the visit folder whose names are participant keys, used only
        for images without `participant_tag` (an anonymised tree); None: not used."""
        depth = self.dicom.get("participant_depth")
        return None if depth is None else int(depth)

    @property
    def other_visit_folders(self) -> list[str]:
        """DICOM folders of the spec's other visits (never scanned for this visit)."""
        return sorted({str(v["folder"]) for name, v in self.visits.items()
                       if name != self.visit and v.get("folder")} - {self.visit_folder})

    @property
    def visit_folder(self) -> str | None:
        """DICOM folder of the chosen visit (e.g. `00m`): `<dicom>/<folder>`, or a folder of
        that name at any depth (`<ID>/00m/...`); None: every file under the root."""
        if self.visits:
            return self.visits[self.visit].get("folder")
        return self.dicom.get("visit_folder")

    @property
    def template_values(self) -> dict[str, str]:
        if not self.visits:
            return {}
        v = self.visits[self.visit]
        return {"visit": str(self.visit), **({"V": str(v["V"])} if "V" in v else {})}

    def column(self, name: str) -> str:
        """A column name with `{V}` / `{visit}` filled in for the chosen visit."""
        values = self.template_values
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], name)

    def resolved_fields(self) -> dict[str, dict[str, Any] | None]:
        """`fields` with every column name templated for the chosen visit."""
        out: dict[str, dict[str, Any] | None] = {}
        for name, f in self.fields.items():
            if f is None:
                out[name] = None
                continue
            f = copy.deepcopy(f)
            if "column" in f:
                f["column"] = self.column(f["column"])
            if "columns" in f:
                f["columns"] = [self.column(c) for c in f["columns"]]
            if "only_if" in f:
                f["only_if"]["column"] = self.column(f["only_if"]["column"])
            out[name] = f
        return out

    def visit_rows(self) -> list[str] | None:
        """Values of a table's visit_column that belong to the chosen visit."""
        if not self.visits or "rows" not in self.visits[self.visit]:
            return None
        rows = self.visits[self.visit]["rows"]
        return [str(r) for r in (rows if isinstance(rows, list) else [rows])]


def _unknown(d: dict, allowed: tuple[str, ...], where: str) -> list[str]:
    bad = sorted(set(d) - set(allowed))
    return [f"{where}: unknown key(s) {bad}; allowed keys: {list(allowed)}"] if bad else []


def field_columns(f: dict[str, Any]) -> list[str]:
    """Every column a field reads: `column` or `columns`, plus its only_if column."""
    cols = [f["column"]] if "column" in f else list(f.get("columns") or [])
    if isinstance(f.get("only_if"), dict) and "column" in f["only_if"]:
        cols.append(f["only_if"]["column"])
    return cols


def _check_field(name: str, f: Any, where: str) -> list[str]:
    if f is None:
        return []
    if not isinstance(f, dict):
        return [f"{where}: must be a mapping or null"]
    problems = _unknown(f, FIELD_KEYS, where)
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
    if "divide_by" in f and (not isinstance(f["divide_by"], (int, float))
                             or isinstance(f["divide_by"], bool) or f["divide_by"] == 0):
        problems.append(f"{where}: divide_by must be a non-zero number, got {f['divide_by']!r}")
    for col in field_columns(f):
        for ph in _PLACEHOLDER.findall(str(col)):
            if ph not in TEMPLATE_VARS:
                problems.append(f"{where}: placeholder {{{ph}}} in column {col!r}; allowed "
                                f"placeholders: {['{' + v + '}' for v in TEMPLATE_VARS]}")
    return problems


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
        problems += _check_field(name, f, f"{source}: fields.{name}")
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
    depth = dicom.get("participant_depth")
    if depth is not None and (not isinstance(depth, int) or isinstance(depth, bool)
                              or depth < 1):
        problems.append(f"{source}: dicom.participant_depth must be an integer >= 1 (or "
                        f"absent), got {depth!r}")
    tag = dicom.get("participant_tag", "PatientID")
    if not isinstance(tag, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", tag):
        problems.append(f"{source}: dicom.participant_tag must be a DICOM keyword such as "
                        f"PatientID, got {tag!r}")
    visits = raw.get("visits") or {}
    visit = raw.get("visit")
    if not isinstance(visits, dict):
        problems.append(f"{source}: visits must map a visit name to {{folder, rows, V}}")
        visits = {}
    visits = {str(k): v for k, v in visits.items()}
    for name, v in visits.items():
        if not isinstance(v, dict):
            problems.append(f"{source}: visits.{name} must be a mapping with keys "
                            f"{list(VISIT_KEYS)}")
        else:
            problems += _unknown(v, VISIT_KEYS, f"{source}: visits.{name}")
    if visits:
        if visit is None or str(visit) not in visits:
            problems.append(f"{source}: visit {visit!r} is not one of the visits "
                            f"{sorted(visits)}")
        if "visit_folder" in dicom:
            problems.append(f"{source}: with 'visits', give each visit's folder there, not "
                            "dicom.visit_folder")
    elif visit is not None:
        problems.append(f"{source}: visit {visit!r} given but the spec has no 'visits'")
    every_visit_has = lambda k: bool(visits) and all(  # noqa: E731
        isinstance(v, dict) and k in v for v in visits.values())
    if any("{V}" in str(c) for f in fields.values() if isinstance(f, dict)
           for c in field_columns(f)) and not every_visit_has("V"):
        problems.append(f"{source}: column names use {{V}} but not every visit in 'visits' "
                        "defines V (the variable prefix)")
    for i, t in enumerate(tables):
        if isinstance(t, dict) and t.get("visit_column") and not every_visit_has("rows"):
            problems.append(f"{source}: tables[{i}] has visit_column but not every visit in "
                            "'visits' defines rows (the values of that column to keep)")
    if problems:
        raise CohortSpecError("Invalid cohort spec:\n  " + "\n  ".join(problems))
    return CohortSpec(
        name=str(raw["name"]), key=str(raw["key"]), tables=list(tables),
        fields={k: fields.get(k) for k in CANONICAL_FIELDS}, dicom=dict(dicom),
        missing_values=[str(v) for v in raw.get("missing_values") or []], source=source,
        visit=None if visit is None else str(visit), visits=visits,
    )


def builtin_specs() -> list[str]:
    return sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))


def load_spec(name_or_path: str | Path) -> CohortSpec:
    """A built-in spec by name (`oai`, `oai_nda`, `somma`, `volunteers`) or a YAML file path."""
    path = Path(name_or_path)
    if not path.suffix and (SPEC_DIR / f"{name_or_path}.yaml").is_file():
        path = SPEC_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise CohortSpecError(
            f"Unknown cohort {str(name_or_path)!r}: not a built-in spec {builtin_specs()} "
            "and not an existing YAML file")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    return parse_spec(raw, source=path.name)


def select_visit(spec: CohortSpec, visit: str | None) -> CohortSpec:
    """A copy of `spec` for another visit (None keeps the spec's own choice).

    The visit picks the DICOM folder, the rows of tables with a visit_column and the prefix
    filled into `{V}` in column names, all at once, so images and measures cannot disagree.
    """
    if visit is None:
        return spec
    if not spec.visits:
        raise CohortSpecError(f"cohort {spec.name}: --visit {visit!r} given but the spec "
                              f"{spec.source} defines no visits")
    if str(visit) not in spec.visits:
        raise CohortSpecError(f"cohort {spec.name}: unknown visit {visit!r}; allowed visits: "
                              f"{sorted(spec.visits)}")
    return dataclasses.replace(copy.deepcopy(spec), visit=str(visit))


def apply_column_overrides(spec: CohortSpec, overrides: list[str]) -> CohortSpec:
    """A copy of `spec` with column names replaced, e.g. from `--column` on the command line.

    Each override is `FIELD=COLUMN`: FIELD is a canonical field (`leg_strength`, `age`, ...),
    `key`, or `FIELD.only_if` (the column of a filter such as the 400 m completion code).
    A combined field takes `FIELD=COL1,COL2`. Columns may use `{V}`. A field that was null
    becomes `{column: COLUMN}` (categorical fields such as sex need a map: edit the spec).
    Every problem is listed in one CohortSpecError.
    """
    spec = copy.deepcopy(spec)
    allowed = ["key", *CANONICAL_FIELDS, *(f"{f}.only_if" for f in CANONICAL_FIELDS)]
    problems = []
    for text in overrides:
        target, sep, column = (s.strip() for s in str(text).partition("="))
        if not sep or not target or not column:
            problems.append(f"column override {text!r} must look like FIELD=COLUMN")
            continue
        if target not in allowed:
            problems.append(f"column override {text!r}: unknown field {target!r}; allowed "
                            f"fields: {allowed}")
            continue
        columns = [c.strip() for c in column.split(",") if c.strip()]
        name, _, sub = target.partition(".")
        if name == "key":
            spec.key = column
            spec.overrides.append(text)
            continue
        f = spec.fields.get(name)
        if sub == "only_if":
            if not f or "only_if" not in f:
                problems.append(f"column override {text!r}: field {name!r} has no only_if "
                                "filter in the spec")
            else:
                f["only_if"]["column"] = column
                spec.overrides.append(text)
            continue
        if f is None:
            if name in CATEGORICAL_FIELDS:
                problems.append(f"column override {text!r}: {name} is null in the spec and "
                                "needs a 'map' of codes; set it in the spec YAML")
                continue
            f = spec.fields[name] = {}
        if len(columns) > 1:
            if "columns" not in f:
                problems.append(f"column override {text!r}: {name} reads one column; "
                                "several need combine: in the spec")
                continue
            f["columns"] = columns
        elif "columns" in f:
            problems.append(f"column override {text!r}: {name} combines {len(f['columns'])} "
                            f"columns ({f['combine']}); give them all, comma-separated")
            continue
        else:
            f["column"] = column
        f.pop("uncertain", None)  # the user named the column: no longer an unchecked guess
        spec.overrides.append(text)
    for name, f in spec.fields.items():
        problems += _check_field(name, f, f"after overrides: fields.{name}")
    if problems:
        raise CohortSpecError("Invalid column override(s):\n  " + "\n  ".join(problems))
    return spec
