"""Participants by header (data_prep/dicom/participants.py): any depth, any folder names."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from test_dicom_series import CORONAL, write_series

from data_prep.dicom import find_participants, participant_tag, read_thigh_volume
from data_prep.dicom.fast import read_text
from data_prep.dicom.participants import DicomTreeError, scan_root

PATIENT_ID = 0x00100020
PATTERNS = ["^AX_T1_THIGH$"]


def oai_tree(root: Path) -> Path:
    """OAI's release tree: <visit>/<batch>/<ID>/<date>/<series>/<image>; 9000002's localizer
    sits in a second batch folder, and every folder name is unlike a PatientID."""
    visit = root / "00m"
    write_series(visit / "0.C.1" / "9000001" / "20040909" / "10693717", n=15,
                 patient_id="9000001")
    write_series(visit / "0.C.1" / "9000001" / "20040909" / "10693711", n=3, seed=1,
                 patient_id="9000001", description="MP_LOCATOR_THIGH", orientation=CORONAL,
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), series_number=1)
    write_series(visit / "0.C.2" / "9000002" / "20041011" / "20417700", n=15, seed=2,
                 patient_id="9000002")
    write_series(visit / "0.E.1" / "9000002" / "20041011" / "20417690", n=3, seed=3,
                 patient_id="9000002", description="MP_LOCATOR_THIGH", orientation=CORONAL,
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), series_number=1)
    write_series(root / "24m" / "0.C.1" / "9000001" / "20060909" / "30000001", n=15, seed=4,
                 patient_id="9000001")  # another visit: never read for 00m
    return root


def keys_and_counts(found) -> dict[str, int]:
    return {p.key: len(p.paths()) for p in found.participants}


def test_oai_release_tree_groups_by_patient_id_across_batches(tmp_path):
    oai_tree(tmp_path)
    (tmp_path / "00m" / "0.C.1" / "9000001" / "notes.txt").write_text("scanner log\n")
    (tmp_path / "00m" / "README").write_text("batch list\n")  # no participant's folder
    found = find_participants(tmp_path, visit_folder="00m", other_visit_folders=["24m"])
    assert found.root == tmp_path / "00m"
    assert keys_and_counts(found) == {"9000001": 18, "9000002": 18}  # split: one participant
    p1, p2 = found.participants
    assert {Path(f).parent.parent.parent.name for f, _ in p2.parts} == {"0.C.2", "0.E.1"}
    assert [(Path(f).name, r) for f, r, _ in p1.problems] == [("notes.txt", "not_dicom")]
    assert [(Path(f).name, r) for f, r, _ in found.problems] == [("README", "not_dicom")]
    assert found.n_files == 38 and found.n_outside_visit == 0
    # a folder of one participant is kept as the folder alone (memory: O(folders))
    assert all(names is None for _, names in p2.parts)
    volume, _, selection = read_thigh_volume(p2.paths(), PATTERNS)
    assert volume.shape[0] == 15 and selection.series.patient_key == "9000002"
    # the other visit, through the same spec rules
    later = find_participants(tmp_path, visit_folder="24m", other_visit_folders=["00m"])
    assert keys_and_counts(later) == {"9000001": 15}


def test_parallel_scan_gives_the_same_participants(tmp_path):
    oai_tree(tmp_path)
    serial = find_participants(tmp_path, visit_folder="00m", other_visit_folders=["24m"])
    with ProcessPoolExecutor(2) as pool:
        parallel = find_participants(tmp_path, visit_folder="00m", other_visit_folders=["24m"],
                                     map_fn=pool.map, workers=2)
    assert parallel == serial


def test_visit_folder_below_the_participant_and_other_visits_pruned(tmp_path):
    # a site's own layout: <ID>/<visit>/<series>/...; files outside any visit folder count
    write_series(tmp_path / "V01" / "00m" / "t1", n=15, patient_id="V01")
    write_series(tmp_path / "V01" / "24m" / "t1", n=15, seed=1, patient_id="V01")
    write_series(tmp_path / "V02" / "00m" / "t1", n=15, seed=2, patient_id="V02")
    write_series(tmp_path / "V02" / "scout", n=3, seed=3, patient_id="V02")
    found = find_participants(tmp_path, visit_folder="00m", other_visit_folders=["24m"])
    assert found.root == tmp_path and keys_and_counts(found) == {"V01": 15, "V02": 15}
    assert found.n_outside_visit == 3  # V02/scout: not under a 00m folder, not read
    with pytest.raises(DicomTreeError, match=r"no folder named '12m'.*other visits found: "
                                             r"\['24m'\]"):
        scan_root(tmp_path, "12m", ["24m"])


def test_one_flat_folder_and_a_folder_shared_by_two_participants(tmp_path):
    write_series(tmp_path / "all", n=15, patient_id="A1")
    write_series(tmp_path / "all", n=15, seed=1, patient_id="B2")
    found = find_participants(tmp_path)
    assert keys_and_counts(found) == {"A1": 15, "B2": 15}
    assert all(names is not None and len(names) == 15 for p in found.participants
               for _, names in p.parts)
    (tmp_path / "all" / "notes.txt").write_text("x")  # two participants there: nobody's file
    found = find_participants(tmp_path)
    assert [Path(f).name for f, _, _ in found.problems] == ["notes.txt"]
    assert all(not p.problems for p in found.participants)


def test_images_without_patient_id(tmp_path):
    files = write_series(tmp_path / "00m" / "0.C.1" / "9000003" / "s", n=15, patient_id="")
    found = find_participants(tmp_path, visit_folder="00m")
    assert found.participants == [] and len(found.problems) == 15
    assert {r for _, r, _ in found.problems} == {"no_patient_id"}
    # the spec says folders two levels below the visit are IDs: they name the participant
    found = find_participants(tmp_path, visit_folder="00m", participant_depth=2)
    assert keys_and_counts(found) == {"9000003": 15} and not found.problems
    # another participant in the same batch does not take them over
    write_series(tmp_path / "00m" / "0.C.1" / "9000004" / "s", n=15, patient_id="9000004")
    found = find_participants(tmp_path, visit_folder="00m")
    assert keys_and_counts(found) == {"9000004": 15} and not found.participants[0].problems
    assert len(found.problems) == 15 and Path(found.problems[0][0]).parent == files[0].parent
    # an image without it among a participant's own: reported under that participant, unused
    ds = pydicom.dcmread(files[0])
    ds.PatientID = ""
    ds.save_as(tmp_path / "00m" / "0.C.1" / "9000004" / "s" / "extra")
    (p4,) = find_participants(tmp_path, visit_folder="00m").participants
    assert [(Path(f).name, r) for f, r, _ in p4.problems] == [("extra", "no_patient_id")]
    assert len(p4.paths()) == 15


def test_another_tag_names_the_participant(tmp_path):
    write_series(tmp_path / "a", n=3, patient_id="9000001")
    ds_files = write_series(tmp_path / "b", n=3, seed=1, patient_id="9000001")
    for path in ds_files:  # same PatientID, another accession number
        ds = pydicom.dcmread(path)
        ds.AccessionNumber = "ACC2"
        ds.save_as(path)
    assert keys_and_counts(find_participants(tmp_path)) == {"9000001": 6}
    found = find_participants(tmp_path, tag="AccessionNumber")  # the template has none
    assert keys_and_counts(found) == {"ACC2": 3}
    assert [r for _, r, d in found.problems] == ["no_patient_id"] * 3
    assert "without AccessionNumber" in found.problems[0][2]
    with pytest.raises(ValueError, match="not a DICOM keyword"):
        participant_tag("PatientIdentifier")


@pytest.mark.parametrize("name", [
    "MR_small.dcm", "CT_small.dcm", "MR_small_implicit.dcm", "rtplan.dcm", "JPEG2000.dcm",
    "MR_small_bigendian.dcm", "no_meta.dcm", "image_dfl.dcm", "UN_sequence.dcm",
    "nested_priv_SQ.dcm", "MR_truncated.dcm", "rtplan_truncated.dcm", "empty_charset_LEI.dcm",
    "badVR.dcm", "priv_SQ.dcm", "reportsi.dcm"])
def test_read_text_agrees_with_pydicom_or_declines(name):
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not among this pydicom's bundled test files: choose another case"
    value = read_text(path, PATIENT_ID)
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    expected = str(ds.get("PatientID", "") or "").strip()
    assert value is None or value == expected
    if name in ("MR_small.dcm", "MR_small_implicit.dcm", "CT_small.dcm"):
        assert value == expected != ""  # the common files are answered without pydicom
