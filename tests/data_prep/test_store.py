"""Store-level tests without DICOM: journal/resume mechanics, verify on damaged stores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from data_prep import build_store
from data_prep.preprocess import Recipe
from data_prep.store.journal import JournalWriter
from data_prep.store.shards import (IMAGE_CHUNK_KEYS, IMAGE_CODEC, STAGING, create_image_array,
                                    encode_shard, write_shard)
from data_prep.store import (JOURNAL, StoreError, StoreWriter, ingest_report_path, open_store,
                             read_journal, slice_digests, verify_store)

RECIPE = Recipe(n_slices=3, size=(8, 16))
KEY = "oai:test"


def _subject(i: int) -> tuple[dict, np.ndarray, dict]:
    rng = np.random.default_rng(i)
    entry = {"participant": f"{i:016x}", "problems": [],
             "row": {"subject_id": f"{i:016x}", "cohort": "oai", "sex": "female", "age": 60.0 + i,
                     "bmi": 25.0, "leg_strength": 900.0 + i, "pixel_spacing_row_mm": 0.98,
                     "pixel_spacing_col_mm": 0.98}}
    images = rng.integers(1, 65535, size=(3, 8, 16), dtype=np.uint16)
    return entry, images, {"intensity_low": 1.0, "intensity_high": 2.0 + i}


def _finish(writer: StoreWriter) -> str:
    problem = {"source": "abcdef0123456789", "reason": "no_table_row", "detail": "",
               "skipped": True}
    return writer.finish(cohort="oai", cohort_summary={}, ingest_problems=[problem],
                         provenance={"tool": "test"})


def _store(path: Path, n: int = 4) -> str:
    writer = StoreWriter.start(path, RECIPE, build_key=KEY)
    for i in range(n):
        writer.add(*_subject(i))
    return _finish(writer)


def test_finished_store_round_trip_and_report(tmp_path):
    path = tmp_path / "s.zarr"
    digest = _store(path)
    store = open_store(path)
    assert store.content_hash == digest and len(store.subjects) == 4
    assert np.array_equal(store.subject_images(2), _subject(2)[1])
    assert store.subjects["pixel_spacing_row_mm"].eq(0.98).all()
    assert store.slice_subject.tolist() == [i for i in range(4) for _ in range(3)]
    assert store.slice_position.tolist() == [0, 1, 2] * 4
    assert not (path / JOURNAL).exists()
    report = pd.read_csv(ingest_report_path(path))
    assert report["reason"].tolist() == ["no_table_row"] and report["cohort"].tolist() == ["oai"]
    assert verify_store(path) == []


def _old_layout(path: Path) -> np.ndarray:
    """Rewrite a store's images in the layout stores had before sharding: one unsharded
    IMAGE_CODEC chunk per slice, keys `c.<slice>.0.0`. Returns the images."""
    from zarr.codecs import BloscCodec

    root = zarr.open_group(str(path), mode="r+")
    old = root["images"][:]
    del root["images"]
    arr = root.create_array("images", shape=old.shape, chunks=(1, *old.shape[1:]),
                            dtype="uint16", fill_value=0, compressors=BloscCodec(**IMAGE_CODEC),
                            chunk_key_encoding=IMAGE_CHUNK_KEYS,
                            config={"write_empty_chunks": True})
    arr[:] = old
    return old


def test_resume_drops_unjournaled_shards_and_matches_uninterrupted(tmp_path):
    reference = _store(tmp_path / "ref.zarr")
    path = tmp_path / "s.zarr"
    writer = StoreWriter.start(path, RECIPE, build_key=KEY)
    for i in range(2):
        writer.add(*_subject(i))
    assert writer.sharded and writer.images.shape[0] == 0  # the shape is set by finish()
    # killed after the third participant's shard was renamed into place but before it was
    # journaled, while appending its journal line (torn, no newline), with a fourth's shard
    # still in staging and a stray shard beyond the final shape (an earlier kill)
    images = path / "images"
    (images / "c.2.0.0").write_bytes(encode_shard(np.full((3, 8, 16), 7, np.uint16)))
    (images / "c.6.0.0").write_bytes(encode_shard(np.full((3, 8, 16), 9, np.uint16)))
    write_shard(_subject(3)[1], writer.staged_path(3))
    with open(path / JOURNAL, "a", encoding="utf-8") as f:
        f.write('{"participant": "0000')
    header, entries = read_journal(path)
    assert header["build_key"] == KEY and len(entries) == 2
    assert (path / JOURNAL).read_bytes().endswith(b"}\n")  # torn line cut off
    resumed = StoreWriter.start(path, RECIPE, build_key=KEY)
    assert resumed.n_resumed == 2 and resumed.n_slices == 6
    assert list((path / STAGING).iterdir()) == []  # staging emptied on resume
    for i in range(2, 4):
        resumed.add(*_subject(i))
    assert _finish(resumed) == reference
    assert sorted(p.name for p in images.iterdir()) == [
        "c.0.0.0", "c.1.0.0", "c.2.0.0", "c.3.0.0", "zarr.json"]  # stray shard deleted
    assert not (path / STAGING).exists()
    store = open_store(path)
    assert store.images.shape == (12, 8, 16)
    assert np.array_equal(store.images[6:9], _subject(2)[1])
    assert verify_store(path) == []


def test_verify_lists_every_problem(tmp_path, capsys):
    path = tmp_path / "s.zarr"
    _store(path)
    # damage: a lost shard (participant 1: slices 3-5), an edited slice count, a wrong
    # counts attribute
    (path / "images" / "c.1.0.0").unlink()
    counts = zarr.open_array(str(path / "subjects" / "slice_count"), mode="r+")
    counts[1] = 2
    root = zarr.open_group(str(path), mode="r+")
    root.attrs["counts"] = dict(root.attrs["counts"], subjects=5)
    problems = verify_store(path)
    text = "\n".join(problems)
    assert "3 of 12 image chunks were never written" in text and "slices 3-5" in text
    assert "3 slices differ from their recorded sha256: 3-5" in text
    assert "subject row 2: slice_start 6, expected 5" in text
    assert "subjects' slice_count values add up to 11 slices, images has 12" in text
    assert "counts attribute" in text
    assert "content_hash mismatch" in text and "slice_digest" not in text
    assert build_store.main(["--verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert out.count("PROBLEM:") == len(problems) >= 5


def test_verify_flags_bad_schema_and_ingest_entries(tmp_path):
    path = tmp_path / "s.zarr"
    _store(path)
    root = zarr.open_group(str(path), mode="r+")
    root.attrs["ingest_problems"] = [{"source": "x", "reason": "weird"}]
    assert any("ingest_problems entries [0]" in p for p in verify_store(path))
    root.attrs["schema_version"] = 1
    assert verify_store(path) == [f"cannot open: {path}: schema_version 1, this code reads 2"]


def test_append_is_refused_on_incomplete_and_keeps_base(tmp_path):
    path = tmp_path / "s.zarr"
    _store(path, n=2)
    first = open_store(path)
    writer = StoreWriter.start(path, RECIPE, build_key="somma:k", append=True)
    entry, images, stats = _subject(10)
    entry["row"]["cohort"] = "somma"
    writer.add(entry, images, stats)
    # interrupted append: the journal header holds the first cohort's table
    header, _ = read_journal(path)
    assert [r["subject_id"] for r in header["base"]["rows"]] == first.subjects["subject_id"].tolist()
    with pytest.raises(StoreError, match="Rerun the same"):
        open_store(path)
    resumed = StoreWriter.start(path, RECIPE, build_key="somma:k", append=True)
    resumed.finish(cohort="somma", cohort_summary={}, ingest_problems=[], provenance={})
    store = open_store(path)
    assert store.subjects["cohort"].tolist() == ["oai", "oai", "somma"]
    assert np.array_equal(store.images[:6], first.images[:])
    assert json.loads(json.dumps(store.attrs["counts"]))["per_cohort"] == {"oai": 2, "somma": 1}
    assert verify_store(path) == []


@pytest.mark.parametrize("n,size", [(3, (8, 16)), (15, (256, 512)), (1, (2, 3))])
def test_encode_shard_is_zarrs_own_shard(tmp_path, n, size):
    # workers build whole shard files (encode_shard): the bytes must be exactly what zarr
    # writes for that shard, and zarr must read them back unchanged
    rng = np.random.default_rng(n)
    images = rng.integers(0, 4000, size=(n, *size), dtype=np.uint16)
    images[0] = 0  # an empty slice is stored too (write_empty_chunks)
    root = zarr.open_group(str(tmp_path / "z.zarr"), mode="w")
    arr = create_image_array(root, Recipe(n_slices=n, size=size))
    arr.resize((3 * n, *size))
    arr[n:2 * n] = images
    assert (tmp_path / "z.zarr" / "images" / "c.1.0.0").read_bytes() == encode_shard(images)
    (tmp_path / "z.zarr" / "images" / "c.2.0.0").write_bytes(encode_shard(images[::-1]))
    back = zarr.open_array(str(tmp_path / "z.zarr" / "images"), mode="r")
    assert np.array_equal(back[2 * n:], images[::-1]) and np.array_equal(back[n:2 * n], images)
    assert np.array_equal(back[2 * n + n // 2], images[n - 1 - n // 2])  # one inner chunk


def test_staged_shard_is_renamed_into_place(tmp_path):
    entry, images, stats = _subject(0)
    plain = StoreWriter.start(tmp_path / "plain.zarr", RECIPE, build_key=KEY)
    plain.add(entry, images, stats)  # in-process: encoded and renamed by the writer
    fast = StoreWriter.start(tmp_path / "fast.zarr", RECIPE, build_key=KEY)
    staged = fast.staged_path(0)
    assert staged.parent == tmp_path / "fast.zarr" / STAGING
    write_shard(images, staged)  # what a worker does
    fast.add(entry, None, stats, slice_digests(images), staged=staged)
    assert not staged.exists()
    shard = Path("images", "c.0.0.0")
    assert (tmp_path / "fast.zarr" / shard).read_bytes() == \
        (tmp_path / "plain.zarr" / shard).read_bytes() == encode_shard(images)
    assert _finish(plain) == _finish(fast)
    store = open_store(tmp_path / "fast.zarr")
    assert store.images.shards == (3, 8, 16) and store.images.chunks == (1, 8, 16)
    assert np.array_equal(store.images[:], images)
    assert np.array_equal(store.images[1], images[1])
    assert verify_store(tmp_path / "fast.zarr") == []
    bad = StoreWriter.start(tmp_path / "bad.zarr", RECIPE, build_key=KEY)
    write_shard(images, bad.staged_path(0))
    with pytest.raises(StoreError, match="needs its 3 slice digests"):
        bad.add(entry, None, stats, slice_digests(images[:2]), staged=bad.staged_path(0))


def test_store_with_another_codec_is_written_through_zarr(tmp_path):
    # a store made before IMAGE_CODEC (zarr's default zstd) still takes appends: the writer
    # refuses staged shards for it, and build_store then sends it the images
    from zarr.codecs import ZstdCodec

    path = tmp_path / "old.zarr"
    _store(path, n=2)
    root = zarr.open_group(str(path), mode="r+")
    old = root["images"][:]
    del root["images"]
    root.create_array("images", shape=old.shape, chunks=(1, 8, 16), dtype="uint16",
                      compressors=ZstdCodec(level=0))[:] = old
    entry, images, stats = _subject(7)
    writer = StoreWriter.start(path, RECIPE, build_key="somma:x", append=True)
    assert not writer.sharded and writer.staged_path(0) is None
    with pytest.raises(StoreError, match="not one shard per participant"):
        writer.add(entry, None, stats, ["00" * 32] * 3, staged=tmp_path / "x.shard")
    writer.add(entry, images, stats)
    _finish(writer)
    assert np.array_equal(open_store(path).images[6:], images)
    assert verify_store(path) == []  # zarr's default "c/<slice>/0/0" chunk keys are found too


def test_append_to_old_layout_store_resumes(tmp_path):
    # a store made before sharding (one unsharded chunk per slice) is read, verified and
    # appended to through zarr, growing per participant; an interrupted append resumes
    path = tmp_path / "old.zarr"
    _store(path, n=2)
    old = _old_layout(path)
    assert verify_store(path) == [] and open_store(path).images.shards is None
    writer = StoreWriter.start(path, RECIPE, build_key="somma:x", append=True)
    assert not writer.sharded and not (path / STAGING).exists()
    writer.add(*_subject(5))
    # killed after the next participant's slices were written but before its journal line
    writer.images.resize((12, 8, 16))
    writer.images[9:12] = 7
    resumed = StoreWriter.start(path, RECIPE, build_key="somma:x", append=True)
    assert resumed.n_resumed == 1 and resumed.images.shape[0] == 9
    resumed.add(*_subject(6))
    _finish(resumed)
    store = open_store(path)
    assert store.images.shape == (12, 8, 16) and store.images.shards is None
    assert sorted(p.name for p in (path / "images").iterdir())[:3] == [
        "c.0.0.0", "c.1.0.0", "c.10.0.0"]  # one file per slice
    assert np.array_equal(store.images[:6], old)
    assert np.array_equal(store.subject_images(3), _subject(6)[1])
    assert np.array_equal(store.images[7], _subject(5)[1][1])
    assert verify_store(path) == []
    (path / "images" / "c.4.0.0").unlink()
    assert any("1 of 12 image chunks were never written (they would read as zeros): "
               "slices 4" in p
               for p in verify_store(path))


def test_verify_reports_leftover_staging_and_damaged_shard_index(tmp_path):
    path = tmp_path / "s.zarr"
    _store(path, n=3)
    (path / STAGING).mkdir()
    shard = path / "images" / "c.2.0.0"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # the index checksum
    shard.write_bytes(bytes(data))
    problems = verify_store(path)
    assert any(f"staging folder ({STAGING}) is present" in p for p in problems)
    assert any("1 image shards have a damaged index" in p and "c.2.0.0" in p for p in problems)
    assert any("3 of 9 image chunks were never written" in p for p in problems)


def test_journal_fsyncs_at_most_once_per_interval(tmp_path, monkeypatch):
    from data_prep.store import journal

    calls = []
    real = journal.os.fsync
    monkeypatch.setattr(journal.os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    path = tmp_path / "j.jsonl"
    slow = JournalWriter(path, sync_interval=3600)
    for i in range(20):
        slow.append({"i": i})
    assert calls == [] and len(path.read_text().splitlines()) == 20  # flushed, not synced
    slow.close()
    assert len(calls) == 1
    eager = JournalWriter(path, sync_interval=0)
    for i in range(3):
        eager.append({"i": i})
    eager.close()
    assert len(calls) == 1 + 3 + 1
