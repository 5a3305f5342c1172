"""The node's table of thigh areas (study/size_cache.py): the same numbers as measuring each
subject, once per store, keyed by the store's content, written atomically, never failing a cell."""

from __future__ import annotations

import dataclasses
import fcntl
import threading

import numpy as np
import pytest
from store_helpers import synthetic_oai_store

from data_prep.store import open_store
from data_prep.store.shards import decode_shard, encode_shard
from study import body_size, data, size_cache
from study.body_size import AREAS_CODE, size_baseline, thigh_areas, tissue_masks

SALT = "size-cache-test-salt-0123456789"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real 16-participant store at 32x64 built from synthetic DICOM."""
    return open_store(synthetic_oai_store(tmp_path_factory.mktemp("size_cache"), subjects=16, seed=2,
                                          size="32x64", salt=SALT, workers=1))


@pytest.fixture(autouse=True)
def fresh_memo():
    size_cache._MEMO.clear()  # each test sees the disk, not an earlier test's in-process table
    yield
    size_cache._MEMO.clear()


def _reference_areas(store, rows):
    """main's thigh_areas before the cache: one zarr read and one tissue_masks per subject."""
    starts = store.subjects["slice_start"].to_numpy(dtype=np.int64)
    counts = store.subjects["slice_count"].to_numpy(dtype=np.int64)
    out = np.zeros((rows.size, 3))
    for i, row in enumerate(rows):
        block = np.asarray(store.images[starts[row]:starts[row] + counts[row]])
        masks = tissue_masks(block)
        out[i] = [masks[k].sum() / max(1, block.shape[0]) for k in ("muscle", "fat", "thigh")]
    return out


def _counting(monkeypatch):
    calls = []
    real = body_size.pixel_areas

    def counted(store, rows):
        calls.append(len(rows))
        return real(store, rows)

    monkeypatch.setattr(body_size, "pixel_areas", counted)
    return calls


def test_cached_areas_equal_measuring_each_subject(store, tmp_path, monkeypatch):
    monkeypatch.setenv("THIGHMRI_FEATURE_CACHE", str(tmp_path))
    rows = np.array([5, 0, 11, 3, 3, 15])  # unsorted, repeated, not contiguous
    scale = body_size._pixel_area_cm2(store.subjects, rows, None)[0]
    reference = _reference_areas(store, rows) * scale[:, None]
    uncached = thigh_areas(store, rows, cache=False)
    cold = thigh_areas(store, rows)  # miss: every subject measured, written
    assert (tmp_path / "areas").is_dir() and len(list((tmp_path / "areas").glob("*.npz"))) == 1
    size_cache._MEMO.clear()
    warm = thigh_areas(store, rows)  # hit: read from the file
    for got in (uncached, cold, warm):
        assert np.array_equal(got.to_numpy(), reference)  # bit for bit, not just close
        assert got.attrs["unit"] == "cm2" and list(got.index) == rows.tolist()
    # spacing still applies per row, after the cache
    px = thigh_areas(store, rows, pixel_spacing_mm=(1.0, 1.0))
    assert np.array_equal(px.to_numpy(), reference / scale[:, None] * (1.0 / 100.0))


def test_size_baseline_same_with_and_without_cache(store, tmp_path, monkeypatch):
    monkeypatch.setenv("THIGHMRI_FEATURE_CACHE", str(tmp_path))
    rows = np.arange(len(store.subjects))
    labels = (store.subjects["bmi"].to_numpy(dtype=float) > store.subjects["bmi"].median()).astype(np.int64)
    split = data.split_subjects(rows, labels, val=0.25, test=0.25, seed=0)
    by_part = {k: labels[v] for k, v in split.items()}
    unhashed = dataclasses.replace(store, content_hash="")  # no hash: nothing cached, measured now
    calls = _counting(monkeypatch)
    plain = size_baseline(unhashed, split, by_part, seed=0, n_boot=100)
    assert calls == [len(rows)] and not (tmp_path / "areas").exists()
    cached = size_baseline(store, split, by_part, seed=0, n_boot=100)
    assert calls == [len(rows), len(store.subjects)]
    assert plain.keys() == cached.keys()
    for k, v in plain.items():
        assert np.array_equal(np.asarray(v), np.asarray(cached[k])) if not isinstance(v, dict) else v == cached[k], k


