"""Series discovery, selection and volume loading on real DICOM files written here."""

from __future__ import annotations

import copy
import dataclasses
import random

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from data_prep.dicom import (REASONS, SERIES_REJECTIONS, DicomSeriesError, decode_file, load_volume,
                             read_thigh_volume, scan_tree, select_thigh_series)

AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
CORONAL = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
SAGITTAL = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]


def write_series(folder, *, n=6, description="AX_T1_THIGH", orientation=AXIAL, z0=100.0,
                 dz=-5.0, slope=None, intercept=None, image_type=("ORIGINAL", "PRIMARY"),
                 patient_id="9000001", series_number=3, seed=0, series_time=None):
    """Write `n` single-frame slices with shuffled extensionless names.

    Slice k (InstanceNumber k+1) sits at z0 + k*dz and holds stored value 10*(k+1) + pixel
    noise-free ramp, so order and rescale can be checked exactly. Returns the file paths
    in InstanceNumber order.
    """
    template = pydicom.dcmread(get_testdata_file("MR_small.dcm", download=False))
    folder.mkdir(parents=True, exist_ok=True)
    uid = generate_uid()
    names = [f"{i:08d}" for i in random.Random(seed).sample(range(10**6), n)]
    normal = np.cross(orientation[:3], orientation[3:])
    paths = []
    for k in range(n):
        ds = copy.deepcopy(template)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesDescription = description
        ds.SeriesNumber = series_number
        if series_time is not None:
            ds.SeriesDate, ds.SeriesTime = "20050301", series_time
        ds.ImageType = list(image_type)
        ds.PatientID = patient_id
        ds.PatientName = "Doe^Jane"
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = list(orientation)
        ds.ImagePositionPatient = [float(v) for v in np.array([-80.0, -90.0, 0.0])
                                   + (z0 + k * dz) * normal]
        pixels = np.full((ds.Rows, ds.Columns), 10 * (k + 1), dtype=np.int16)
        ds.PixelData = pixels.tobytes()
        if slope is not None:
            ds.RescaleSlope = slope
            ds.RescaleIntercept = intercept or 0
        path = folder / names[k]
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_scan_ignores_localizer_and_orders_along_normal(tmp_path):
    write_series(tmp_path / "p" / "3", n=7, dz=-5.0)  # z decreases with InstanceNumber
    write_series(tmp_path / "p" / "1", n=3, description="MP_LOCATOR_THIGH", orientation=CORONAL,
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), series_number=1)
    scan = scan_tree(tmp_path)
    assert len(scan.series) == 2 and scan.skipped == []
    sel = select_thigh_series(scan.series, ["^AX_T1_THIGH$"])
    assert sel.series is not None and sel.series.description == "AX_T1_THIGH"
    assert [r for _, r in sel.rejected] == ["localizer"]
    volume, geom = load_volume(sel.series)
    assert volume.dtype == np.float32 and volume.shape == (7, 64, 64)
    # increasing z along the normal = reverse InstanceNumber order: values 70, 60, ..., 10
    assert volume[:, 0, 0].tolist() == [70, 60, 50, 40, 30, 20, 10]
    assert geom.slice_spacing == pytest.approx(5.0)
    assert np.all(np.diff(geom.positions) > 0)


def test_localizer_without_imagetype_rejected_by_orientation(tmp_path):
    write_series(tmp_path / "loc", n=3, description="AX_T1_THIGH", orientation=CORONAL)
    sel = select_thigh_series(scan_tree(tmp_path).series, ["AX_T1_THIGH"])
    assert sel.series is None and [r for _, r in sel.rejected] == ["wrong_orientation"]
    assert "wrong_orientation" in sel.note and "[0.0, 1.0, 0.0]" in sel.note


def test_description_pattern_is_configurable(tmp_path):
    write_series(tmp_path / "s", n=4, description="T1_AXIAL_THIGH")
    series = scan_tree(tmp_path).series
    assert select_thigh_series(series, ["^AX_T1_THIGH$"]).series is None
    assert select_thigh_series(series, ["T1.*AX.*THIGH"]).series is not None


