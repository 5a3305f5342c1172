"""Ingest stage (filled in step 2)."""
