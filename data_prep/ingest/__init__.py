"""Ingest stage: one cohort's DICOM tree and tables into the Zarr slice store.

    from data_prep.ingest import build
    summary = build(dicom=..., tables=..., spec=load_spec("oai"), out=Path("data/x.zarr"),
                    recipe=Recipe(), salt=load_salt(), workers=2)

Modules: builder.py (the build, step by step: table, participants by header, plan, parallel
participants, report), worker.py (one participant per job, in worker processes),
report.py (every table row and participant accounted for, by category). The command line
is data_prep/build_store.py.
"""

from data_prep.ingest.builder import DELAY_ENV, SPACE_MARGIN, build, space_needed
from data_prep.ingest.report import account, summary_lines

__all__ = ["DELAY_ENV", "SPACE_MARGIN", "account", "build", "space_needed", "summary_lines"]