def test_several_candidates_most_files_then_latest(tmp_path):
    write_series(tmp_path / "a", n=5, series_number=3, seed=1)
    write_series(tmp_path / "b", n=5, series_number=7, seed=2)
    write_series(tmp_path / "c", n=4, series_number=9, seed=3)
    sel = select_thigh_series(scan_tree(tmp_path).series, ["THIGH"])
    assert sel.series.series_number == 7 and len(sel.candidates) == 3
    assert "3 candidates" in sel.note


def test_rescale_applied(tmp_path):
    write_series(tmp_path, n=3, dz=5.0, slope=2.0, intercept=-5.0)
    volume, _ = load_volume(scan_tree(tmp_path).series[0])
    assert volume[:, 3, 3].tolist() == [15.0, 35.0, 55.0]


def test_non_dicom_and_truncated_files_reported_not_fatal(tmp_path):
    paths = write_series(tmp_path / "p", n=5, dz=5.0)
    (tmp_path / "p" / "README").write_text("not dicom")
    (tmp_path / "p" / "junk").write_bytes(b"\x00" * 300)
    scan = scan_tree(tmp_path)
    assert len(scan.series) == 1 and scan.series[0].n_files == 5
    assert sorted(s.reason for s in scan.skipped) == ["not a DICOM file"] * 2
    assert {s.category for s in scan.skipped} == {"not_dicom"}
    # Truncate one slice inside its pixel data: the header still reads, the volume must not.
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: len(data) - 4000])
    scan = scan_tree(tmp_path)
    assert scan.series[0].n_files == 5
    with pytest.raises(DicomSeriesError, match="pixel data"):
        load_volume(scan.series[0])


def test_truncated_header_is_skipped(tmp_path):
    paths = write_series(tmp_path, n=4, dz=5.0)
    paths[0].write_bytes(paths[0].read_bytes()[:200])
    scan = scan_tree(tmp_path)
    assert scan.series[0].n_files == 3
    assert len(scan.skipped) == 1 and scan.skipped[0].category in REASONS


def test_inconsistent_geometry_raises(tmp_path):
    paths = write_series(tmp_path, n=4, dz=5.0)
    ds = pydicom.dcmread(paths[3])
    ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1],
                               float(ds.ImagePositionPatient[2]) + 7.0]
    ds.save_as(paths[3])
    with pytest.raises(DicomSeriesError, match="uneven slice spacing"):
        load_volume(scan_tree(tmp_path).series[0])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9, 0.43589]
    ds.save_as(paths[3])
    with pytest.raises(DicomSeriesError, match="orientation") as err:
        load_volume(scan_tree(tmp_path).series[0])
    assert err.value.reason == "inconsistent_geometry"


def test_read_thigh_volume_convenience(tmp_path):
    write_series(tmp_path / "7", n=6, dz=-5.0)
    write_series(tmp_path / "1", n=2, description="MP_LOCATOR_THIGH", orientation=CORONAL)
    volume, geom, sel = read_thigh_volume(tmp_path, ["AX_T1_THIGH"])
    assert volume.shape == (6, 64, 64) and volume[0, 0, 0] == 60
    with pytest.raises(DicomSeriesError, match="no axial thigh series") as err:
        read_thigh_volume(tmp_path, ["NO_SUCH_SERIES"])
    assert err.value.reason == "no_thigh_series"


