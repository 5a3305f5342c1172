"""End to end: synthetic DICOM cohort -> build_store CLI -> Zarr store -> open / verify.

Uses data_prep/synthetic (small matrix) for the cohorts, OAI in its release's tree (visit /
batch / ID / date / series / image, one participant split over two batches); problems
(non-DICOM file, truncated slice, participant without a table row) are planted on top.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import zarr

from data_prep.synthetic.phantom import pixel_spacing
from data_prep.synthetic.subjects import TABLE_ONLY_OAI
from data_prep.synthetic import generate_cohort
from data_prep import build_store
from data_prep.dicom import find_participants
from data_prep.ingest import DELAY_ENV, SPACE_MARGIN, space_needed
from data_prep.ingest.worker import process_participant
from data_prep.store import (JOURNAL, REPORT_COLUMNS, StoreError, StoreWriter, ingest_report_path,
                             load_salt, open_store, pseudonym, verify_store)
from data_prep.preprocess import Recipe

SALT = "test-salt-0123456789abcdef"
N_SUBJECTS = 12
SIZE = "32x64"


def imaged(cohort: Path) -> pd.DataFrame:
    """truth.csv's imaged OAI participants, sorted by ID (the store's order)."""
    truth = pd.read_csv(cohort / "truth.csv", dtype={"id": str}, keep_default_na=False)
    truth = truth[(truth["cohort"] == "oai") & truth["has_images"]]
    return truth.sort_values("id").reset_index(drop=True)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate_cohort(out, subjects=N_SUBJECTS, seed=0, matrix=(64, 128))
    oai = imaged(out)
    assert (oai["dicom_dir"] != oai["localizer_dir"]).sum() >= 1  # split over two batches
    # planted problems: a non-DICOM file (not fatal), a truncated thigh slice (participant
    # skipped), a participant whose table rows are removed (skipped: no table row)
    (out / oai["dicom_dir"][0]).parent.joinpath("notes.txt").write_text("scanner log\n")
    thigh = sorted(p for p in (out / oai["dicom_dir"][1]).rglob("*") if p.is_file()
                   and pydicom.dcmread(p, stop_before_pixels=True).SeriesDescription
                   == "AX_T1_THIGH")
    data = thigh[0].read_bytes()
    thigh[0].write_bytes(data[: len(data) - 2000])
    dropped = oai["id"][2]
    for rel in ("AllClinical_ASCII/AllClinical00.txt", "General_ASCII/Enrollees.txt"):
        path = out / "oai" / "tables" / rel
        lines = path.read_bytes().split(b"\r\n")
        path.write_bytes(b"\r\n".join(l for l in lines if not l.startswith(dropped.encode())))
    return out


def run_build(cohort: Path, out: Path, name="oai", *extra: str) -> int:
    return build_store.main([
        "--dicom", str(cohort / name / "dicom"), "--tables", str(cohort / name / "tables"),
        "--cohort", name, "--out", str(out), "--size", SIZE, "--n-slices", "15",
        "--workers", "2", "--no-progress", *extra])


@pytest.fixture(scope="module")
def built(cohort, tmp_path_factory) -> Path:
    mp = pytest.MonkeyPatch()
    mp.setenv("THIGHMRI_SALT", SALT)
    out = tmp_path_factory.mktemp("store") / "oai.zarr"
    assert run_build(cohort, out) == 0
    mp.undo()
    return out


def collect_phi(cohort: Path) -> set[str]:
    """Every identifying header value of every DICOM file in the synthetic cohort."""
    phi: set[str] = set()
    for path in cohort.rglob("*"):
        if not path.is_file() or path.suffix in (".txt", ".csv", ".json"):
            continue
        try:
            with warnings.catch_warnings():  # keep the test's own reads out of captured output
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - planted junk
            continue
        for tag in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName",
                    "AccessionNumber", "StudyInstanceUID", "SeriesInstanceUID",
                    "SOPInstanceUID", "FrameOfReferenceUID"):
            value = str(ds.get(tag, "") or "").strip()
            if len(value) >= 5:  # shorter strings would match by chance in binary data
                phi.add(value)
                if tag == "PatientName":
                    phi.update(part for part in value.split("^") if len(part) >= 5)
    return phi


def test_build_open_round_trip(built, cohort):
    store = open_store(built)
    s = store.subjects
    oai = imaged(cohort)["id"].tolist()
    assert len(oai) == N_SUBJECTS
    assert len(s) == len(oai) - 2  # truncated series + no table row skipped
    assert store.images.shape == (15 * len(s), 32, 64) and store.images.dtype == np.uint16
    assert store.images.chunks == (1, 32, 64) and store.images.shards == (15, 32, 64)
    assert not (built / "build_staging").exists()
    assert s["slice_count"].eq(15).all() and (s["slice_start"] == np.arange(len(s)) * 15).all()
    assert set(s["cohort"]) == {"oai"} and set(s["sex"]) <= {"male", "female"}
    assert s["subject_id"].str.fullmatch(r"[0-9a-f]{16}").all()
    assert s["subject_id"].tolist() == [pseudonym(SALT.encode(), "oai", k) for k in oai
                                        if k in set(oai) - {oai[1], oai[2]}]
    assert s["leg_strength"].notna().sum() > 0 and s["age"].notna().all()
    assert store.recipe == Recipe(n_slices=15, size=(32, 64))
    assert store.measures["gait_400m"]["direction"] == "lower"
    assert store.measures["leg_strength"]["direction"] == "higher"
    assert store.subject_images(1).shape == (15, 32, 64) and store.subject_images(1).max() > 0
    split = imaged(cohort).query("dicom_dir != localizer_dir")["id"]
    assert set(pseudonym(SALT.encode(), "oai", k) for k in split) <= set(s["subject_id"])
    reasons = {p["reason"]: p for p in store.attrs["ingest_problems"]}
    pid = [pseudonym(SALT.encode(), "oai", k) for k in oai]
    assert reasons["no_table_row"]["source"] == pid[2] and reasons["no_table_row"]["skipped"]
    assert reasons["truncated"]["skipped"] is True
    assert re.fullmatch(pid[1] + r"/file#\d+", reasons["truncated"]["source"])
    assert reasons["not_dicom"]["skipped"] is False
    assert re.fullmatch(pid[0] + r"/file#\d+", reasons["not_dicom"]["source"])
    # OAI has table-only participants (tables but no scan), and the dropped one is not one
    no_images = [p for p in store.attrs["ingest_problems"] if p["reason"] == "no_images"]
    assert len(no_images) == TABLE_ONLY_OAI and all(p["skipped"] for p in no_images)
    assert pid[2] not in {p["source"] for p in no_images}
    report = pd.read_csv(ingest_report_path(built))
    assert list(report.columns) == list(REPORT_COLUMNS)
    assert len(report) == len(store.attrs["ingest_problems"])
    assert set(report["reason"]) == {"no_table_row", "truncated", "not_dicom", "no_images"}
    accounting = store.attrs["cohorts"]["oai"]["accounting"]
    assert accounting["table_rows"] == {"n": N_SUBJECTS - 1 + TABLE_ONLY_OAI,
                                        "ingested": len(s), "not_ingested": {
                                            "no_images": TABLE_ONLY_OAI, "truncated": 1}}
    assert accounting["dicom_participants"] == {"n": N_SUBJECTS, "ingested": len(s),
                                                "not_ingested": {"no_table_row": 1,
                                                                 "truncated": 1}}
    # pixel spacing of the stored images: synthetic FOV 250 x 500 mm -> 32 x 64 pixels
    fov = pixel_spacing((64, 128))
    assert np.allclose(s["pixel_spacing_row_mm"], fov[0] * 64 / 32)
    assert np.allclose(s["pixel_spacing_col_mm"], fov[1] * 128 / 64)
    assert store.content_hash.startswith("sha256:")
    assert verify_store(built) == []
    assert build_store.main(["--verify", str(built)]) == 0


def test_hash_stable_across_builds_and_tamper_detected(built, cohort, tmp_path, monkeypatch):
    monkeypatch.setenv("THIGHMRI_SALT", SALT)
    again = tmp_path / "again.zarr"
    assert run_build(cohort, again, "oai", "--workers", "1") == 0
    assert open_store(again).content_hash == open_store(built).content_hash
    root = zarr.open_group(str(again), mode="r+")
    root["images"][3, 0, 0] = int(root["images"][3, 0, 0]) ^ 1
    problems = verify_store(again)
    assert any("content_hash mismatch" in p for p in problems)
    assert "1 slices differ from their recorded sha256: 3" in problems  # pinpointed


def test_append_somma(built, cohort, tmp_path, monkeypatch):
    monkeypatch.setenv("THIGHMRI_SALT", SALT)
    both = tmp_path / "both.zarr"
    shutil.copytree(built, both)
    n_oai = len(open_store(both).subjects)
    assert run_build(cohort, both, "somma", "--append") == 0
    store = open_store(both)
    s = store.subjects
    assert (s["cohort"] == "oai").sum() == n_oai and (s["cohort"] == "somma").sum() > 0
    assert store.images.shape[0] == 15 * len(s)
    assert set(store.attrs["cohorts"]) == {"oai", "somma"}
    assert verify_store(both) == []
    # a different recipe cannot be appended
    assert run_build(cohort, both, "volunteers", "--append", "--size", "16x32") == 1


def test_no_phi_anywhere_in_store(built, cohort):
    phi = collect_phi(cohort)
    assert len(phi) > 3 * N_SUBJECTS  # the cohort does carry PHI: the test can fail
    blobs = [p.read_bytes() for p in built.rglob("*") if p.is_file()]
    store = open_store(built)
    decoded = [json.dumps(store.attrs), store.subjects.to_json(), store.normalisation.to_json()]
    root = zarr.open_group(str(built), mode="r")
    for name, arr in root.arrays():
        decoded.append(np.asarray(arr[...]).tobytes().decode("latin-1"))
    text = "\n".join(decoded)
    for value in phi:
        assert all(value.encode() not in b for b in blobs), "PHI found in a store file"
        assert value not in text, "PHI found in decoded store content"


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "log"])
def test_no_phi_in_build_output(cohort, tmp_path, monkeypatch, capfd, terminal):
    phi = collect_phi(cohort / "oai")
    capfd.readouterr()
    monkeypatch.setenv("THIGHMRI_SALT", SALT)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    # with the planted problems and (on a terminal) the progress bar: every reporting path runs
    assert build_store.main([
        "--dicom", str(cohort / "oai" / "dicom"), "--tables", str(cohort / "oai" / "tables"),
        "--cohort", "oai", "--out", str(tmp_path / "o.zarr"), "--size", SIZE]) == 0
    out = capfd.readouterr()
    assert "participants ingested" in out.out and "no_table_row" in out.out
    # the bar shows on a terminal only: a log (make demo > log, a batch job) stays quiet
    assert ("ingest oai" in out.err) == terminal
    assert phi and not [v for v in phi if v in out.out + out.err]


def test_missing_salt_is_a_clear_error(cohort, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("THIGHMRI_SALT", raising=False)
    with pytest.raises(SystemExit) as exc:
        run_build(cohort, tmp_path / "x.zarr")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "THIGHMRI_SALT" in err and "--salt-file" in err and "secrets.token_hex" in err
    assert not (tmp_path / "x.zarr").exists()  # nothing was written
    salt_file = tmp_path / "salt.txt"
    salt_file.write_text(SALT + "\n")
    assert load_salt(salt_file) == SALT.encode()


def test_arguments_validated_before_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("THIGHMRI_SALT", SALT)
    with pytest.raises(SystemExit):
        build_store.main(["--dicom", str(tmp_path / "nope"), "--tables", str(tmp_path),
                          "--cohort", "oia", "--out", str(tmp_path / "o.zarr"),
                          "--size", "128by256"])
    err = capsys.readouterr().err
    assert "nope is not a directory" in err and "Unknown cohort 'oia'" in err
    assert "ROWSxCOLS" in err  # every problem reported at once


def _start_killable_build(cohort: Path, out: Path, name: str, *extra: str) -> subprocess.Popen:
    """The build CLI in its own process group, slowed down so it can be killed midway."""
    env = dict(os.environ, THIGHMRI_SALT=SALT, **{DELAY_ENV: "0.4"})
    cmd = [sys.executable, str(Path(build_store.__file__)), "--dicom",
           str(cohort / name / "dicom"), "--tables", str(cohort / name / "tables"),
           "--cohort", name, "--out", str(out), "--size", SIZE, "--n-slices", "15",
           "--workers", "2", "--no-progress", *extra]
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _kill_after(proc: subprocess.Popen, store: Path, n_entries: int) -> int:
    """SIGKILL the build's process group once `n_entries` participants are journaled."""
    journal = store / JOURNAL
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.is_file() and len(journal.read_bytes().splitlines()) >= 1 + n_entries:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"build ended before it could be killed: {proc.stderr.read()}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return len(journal.read_bytes().splitlines()) - 1