def test_hit_reads_no_images_and_key_follows_store_and_code(store, tmp_path, monkeypatch):
    monkeypatch.setenv("THIGHMRI_FEATURE_CACHE", str(tmp_path))
    calls = _counting(monkeypatch)
    first = thigh_areas(store, np.arange(4))
    size_cache._MEMO.clear()
    thigh_areas(store, np.arange(4))
    assert calls == [len(store.subjects)]  # the second call read the file, not the store
    other = dataclasses.replace(store, content_hash="sha256:" + "0" * 64)  # a rebuilt store
    assert size_cache.table_path(other, "areas", AREAS_CODE) != size_cache.table_path(store, "areas", AREAS_CODE)
    again = thigh_areas(other, np.arange(4))
    assert len(calls) == 2 and np.array_equal(again.to_numpy(), first.to_numpy())
    monkeypatch.setattr(body_size, "AREAS_CODE", AREAS_CODE + " changed")  # other thresholds
    thigh_areas(store, np.arange(4))
    assert len(calls) == 3
    assert len(list(size_cache.table_path(store, "areas", AREAS_CODE).parent.glob("*.npz"))) == 3


def test_damaged_or_foreign_file_is_recomputed(store, tmp_path):
    path = size_cache.table_path(store, "areas", AREAS_CODE, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 half a file")  # what a non-atomic writer could leave
    n = len(store.subjects)
    table = size_cache.cached_subject_table(store, "areas", AREAS_CODE, lambda: np.ones((n, 3)), cache_dir=tmp_path)
    assert np.array_equal(table, np.ones((n, 3)))
    with np.load(path) as f:
        assert str(f["content_hash"]) == store.content_hash and str(f["code"]) == AREAS_CODE
    size_cache._MEMO.clear()  # a file of another code under this name is not taken either
    table = size_cache.cached_subject_table(store, "areas", AREAS_CODE + "x", lambda: np.zeros((n, 3)),
                                            cache_dir=tmp_path)
    assert not table.any()


def test_failed_write_leaves_no_file_and_no_temporary(store, tmp_path, monkeypatch):
    n = len(store.subjects)

    def broken_savez(fh, **arrays):
        fh.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(size_cache.np, "savez", broken_savez)
    with pytest.warns(UserWarning, match="not cached"):
        table = size_cache.cached_subject_table(store, "areas", AREAS_CODE, lambda: np.full((n, 3), 2.0),
                                                cache_dir=tmp_path)
    assert np.array_equal(table, np.full((n, 3), 2.0))
    assert [p.suffix for p in (tmp_path / "areas").iterdir()] == [".lock"]  # no npz, no temporary


def test_unwritable_cache_dir_computes_with_a_warning(store, tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache folder should be")  # fails even for root
    monkeypatch.setenv("THIGHMRI_FEATURE_CACHE", str(blocker / "cache"))
    with pytest.warns(UserWarning, match="not cached"):
        areas = thigh_areas(store, np.array([2, 7]))
    assert np.array_equal(areas.to_numpy(), thigh_areas(store, np.array([2, 7]), cache=False).to_numpy())


def test_second_process_waits_for_the_first_then_reads(store, tmp_path):
    """While one process holds the lock computing, another blocks, then takes its file."""
    n = len(store.subjects)
    path = size_cache.table_path(store, "areas", AREAS_CODE, tmp_path)
    path.parent.mkdir(parents=True)
    got, computed = [], []
    with open(path.with_suffix(".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # "the first process" is computing
        waiter = threading.Thread(target=lambda: got.append(size_cache.cached_subject_table(
            store, "areas", AREAS_CODE, lambda: computed.append(1) or np.zeros((n, 3)), cache_dir=tmp_path)))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and not got  # blocked on the lock
        size_cache._write(path, np.full((n, 3), 3.0), store, AREAS_CODE)
    waiter.join(10)
    assert not computed and np.array_equal(got[0], np.full((n, 3), 3.0))


def test_subject_blocks_read_shards_like_zarr(store):
    rows = np.array([9, 1, 2, 3, 14, 0])
    starts = store.subjects["slice_start"].to_numpy()
    counts = store.subjects["slice_count"].to_numpy()
    seen = []
    for batch, images, batch_counts in size_cache.subject_blocks(store, rows, batch_bytes=1):  # one per batch
        assert batch.size == 1 and batch_counts[0] == counts[batch[0]]
        assert np.array_equal(images, store.images[starts[batch[0]]:starts[batch[0]] + counts[batch[0]]])
        seen.append(int(batch[0]))
    assert seen == rows.tolist()
    batch, images, _ = next(size_cache.subject_blocks(store, rows))  # all in one batch, runs joined
    assert np.array_equal(images, np.concatenate([store.images[starts[r]:starts[r] + counts[r]] for r in rows]))


def test_decode_shard_inverts_encode_shard():
    images = np.random.default_rng(0).integers(0, 65535, size=(5, 8, 16), dtype=np.uint16)
    data = encode_shard(images)
    assert np.array_equal(decode_shard(data, 5, 8, 16), images)
    with pytest.raises(ValueError, match="checksum"):
        decode_shard(data[:-1] + bytes([data[-1] ^ 1]), 5, 8, 16)