def test_rejection_reasons_are_categories(tmp_path):
    write_series(tmp_path / "sag", n=6, description="AX_T1_THIGH", orientation=SAGITTAL,
                 series_number=2, seed=1)
    write_series(tmp_path / "cor", n=6, description="T1 THIGH", orientation=CORONAL,
                 series_number=4, seed=2)
    write_series(tmp_path / "short", n=4, series_number=5, seed=3)
    write_series(tmp_path / "knee", n=6, description="SAG_3D_DESS_KNEE", series_number=6,
                 seed=4)
    sel = select_thigh_series(scan_tree(tmp_path).series, ["THIGH"], min_slices=5)
    assert sel.series is None
    assert sorted(r for _, r in sel.rejected) == ["description_mismatch", "too_few_slices",
                                                  "wrong_orientation", "wrong_orientation"]
    assert set(r for _, r in sel.rejected) <= set(SERIES_REJECTIONS)
    assert sel.reason == "too_few_slices"  # the closest miss
    assert "too_few_slices (4 < 5)" in sel.note and "description_mismatch" in sel.note
    # without the minimum the short series is the only candidate
    assert select_thigh_series(scan_tree(tmp_path).series, ["THIGH"]).series.n_files == 4
    with pytest.raises(DicomSeriesError, match="no axial thigh series") as err:
        read_thigh_volume(tmp_path / "sag", ["THIGH"])
    assert err.value.reason == "wrong_orientation"


def test_several_candidates_tie_broken_by_series_number_then_time(tmp_path):
    write_series(tmp_path / "a", n=5, series_number=3, seed=1, series_time="101500")
    write_series(tmp_path / "b", n=5, series_number=3, seed=2, series_time="103000")
    write_series(tmp_path / "c", n=5, series_number=2, seed=3, series_time="110000")
    sel = select_thigh_series(scan_tree(tmp_path).series, ["THIGH"])
    assert sel.series.series_time == "20050301103000"
    assert "3 candidates; chose series number 3 (5 files)" in sel.note
    assert "most files, then highest series number, then latest series time" in sel.note


def test_long_stack_loads_all_slices_in_order(tmp_path):
    # A 30-slice prescription: every slice is loaded in order; the recipe keeps the centre.
    write_series(tmp_path, n=30, dz=5.0)
    volume, geom = load_volume(scan_tree(tmp_path).series[0])
    assert volume.shape[0] == 30 and volume[:, 0, 0].tolist() == [10 * (k + 1)
                                                                   for k in range(30)]
    assert geom.positions[-1] - geom.positions[0] == pytest.approx(145.0)


def test_truncated_and_empty_pixel_data_are_categorised(tmp_path):
    paths = write_series(tmp_path / "cut", n=3, dz=5.0)
    paths[1].write_bytes(paths[1].read_bytes()[:-4000])
    with pytest.raises(DicomSeriesError) as err:
        load_volume(scan_tree(tmp_path / "cut").series[0])
    assert err.value.reason == "truncated"
    paths = write_series(tmp_path / "empty", n=3, dz=5.0, seed=5)
    ds = pydicom.dcmread(paths[0])
    ds.PixelData = b""
    ds.save_as(paths[0])
    with pytest.raises(DicomSeriesError, match="empty") as err:
        load_volume(scan_tree(tmp_path / "empty").series[0])
    assert err.value.reason == "no_pixel_data"
    del ds.PixelData
    ds.save_as(paths[0])
    with pytest.raises(DicomSeriesError) as err:
        decode_file(paths[0])
    assert err.value.reason == "no_pixel_data"
    (tmp_path / "text").write_text("not dicom at all")
    with pytest.raises(DicomSeriesError) as err:
        decode_file(tmp_path / "text")
    assert err.value.reason == "not_dicom"
    assert err.value.reason in REASONS


