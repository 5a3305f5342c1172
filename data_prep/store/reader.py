"""Reading a Zarr slice store: open_store refuses an incomplete one (schema.py: the layout).

    from data_prep.store import open_store
    store = open_store("data/demo.zarr")          # refuses an incomplete store
    store = open_store("s3://bucket/demo.zarr")   # object storage, read-only (remote.py)
    store.subjects, store.subject_images(0), store.recipe, store.content_hash
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from data_prep.preprocess import Recipe
from data_prep.store.remote import default_store_cache, is_url, open_remote_root, redact
from data_prep.store.schema import NORM_COLUMNS, SCHEMA_VERSION, StoreError, subjects_frame


def _read_table(root: zarr.Group, name: str) -> pd.DataFrame:
    group = root[name]
    strings = group.attrs["strings"]
    data = {}
    for c in group.attrs["columns"]:
        data[c] = pd.Series(strings[c], dtype=object) if c in strings else group[c][:]
    return pd.DataFrame(data, columns=group.attrs["columns"])


@dataclass
class ThighStore:
    """A complete store opened for reading (see module docstring)."""

    path: Path | str  # a local folder, or the URL of a store on object storage
    root: zarr.Group
    images: zarr.Array
    slice_subject: np.ndarray
    slice_position: np.ndarray
    subjects: pd.DataFrame
    normalisation: pd.DataFrame
    recipe: Recipe
    measures: dict[str, dict[str, str]]
    content_hash: str
    attrs: dict[str, Any]

    def subject_images(self, i: int) -> np.ndarray:
        """uint16 (n_slices, rows, cols) of the subject in row `i` of `subjects`."""
        row = self.subjects.iloc[i]
        start, count = int(row["slice_start"]), int(row["slice_count"])
        return self.images[start:start + count]


def open_store(path: str | os.PathLike, *, require_complete: bool = True,
               cache_dir: str | os.PathLike | None | bool = True) -> ThighStore:
    """Open a store for reading; raises StoreError if incomplete (unless told otherwise).

    Args:
        path: a local folder, or an fsspec URL (s3://bucket/study.zarr; credentials from the
            environment). A URL is opened read-only.
        require_complete: refuse a store whose build has not finished.
        cache_dir: for a URL, the node-local cache root of its data objects (remote.py):
            True = $THIGHMRI_STORE_CACHE or ~/.cache/thighmri/stores, None/False = no cache.
            Ignored for a local path.
    """
    if is_url(path):
        cache = default_store_cache() if cache_dir is True else (cache_dir or None)
        try:
            return _open_root(open_remote_root(str(path), cache_dir=cache), str(path), require_complete)
        except StoreError:
            raise
        except Exception as exc:  # s3fs / botocore: no credentials, access denied, endpoint down, ...
            raise StoreError(redact(f"{path} cannot be read from its object storage "
                                    f"({type(exc).__name__}: {exc}); credentials and endpoint come from the "
                                    "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)")
                             ) from exc
    path = Path(str(path).removeprefix("file://"))
    try:
        root = zarr.open_group(str(path), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise StoreError(f"{path} is not a Zarr store (no group found)") from exc
    return _open_root(root, path, require_complete)


def _open_root(root: zarr.Group, path: Path | str, require_complete: bool) -> ThighStore:
    attrs = dict(root.attrs)
    if require_complete and attrs.get("complete") is not True:
        raise StoreError(
            f"{path} is incomplete (its 'complete' attribute is not set): a build or append "
            "was interrupted or is still running. Rerun the same data_prep/build_store.py "
            "command to resume it (finished participants are kept), or pass "
            "require_complete=False to inspect what was written.")
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(f"{path}: schema_version {attrs.get('schema_version')!r}, this code "
                         f"reads {SCHEMA_VERSION}")
    has_table = "subjects" in root
    return ThighStore(
        path=path, root=root, images=root["images"],
        slice_subject=(root["slice_subject"][:] if "slice_subject" in root
                       else np.zeros(0, np.int32)),
        slice_position=(root["slice_position"][:] if "slice_position" in root
                        else np.zeros(0, np.int16)),
        subjects=_read_table(root, "subjects") if has_table else subjects_frame([]),
        normalisation=(_read_table(root, "normalisation") if "normalisation" in root
                       else pd.DataFrame(columns=NORM_COLUMNS)),
        recipe=Recipe.from_dict(attrs["recipe"]), measures=attrs.get("measures", {}),
        content_hash=attrs.get("content_hash", ""), attrs=attrs,
    )
