"""The fast DICOM reader against pydicom, file by file: same values and pixels, or None.

Every case compares with pydicom on the same bytes: pydicom's own test files, files written
here to exercise what real scanners produce (implicit VR, 12-bit data with stray high bits,
undefined-length sequences, large private headers, UTF-8), and truncated or damaged copies.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian

from data_prep.dicom.fast import HEAD_BYTES, HEADER_TAGS, read_file


def pydicom_values(ds: pydicom.Dataset) -> dict:
    """What the fast reader must return, derived from pydicom's parse."""
    out = {}
    for tag, (keyword, kind, _) in HEADER_TAGS.items():
        if kind == "charset" or tag not in ds:
            continue
        value = ds[tag].value
        items = list(value) if isinstance(value, MultiValue) else [value]
        if kind == "us":
            out[keyword] = int(value)
        elif kind in ("text", "str"):
            out[keyword] = str(value)
        elif kind == "strs":
            out[keyword] = tuple(str(v) for v in items) if value else ()
        elif kind == "floats":
            out[keyword] = tuple(float(v) for v in items)
        elif kind == "float":
            out[keyword] = float(value) if value not in ("", None) else None
        elif kind == "is":
            out[keyword] = int(value) if value not in ("", None) else None
    return out


def assert_same_as_pydicom(path) -> bool:
    """True when the fast reader took the file (and agrees with pydicom), False if declined."""
    found = read_file(path, lambda header: True)
    if found is None:
        return False
    header, pixels = found
    ds = pydicom.dcmread(path)
    assert header.values == pydicom_values(ds), path
    reference = ds.pixel_array
    assert pixels.dtype == reference.dtype and np.array_equal(pixels, reference), path
    return True


def test_pydicom_test_files_are_read_alike_or_declined():
    paths = [p for p in get_testdata_files() if Path(p).stat().st_size < 8_000_000]
    taken = {Path(p).name for p in paths if assert_same_as_pydicom(p)}
    assert {"MR_small.dcm", "CT_small.dcm", "MR_small_implicit.dcm"} <= taken
    assert len(taken) >= 20, taken
    for declined in ("MR_small_bigendian.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm",
                     "MR_small_deflate.dcm", "MR_truncated.dcm", "SC_rgb.dcm", "emri_small.dcm"):
        assert declined not in taken, declined  # big endian, compressed, colour, multi-frame


def _mr(**changes) -> Dataset:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm", download=False))
    for k, v in changes.items():
        setattr(ds, k, v)
    return ds


def _save(ds: Dataset, path: Path, implicit: bool = False) -> Path:
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("signed", [False, True])
def test_unused_high_bits_are_corrected_like_pydicom(tmp_path, signed):
    rng = np.random.default_rng(0)
    ds = _mr(BitsStored=12, HighBit=11, PixelRepresentation=int(signed))
    raw = rng.integers(0, 65536, (ds.Rows, ds.Columns), dtype=np.uint16)  # junk in bits 12-15
    ds.PixelData = raw.tobytes()
    path = _save(ds, tmp_path / "twelve")
    assert assert_same_as_pydicom(path)
    _, pixels = read_file(path, lambda h: True)
    assert pixels.max() < 4096 if not signed else (pixels.min() >= -2048 and pixels.max() < 2048)


def test_sequences_private_headers_charsets_and_implicit_vr(tmp_path):
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    inner = Dataset()
    inner.CodeValue = "X"
    item.ConceptNameCodeSequence = Sequence([inner])
    ds = _mr(SpecificCharacterSet="ISO_IR 192", SeriesDescription="Oberschenkel_äx_THIGH",
             PatientID="Ünal-77")
    ds.ReferencedImageSequence = Sequence([item, copy.deepcopy(item)])
    ds.add_new(0x00291010, "OB", bytes(range(256)) * (3 * HEAD_BYTES // 256))  # CSA-like
    ds.add_new(0x00291000, "LO", "SIEMENS CSA HEADER")
    for name, implicit in (("explicit", False), ("implicit", True)):
        path = _save(copy.deepcopy(ds), tmp_path / name, implicit=implicit)
        assert assert_same_as_pydicom(path), name
        header, _ = read_file(path)
        assert header.get("SeriesDescription") == "Oberschenkel_äx_THIGH"

    # undefined-length sequences and items (how many scanners write them)
    path = tmp_path / "undefined"
    _save(copy.deepcopy(ds), path)
    raw = pydicom.dcmread(path)
    raw["ReferencedImageSequence"].is_undefined_length = True
    for it in raw.ReferencedImageSequence:
        it.is_undefined_length_sequence_item = True
        it["ConceptNameCodeSequence"].is_undefined_length = True
        it.ConceptNameCodeSequence[0].is_undefined_length_sequence_item = True
    raw.save_as(path)
    assert b"\xfe\xff\xdd\xe0" in path.read_bytes()  # a sequence delimiter was written
    assert assert_same_as_pydicom(path)

    latin = _save(_mr(SpecificCharacterSet="ISO_IR 100", SeriesDescription="Cuisse_é"),
                  tmp_path / "latin")
    assert assert_same_as_pydicom(latin)


@pytest.mark.filterwarnings("ignore:Failed to encode")
def test_unusual_files_are_left_to_pydicom(tmp_path):
    cases = {
        "multi_valued_description": _mr(SeriesDescription=["AX_T1", "THIGH"]),
        "japanese_charset": _mr(SpecificCharacterSet="ISO 2022 IR 87"),
        "two_frames": _mr(NumberOfFrames=2),
        "no_preamble": None,
    }
    for name, ds in cases.items():
        path = tmp_path / name
        if ds is None:
            _save(_mr(), path)
            path.write_bytes(path.read_bytes()[132:])  # no preamble: pydicom reads it with force
        else:
            _save(ds, path)
        assert read_file(path, lambda h: True) is None, name


def test_localizer_pixels_are_not_read(tmp_path):
    path = _save(_mr(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]), tmp_path / "loc")
    header, pixels = read_file(path, lambda h: "LOCALIZER" not in h.get("ImageType"))
    assert pixels is None and header.get("ImageType")[-1] == "LOCALIZER"
    assert header.pixel_offset + header.pixel_length <= path.stat().st_size
    assert header.pixel_length == len(pydicom.dcmread(path).PixelData)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_truncated_and_damaged_copies_are_declined_or_read_alike(tmp_path):
    good = _save(_mr(), tmp_path / "good")
    data = good.read_bytes()
    header_end = read_file(good)[0].pixel_offset
    pixel_end = header_end + read_file(good)[0].pixel_length
    for cut in [*range(0, 1400, 37), pixel_end - 2, pixel_end - 1000]:
        path = tmp_path / f"cut{cut}"
        path.write_bytes(data[:cut])
        assert read_file(path, lambda h: True) is None, cut  # header or pixel data cut short
    path = tmp_path / "cut_in_trailing_padding"  # (FFFC,FFFC) after the pixels: pydicom too
    path.write_bytes(data[:-2])
    assert assert_same_as_pydicom(path)
    rng = np.random.default_rng(1)
    outcomes = {"declined": 0, "same": 0}
    for trial in range(300):
        damaged = bytearray(data)
        for pos in rng.integers(132, header_end, 2):
            damaged[pos] = int(rng.integers(0, 256))
        path = tmp_path / f"flip{trial}"
        path.write_bytes(bytes(damaged))
        # taken only where pydicom reads the same damaged file to the same values and pixels
        outcomes["same" if assert_same_as_pydicom(path) else "declined"] += 1
    assert min(outcomes.values()) > 50, outcomes  # both paths exercised