def test_killed_build_resumes_to_the_same_hash(built, cohort, tmp_path, monkeypatch, capsys):
    out = tmp_path / "killed.zarr"
    done = _kill_after(_start_killable_build(cohort, out, "oai"), out, 4)
    assert 4 <= done < N_SUBJECTS - 1  # the participant without a table row is never read
    with pytest.raises(StoreError, match="Rerun the same"):
        open_store(out)  # a half-written store is never read as complete
    assert any("incomplete" in p for p in verify_store(out))
    first_chunk = out / "images" / "c.0.0.0"
    stamp = first_chunk.stat().st_mtime_ns
    monkeypatch.setenv("THIGHMRI_SALT", SALT)
    capsys.readouterr()
    # other inputs (here: the recipe) do not resume an interrupted build: clear error
    assert run_build(cohort, out, "oai", "--size", "16x32") == 1
    assert "interrupted" in capsys.readouterr().err
    assert run_build(cohort, out) == 0  # the same command again: resumes
    printed = capsys.readouterr().out
    m = re.search(r"resumed an interrupted build: (\d+) participants were already done, "
                  r"(\d+) processed now", printed)
    assert m and int(m.group(1)) == done and int(m.group(2)) == N_SUBJECTS - 1 - done
    assert first_chunk.stat().st_mtime_ns == stamp  # finished participants were not redone
    assert open_store(out).content_hash == open_store(built).content_hash
    assert verify_store(out) == [] and not (out / JOURNAL).exists()


