"""Cohorts stage: specs (YAML) that map a cohort's tables and DICOM conventions to canonical
measures, and reading the tables with them.

    from data_prep.cohorts import load_cohort_table, load_spec
    spec = load_spec("oai")                      # or a path to your own spec YAML
    table, report = load_cohort_table(spec, "synth/oai/tables")

Modules: spec.py (spec keys, validation, visits, column overrides, canonical MEASURES),
tables.py (read, join and convert the tables); the built-in specs are the *.yaml files
beside them (data_prep/README.md explains every key and how to map a real release).
"""

from data_prep.cohorts.spec import (CANONICAL_FIELDS, CATEGORICAL_FIELDS, MEASURES, SPEC_DIR,
                                    CohortSpec, CohortSpecError, apply_column_overrides,
                                    builtin_specs, field_columns, load_spec, parse_spec,
                                    select_visit)
from data_prep.cohorts.tables import load_cohort_table

__all__ = [
    "CANONICAL_FIELDS", "CATEGORICAL_FIELDS", "MEASURES", "SPEC_DIR", "CohortSpec",
    "CohortSpecError", "apply_column_overrides", "builtin_specs", "field_columns",
    "load_cohort_table", "load_spec", "parse_spec", "select_visit",
]
