"""Stores on object storage (a real S3-compatible server): upload + verify, read-only reads
through the node-local cache, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_store import _store

from data_prep.build_store import main as build_main
from data_prep.store import StoreError, open_store, upload_store, verify_store
from data_prep.store.remote import NodeCacheStore
from data_prep.store.upload import main


@pytest.fixture
def s3(s3_server, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    return s3_server


def _fs():
    import s3fs

    return s3fs.S3FileSystem()  # credentials and endpoint from the environment


def test_upload_verifies_and_reads_through_the_node_cache(s3, tmp_path, capsys):
    local = tmp_path / "s.zarr"
    digest = _store(local, n=4)
    url = s3.make_bucket("remote-read") + "/study/s.zarr"
    assert upload_store(local, url, progress=False) == []
    assert _fs().exists("remote-read/study/s.zarr.ingest_report.csv")
    assert main(["verify", url]) == 0 and f"{url}: OK" in capsys.readouterr().out
    assert build_main(["--verify", url]) == 0 and f"{url}: OK" in capsys.readouterr().out

    cache = tmp_path / "cache"
    store = open_store(url, cache_dir=cache)
    assert store.path == url and store.content_hash == digest
    assert isinstance(store.images.store, NodeCacheStore) and store.images.store.read_only
    expected = open_store(local)
    assert np.array_equal(store.subject_images(1), expected.subject_images(1))
    folder = cache / digest.split(":")[-1][:32]
    shards = sorted(p.name for p in (folder / "images").iterdir() if p.name.startswith("c."))
    assert shards == ["c.1.0.0"]  # only the participant read: one shard, fetched whole

    # a later reader on this node (a new process would do the same) uses the local copy:
    # with the object gone from the server, the cached participant still reads, others fail
    _fs().rm("remote-read/study/s.zarr/images/c.1.0.0")
    again = open_store(url, cache_dir=cache)
    assert np.array_equal(again.subject_images(1), expected.subject_images(1))
    assert again.images.store.fetched == 0
    assert np.array_equal(again.subject_images(2), expected.subject_images(2))  # from the server
    assert again.images.store.fetched == 1
    problems = verify_store(url)  # verify never uses a cache: it sees the missing object
    assert any("never written" in p for p in problems), problems


def test_a_store_is_written_once_and_refusals_name_the_problem(s3, tmp_path):
    local, other = tmp_path / "a.zarr", tmp_path / "b.zarr"
    _store(local, n=3)
    _store(other, n=4)
    url = s3.make_bucket("remote-refuse") + "/a.zarr"
    assert upload_store(local, url, progress=False) == []
    assert upload_store(local, url, progress=False) == []  # the same store again: nothing to do
    with pytest.raises(StoreError, match="already holds another store"):
        upload_store(other, url, progress=False)
    secret_url = f"s3://{s3.access_key}:{s3.secret_key}@remote-refuse/a.zarr"
    with pytest.raises(StoreError, match="carries credentials") as err:
        open_store(secret_url)
    assert s3.secret_key not in str(err.value) and s3.access_key not in str(err.value)
    # an interrupted upload (every object but the root metadata) is not a store at all
    _fs().rm("remote-refuse/a.zarr/zarr.json")
    with pytest.raises(StoreError, match="not a Zarr store"):
        open_store(url)
    assert verify_store(url)[0].startswith("cannot open")
    with pytest.raises(StoreError, match="not a Zarr store"):
        open_store(s3.make_bucket("remote-refuse") + "/nothing.zarr")


def test_a_refused_upload_is_reported_without_the_secret(s3, tmp_path, capsys):
    local = tmp_path / "c.zarr"
    _store(local, n=2)
    # the object storage refuses the write (no such bucket): exit 2, the cause, never a credential
    assert main(["upload", str(local), "s3://no-such-bucket-here/c.zarr"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no-such-bucket-here" in err
    assert s3.secret_key not in err and s3.access_key not in err
    from data_prep.store import redact

    assert redact(f"key={s3.secret_key}") == "key=<AWS_SECRET_ACCESS_KEY>"
    assert redact(f"id={s3.access_key}") == "id=<AWS_ACCESS_KEY_ID>"


def test_ingest_refuses_to_write_to_object_storage_and_says_how_to_copy_up(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_main(["--dicom", str(tmp_path), "--tables", str(tmp_path), "--cohort", "oai",
                    "--out", "s3://bucket/study.zarr", "--salt-file", str(tmp_path / "salt")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--out s3://bucket/study.zarr: ingest writes a local store" in err
    assert "data_prep/store/upload.py upload LOCAL URL" in err
    assert not (tmp_path / "s3:").exists() and not Path("s3:").exists()  # nothing written under a mangled path
