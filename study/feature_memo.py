"""This process's copy of the cached features its last trials read (features.cached_features).

A Tune worker runs a cell's trials one after another (reuse_actors) on the same subjects, so
every trial after the first would read the same rows of the same cache entry again: at OAI
size 44,805 rows x 2 KiB = 92 MB through Zarr, 0.1-0.4 s per trial on the 2-core machine
(benchmarks/README.md, "per-trial overhead"). The memo keeps the aligned array of the last
reads; a trial asking for the same entry and rows gets it without reading. The entry on disk
is still checked first (it exists, was made for the key, holds the rows), so a removed or
torn entry is recomputed as before.

Why per process and not per node (Ray's object store, or a memory map shared by all the
node's workers): a worker reads the entry once per cell (a cell's trials share one worker)
for 0.1-0.4 s, against the ~7 s that worker spends starting (imports of torch, MLflow, Ray
Tune, numba); sharing across processes would save at most that one read per cell.

The arrays are shared read-only by the trials of this process: nothing in a trial writes
into its features (loaders index them, the head trainer reads them).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch

MAX_BYTES = 1 << 30  # at most this much held (an OAI-size entry's rows are ~100 MB)
_held: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()


def rows_key(entry: str, slice_idx: np.ndarray) -> tuple[str, str]:
    """The memo key of an entry's rows slice_idx (in this order)."""
    digest = hashlib.blake2b(np.ascontiguousarray(slice_idx, np.int64).tobytes(), digest_size=16).hexdigest()
    return entry, f"{slice_idx.size}:{digest}"


def get(key: tuple[str, str]) -> torch.Tensor | None:
    feats = _held.get(key)
    if feats is not None:
        _held.move_to_end(key)
    return feats


def put(key: tuple[str, str], feats: torch.Tensor) -> None:
    """Hold feats under key; the oldest go while more than MAX_BYTES are held."""
    size = feats.numel() * feats.element_size()
    if size > MAX_BYTES:
        return
    _held[key] = feats
    _held.move_to_end(key)
    while sum(t.numel() * t.element_size() for t in _held.values()) > MAX_BYTES:
        _held.popitem(last=False)


def clear() -> None:
    _held.clear()
