"""Synthetic cohorts: real DICOM trees and clinical tables in each cohort's conventions, with
PHI in the headers and a planted effect (CLI: data_prep/synth.py).

    from data_prep.synthetic import generate_cohort
    manifest = generate_cohort(Path("data/synth"), subjects=100, seed=0)

Modules: subjects.py (subject model: anatomy, measures, planted correlations), phantom.py
(numerical thigh phantom), dicom_writer.py (headers with PHI, the axial T1 series and the
localizer, one participant at a time), tables.py (OAI ASCII, SOMMA and volunteer tables),
cohort.py (the trees on disk, truth.csv, manifest.json). Nothing here is used by ingest.
"""

from data_prep.synthetic.cohort import generate_cohort
from data_prep.synthetic.subjects import sample_subjects

__all__ = ["generate_cohort", "sample_subjects"]
