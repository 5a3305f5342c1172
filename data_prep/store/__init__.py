"""Store stage: the de-identified, content-hashed Zarr slice store (ARCHITECTURE.md "Zarr store").

    from data_prep.store import open_store, verify_store
    store = open_store("data/demo.zarr")          # refuses an incomplete store
    store = open_store("s3://bucket/demo.zarr")   # object storage: read-only, node-local cache
    store.subjects, store.subject_images(0), store.recipe, store.content_hash
    verify_store("data/demo.zarr")                # [] when sound

Modules: schema.py (layout, columns, report categories REASONS, content hash), reader.py
(open_store, ThighStore), writer.py (StoreWriter: create, append, resume, finish), shards.py
(one image shard per participant), remote.py (stores on object storage: read-only through a
node-local cache), upload.py (copy a finished store up, verify it there), journal.py (what
an unfinished build has done), verify.py (every problem at once). The pseudonym functions
(data_prep/pseudonyms.py) are importable from here too.
"""

from data_prep.pseudonyms import SALT_ENV, SaltError, load_salt, pseudonym
from data_prep.store.journal import JOURNAL, read_journal
from data_prep.store.reader import ThighStore, open_store
from data_prep.store.remote import STORE_CACHE_ENV, NodeCacheStore, is_url, redact
from data_prep.store.schema import (FILE_REASONS, FLOAT_COLUMNS, INT_COLUMNS, NORM_COLUMNS, REASONS,
                                    REPORT_COLUMNS, SCHEMA_VERSION, SPACING_COLUMNS,
                                    STRING_COLUMNS, SUBJECT_COLUMNS, StoreError, content_hash,
                                    ingest_report_path, slice_digests, subjects_frame)
from data_prep.store.shards import IMAGE_CHUNK_KEYS, IMAGE_CODEC, STAGING
from data_prep.store.upload import upload_store
from data_prep.store.verify import verify_store
from data_prep.store.writer import StoreWriter, write_ingest_report

__all__ = [
    "content_hash", "FILE_REASONS", "FLOAT_COLUMNS", "IMAGE_CHUNK_KEYS", "IMAGE_CODEC",
    "ingest_report_path", "INT_COLUMNS", "is_url", "JOURNAL", "load_salt", "NodeCacheStore",
    "NORM_COLUMNS", "open_store", "pseudonym", "read_journal", "REASONS", "redact",
    "REPORT_COLUMNS", "SALT_ENV", "SaltError", "SCHEMA_VERSION", "slice_digests", "SPACING_COLUMNS",
    "STAGING", "STORE_CACHE_ENV", "StoreError", "StoreWriter", "STRING_COLUMNS", "SUBJECT_COLUMNS",
    "subjects_frame", "ThighStore", "upload_store", "verify_store", "write_ingest_report",
]