def test_too_little_disk_space_is_refused_before_any_participant_is_read(cohort, tmp_path,
                                                                       monkeypatch, capsys):
    monkeypatch.setenv("THIGHMRI_SALT", SALT)
    recipe = Recipe(n_slices=15, size=(32, 64))
    n = N_SUBJECTS - 1  # participants to read: all but the one without a table row
    need = space_needed(n, recipe, workers=1)
    assert need == (n + 2) * 15 * 32 * 64 * 2 + SPACE_MARGIN
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda path: real(path)._replace(free=need - 1))  # one byte short
    from data_prep.ingest import worker as ingest_worker

    def must_not_run(*args):
        raise AssertionError("a participant was read before the space check")

    monkeypatch.setattr(ingest_worker, "process_participant", must_not_run)
    out = tmp_path / "full.zarr"
    assert run_build(cohort, out, "oai", "--workers", "1") == 1  # in-process: the patch applies
    err = capsys.readouterr().err
    assert f"{n} participants x 15 slices of 32x64" in err and "GiB free" in err
    assert "--skip-space-check" in err
    assert not list(out.glob("images/c*"))  # no slice written


def test_disk_full_midway_stops_cleanly_and_resumes_to_the_same_hash(built, cohort, tmp_path,
                                                                     monkeypatch, capsys):
    import errno

    from data_prep.ingest import worker as ingest_worker
    from data_prep.store import read_journal

    monkeypatch.setenv("THIGHMRI_SALT", SALT)
    real_write, calls = ingest_worker.write_shard, []

    def fills_the_disk(images, path):  # the 6th shard hits a full disk halfway through
        calls.append(path)
        if len(calls) == 6:
            Path(path).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(images, path)

    monkeypatch.setattr(ingest_worker, "write_shard", fills_the_disk)
    out = tmp_path / "full.zarr"
    assert run_build(cohort, out, "oai", "--workers", "1") == 1  # in-process: the patch applies
    err = capsys.readouterr().err
    _, done = read_journal(out)
    assert 5 <= len(done) < N_SUBJECTS
    assert f"is full (No space left on device). {len(done)} participant(s)" in err
    assert "rerun the same command" in err and "Traceback" not in err
    with pytest.raises(StoreError):
        open_store(out)  # never read as complete
    monkeypatch.setattr(ingest_worker, "write_shard", real_write)  # space freed
    assert run_build(cohort, out) == 0
    assert open_store(out).content_hash == open_store(built).content_hash
    assert verify_store(out) == []


