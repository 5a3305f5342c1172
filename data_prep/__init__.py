"""data_prep: DICOM trees and cohort tables -> a de-identified, content-hashed Zarr slice store.

Start here:
    build_store.py   the command line of ingest (`python data_prep/build_store.py --help`)
    synth.py         the command line of the synthetic cohorts (`python data_prep/synth.py --help`)

A package per stage, in the order data flows (no module imports one that imports it back):
    cohorts/    specs (YAML) mapping a cohort's tables and DICOM conventions to canonical
                measures; reading the tables
    dicom/      participants by header at any depth, the axial thigh series, volumes
    ingest/     the build: plan, parallel workers, the report of everything not ingested
    store/      the Zarr store: schema, reader, writer, shards, journal, verify
    synthetic/  synthetic cohorts (subject model, phantom, DICOM writer, tables): not used
                by ingest
Shared by ingest and prediction: preprocess.py (the preprocessing recipe) and
pseudonyms.py (salted pseudonyms). data_prep/README.md explains specs, categories and rules.
"""