def test_scan_keeps_thigh_pixels_so_each_file_is_read_once(tmp_path, monkeypatch):
    import data_prep.dicom.series as ds_module

    write_series(tmp_path / "s3", n=6, slope=2.0, intercept=-5.0)
    write_series(tmp_path / "s1", n=3, description="MP_LOCATOR_THIGH",
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), series_number=1)
    reference, ref_geometry = load_volume(
        select_thigh_series(scan_tree(tmp_path).series, ["THIGH"]).series)
    parsed, fast, pixels = [], [], []
    real_dcmread, real_fast = pydicom.dcmread, ds_module.dicom_fast.read_file
    monkeypatch.setattr(ds_module.pydicom, "dcmread",
                        lambda path, **kw: parsed.append(path) or real_dcmread(path, **kw))

    def counting_fast(path, want=None):
        found = real_fast(path, want)
        fast.append(path)
        if found is not None and found[1] is not None:
            pixels.append(path)
        return found

    monkeypatch.setattr(ds_module.dicom_fast, "read_file", counting_fast)
    scan = scan_tree(tmp_path, keep_patterns=["THIGH"])
    thigh = select_thigh_series(scan.series, ["THIGH"]).series
    assert len(thigh.datasets) == 6  # the localizer's pixels are not read
    assert all(not s.datasets for s in scan.series if s.is_localizer)
    volume, geometry = load_volume(thigh)
    # these are plain files: the fast reader reads each once, pixels only of the thigh series
    assert len(fast) == 9 and len(set(fast)) == 9 and parsed == []
    assert sorted(pixels) == sorted(thigh.files)
    assert np.array_equal(volume, reference) and geometry == ref_geometry
    assert not thigh.datasets  # released after decoding

    # the same files through pydicom only (what a file the fast reader declines takes)
    monkeypatch.setattr(ds_module.dicom_fast, "read_file", lambda path, want=None: None)
    scan = scan_tree(tmp_path, keep_patterns=["THIGH"])
    volume, geometry = load_volume(select_thigh_series(scan.series, ["THIGH"]).series)
    assert len(parsed) == 9 and len(set(parsed)) == 9  # every file parsed exactly once
    assert np.array_equal(volume, reference) and geometry == ref_geometry


def test_stored_values_come_with_the_series_rescale(tmp_path):
    write_series(tmp_path / "plain", n=5)
    write_series(tmp_path / "scaled", n=5, slope=2.0, intercept=-5.0, patient_id="9000002")
    for name, scaled in (("plain", False), ("scaled", True)):
        series = select_thigh_series(scan_tree(tmp_path / name, keep_patterns=["THIGH"]).series,
                                     ["THIGH"]).series
        stored, geometry = load_volume(series, stored_values=True)
        series = select_thigh_series(scan_tree(tmp_path / name).series, ["THIGH"]).series
        floats, geometry_f = load_volume(series)
        assert floats.dtype == np.float32 and geometry_f.rescale == (1.0, 0.0)
        assert stored.dtype == np.int16  # MR_small is signed
        slope, intercept = geometry.rescale
        assert geometry.rescale == ((2.0, -5.0) if scaled else (1.0, 0.0))
        assert geometry == dataclasses.replace(geometry_f, rescale=geometry.rescale)
        assert np.array_equal(stored * np.float32(slope) + np.float32(intercept), floats)
        assert floats[:, 0, 0].tolist() == [slope * v + intercept for v in (50, 40, 30, 20, 10)]


def test_a_damaged_header_value_skips_that_file_not_the_scan(tmp_path):
    paths = write_series(tmp_path / "3", n=7)
    first = min(paths)  # scanned first: its header describes the series
    data = first.read_bytes()
    series_number = b"\x20\x00\x11\x00IS"  # (0020,0011) with its VR, explicit little endian
    assert data.count(series_number) == 1
    first.write_bytes(data.replace(series_number, b"\x20\x00\x11\x00WS"))  # no such VR
    scan = scan_tree(tmp_path, keep_patterns=["THIGH"])
    assert [(s.path, s.category) for s in scan.skipped] == [(first, "undecodable")]
    assert "NotImplementedError" in scan.skipped[0].reason
    series = select_thigh_series(scan.series, ["THIGH"]).series
    assert len(series.files) == 6 and first not in series.files  # the others still count


def test_list_files_follows_links_once_and_skips_broken_ones(tmp_path):
    from data_prep.dicom import list_files

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f2").write_bytes(b"x")
    (tmp_path / "a" / "f1").write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "f3").write_bytes(b"x")
    (tmp_path / "a" / "linked").symlink_to(tmp_path / "elsewhere")  # followed, like rglob
    (tmp_path / "a" / "b" / "loop").symlink_to(tmp_path / "a")  # must not recurse forever
    (tmp_path / "a" / "broken").symlink_to(tmp_path / "missing")
    files = list_files(tmp_path / "a")
    assert files == sorted(files)
    assert [p.name for p in files] == ["f2", "f1", "f3"]