def test_killed_append_keeps_first_cohort_and_resumes(built, cohort, tmp_path, monkeypatch):
    monkeypatch.setenv("THIGHMRI_SALT", SALT)
    reference = tmp_path / "reference.zarr"
    shutil.copytree(built, reference)
    assert run_build(cohort, reference, "somma", "--append") == 0
    both = tmp_path / "both.zarr"
    shutil.copytree(built, both)
    first = open_store(built)
    done = _kill_after(_start_killable_build(cohort, both, "somma", "--append"), both, 2)
    assert done >= 2
    with pytest.raises(StoreError, match="incomplete"):
        open_store(both)
    partial = open_store(both, require_complete=False)
    n_first = first.images.shape[0]
    assert np.array_equal(partial.images[:n_first], first.images[:])  # first cohort intact
    assert run_build(cohort, both, "somma", "--append") == 0
    store = open_store(both)
    assert store.content_hash == open_store(reference).content_hash
    assert store.subjects.iloc[:len(first.subjects)].equals(first.subjects)
    assert verify_store(both) == []


def test_incomplete_store_refused(tmp_path):
    path = tmp_path / "partial.zarr"
    recipe = Recipe(n_slices=2, size=(4, 8))
    writer = StoreWriter.start(path, recipe, build_key="oai:x")
    writer.add({"participant": "f" * 16, "problems": [],
                "row": {"subject_id": "0" * 16, "cohort": "oai", "sex": "male"}},
               np.ones((2, 4, 8), np.uint16), {"intensity_low": 0, "intensity_high": 1})
    # the writer "crashed": finish() was never called
    with pytest.raises(StoreError, match="incomplete"):
        open_store(path)
    # the participant's shard is in place; the images array's shape is set only by finish()
    assert (path / "images" / "c.0.0.0").is_file()
    assert open_store(path, require_complete=False).images.shape[0] == 0
    assert any("incomplete" in p for p in verify_store(path))
    with pytest.raises(StoreError, match="interrupted"):  # another build: refused
        StoreWriter.start(path, recipe, build_key="oai:y")
    with pytest.raises(StoreError, match="holds a build of cohort .oai. that was interrupted"):
        StoreWriter.start(path, recipe, build_key="somma:z", append=True)


