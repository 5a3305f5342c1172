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
from data_prep.store import (JOURNAL, StoreError, StoreWriter, ingest_report_path, open_store,
                             read_journal, verify_store)

RECIPE = Recipe(n_slices=3, size=(8, 16))
KEY = "oai:test"


def _subject(i: int) -> tuple[dict, np.ndarray, dict]:
    rng = np.random.default_rng(i)
    entry = {"folder": f"{i:016x}", "keys": [f"{i:016x}"], "problems": [],
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


def test_resume_drops_unjournaled_slices_and_matches_uninterrupted(tmp_path):
    reference = _store(tmp_path / "ref.zarr")
    path = tmp_path / "s.zarr"
    writer = StoreWriter.start(path, RECIPE, build_key=KEY)
    for i in range(2):
        writer.add(*_subject(i))
    # killed after writing the third participant's slices but before journaling them,
    # and while appending its journal line (torn, no newline)
    arr = zarr.open_array(str(path / "images"), mode="r+")
    arr.resize((9, 8, 16))
    arr[6:9] = 7
    with open(path / JOURNAL, "a", encoding="utf-8") as f:
        f.write('{"folder": "0000')
    header, entries = read_journal(path)
    assert header["build_key"] == KEY and len(entries) == 2
    assert (path / JOURNAL).read_bytes().endswith(b"}\n")  # torn line cut off
    resumed = StoreWriter.start(path, RECIPE, build_key=KEY)
    assert resumed.n_resumed == 2 and resumed.images.shape[0] == 6
    for i in range(2, 4):
        resumed.add(*_subject(i))
    assert _finish(resumed) == reference


def test_verify_lists_every_problem(tmp_path, capsys):
    path = tmp_path / "s.zarr"
    _store(path)
    # damage: a lost image chunk, an edited slice count, a wrong counts attribute
    (path / "images" / "c.4.0.0").unlink()
    counts = zarr.open_array(str(path / "subjects" / "slice_count"), mode="r+")
    counts[1] = 2
    root = zarr.open_group(str(path), mode="r+")
    root.attrs["counts"] = dict(root.attrs["counts"], subjects=5)
    problems = verify_store(path)
    text = "\n".join(problems)
    assert "1 of 12 image chunks were never written" in text and "slices 4" in text
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


def test_worker_encoded_chunks_are_zarrs_own_bytes(tmp_path):
    # workers compress slices (encode_slices) and the writer only writes the files: the
    # bytes must be exactly what zarr writes, and read back through zarr unchanged
    from data_prep.store import encode_slices, slice_digests

    entry, images, stats = _subject(0)
    plain = StoreWriter.start(tmp_path / "plain.zarr", RECIPE, build_key=KEY)
    plain.add(entry, images, stats)
    fast = StoreWriter.start(tmp_path / "fast.zarr", RECIPE, build_key=KEY)
    assert fast.takes_encoded
    fast.add(entry, None, stats, slice_digests(images), encoded=encode_slices(images))
    for i in range(RECIPE.n_slices):
        key = Path("images", f"c.{i}.0.0")
        assert (tmp_path / "fast.zarr" / key).read_bytes() == \
            (tmp_path / "plain.zarr" / key).read_bytes()
    assert _finish(plain) == _finish(fast)
    assert np.array_equal(open_store(tmp_path / "fast.zarr").images[:], images)
    bad = StoreWriter.start(tmp_path / "bad.zarr", RECIPE, build_key=KEY)
    with pytest.raises(StoreError, match="3 blosc chunks of 256 bytes"):
        bad.add(entry, None, stats, slice_digests(images), encoded=encode_slices(images[:2]))


def test_store_with_another_codec_is_written_through_zarr(tmp_path):
    # a store made before IMAGE_CODEC (zarr's default zstd) still takes appends: the writer
    # refuses worker-encoded chunks for it, and build_store then sends it the images
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
    assert not writer.takes_encoded
    with pytest.raises(StoreError, match="does not use IMAGE_CODEC"):
        writer.add(entry, None, stats, ["00" * 32] * 3, encoded=[b""] * 3)
    writer.add(entry, images, stats)
    _finish(writer)
    assert np.array_equal(open_store(path).images[6:], images)
    assert verify_store(path) == []  # zarr's default "c/<slice>/0/0" chunk keys are found too