def test_wrong_orientation_and_too_few_slices_are_categorised(tmp_path):
    # the series selection's own category reaches the report: a coronal thigh series is
    # wrong_orientation (not no_thigh_series), a 10-slice one too_few_slices
    from test_dicom_series import CORONAL, write_series

    recipe = Recipe(n_slices=15, size=(32, 32))
    patterns = ["^AX_T1_THIGH$"]
    write_series(tmp_path / "coronal" / "s3", n=15, orientation=CORONAL)
    write_series(tmp_path / "coronal" / "s1", n=4, description="MP_LOCATOR_THIGH",
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), series_number=1)
    write_series(tmp_path / "short" / "s3", n=10)
    write_series(tmp_path / "good" / "s3", n=15)
    (tmp_path / "good" / "notes.txt").write_text("scanner log\n")
    reasons = {}
    for name in ("coronal", "short", "good"):
        (participant,) = find_participants(tmp_path / name).participants
        res = process_participant(participant, patterns, recipe)
        reasons[name] = [(p["reason"], p["fatal"]) for p in res.problems]
    assert reasons["coronal"] == [("wrong_orientation", True)]
    assert reasons["short"] == [("too_few_slices", True)]
    assert reasons["good"] == [("not_dicom", False)]  # SkippedFile.category, not fatal


def test_visit_option_picks_the_folder_and_unknown_visits_are_listed(cohort, tmp_path,
                                                                      monkeypatch, capsys):
    monkeypatch.setenv("THIGHMRI_SALT", SALT)
    with pytest.raises(SystemExit):
        run_build(cohort, tmp_path / "v.zarr", "oai", "--visit", "99m")
    err = capsys.readouterr().err
    assert "unknown visit '99m'" in err and "'24m'" in err
    with pytest.raises(SystemExit):  # a known visit without images in this tree
        run_build(cohort, tmp_path / "v.zarr", "oai", "--visit", "24m")
    assert "24m" in capsys.readouterr().err and not (tmp_path / "v.zarr").exists()
    # the baseline images copied under 24m/ and the table's V00 columns renamed V03 (the
    # 24m prefix): --visit 24m reads both
    dicom = tmp_path / "oai" / "dicom"
    shutil.copytree(cohort / "oai" / "dicom" / "00m", dicom / "24m")
    shutil.copytree(cohort / "oai" / "tables", tmp_path / "oai" / "tables")
    clinical = tmp_path / "oai" / "tables" / "AllClinical_ASCII" / "AllClinical00.txt"
    clinical.write_bytes(clinical.read_bytes().replace(b"V00", b"V03"))
    assert run_build(tmp_path, tmp_path / "v.zarr", "oai", "--visit", "24m") == 0
    store = open_store(tmp_path / "v.zarr")
    assert store.attrs["cohorts"]["oai"]["visit"] == "24m" and len(store.subjects) > 0
