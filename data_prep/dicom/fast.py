"""Fast reader for the common DICOM image file, with pydicom as the reference and fallback.

    from data_prep.dicom.fast import read_file
    found = read_file(path, want_pixels=lambda header: True)   # None: use pydicom instead
    header, pixels = found

What it reads: a Part 10 file (128-byte preamble, "DICM") in Explicit or Implicit VR Little
Endian, uncompressed, one greyscale frame with 8 or 16 bits allocated, character set default
/ ISO_IR 100 / ISO_IR 192. It walks the top-level elements once (sequences and private
elements are skipped by length, undefined-length sequences item by item), keeps the dozen
values ingest needs (HEADER_TAGS) and, when `want_pixels(header)` says so, reads the Pixel
Data straight into a numpy array. It never guesses: anything else -- compressed or
big-endian transfer syntax, no preamble, multi-frame, colour, other bit depths, a value it
cannot parse, a file that ends early, odd-length pixel data -- returns None, and the caller
parses the file with pydicom, which classifies the problem (series.py). Values and
pixels equal pydicom's (`str(ds.Keyword)`, `float(ds.Keyword[i])`, `ds.pixel_array`, with
pydicom's unused-bits correction): tests/data_prep/test_dicom_fast.py checks it file by file
against pydicom, on pydicom's own test files and on synthetic and corrupted ones.

Why: pydicom's generic parse + decode costs about 0.77 ms per 256x512 slice on a 2-core
machine, most of it per element Python overhead, and ingest also parses the localizers;
this reader is about 5x cheaper per file (benchmarks/README.md "Ingest"). PHI: values are
returned in memory only, like pydicom's; nothing here logs or stores them.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HEAD_BYTES = 16 * 1024  # first read; most headers (Siemens CSA included) fit in 16-64 KiB
TEXT_HEAD_BYTES = 4 * 1024  # first read of read_text: PatientID usually lies in the first KiB
MAX_HEADER_BYTES = 4 * 1024 * 1024  # a header larger than this goes to pydicom
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
PIXEL_DATA = 0x7FE00010
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"))
_SHORT_VRS = frozenset((b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS",
                        b"LO", b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL",
                        b"US"))
_TEXT_VRS = frozenset((b"AE", b"CS", b"LO", b"LT", b"PN", b"SH", b"ST", b"UC", b"UT"))
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_TAG_VR = struct.Struct("<HH2s")
_TAG_VR_LEN = struct.Struct("<HH2sH")
_TAG_LEN = struct.Struct("<HHI")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_ENCODINGS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1",
              "ISO_IR 192": "utf-8"}  # pydicom's default "iso8859" is latin-1

# (group, element) -> (keyword, kind, VR). Kinds: text (one LO value, in the character
# set), str (one ASCII value), strs (CS list), floats (DS list), float (one DS), is (one IS),
# us (US). Under explicit VR an element with another VR (a damaged file) goes to pydicom.
HEADER_TAGS: dict[int, tuple[str, str, bytes]] = {
    0x00080005: ("SpecificCharacterSet", "charset", b"CS"),
    0x00080008: ("ImageType", "strs", b"CS"),
    0x00080021: ("SeriesDate", "str", b"DA"), 0x00080022: ("AcquisitionDate", "str", b"DA"),
    0x00080031: ("SeriesTime", "str", b"TM"), 0x00080032: ("AcquisitionTime", "str", b"TM"),
    0x0008103E: ("SeriesDescription", "text", b"LO"),
    0x00100020: ("PatientID", "text", b"LO"),
    0x0020000E: ("SeriesInstanceUID", "str", b"UI"),
    0x00200011: ("SeriesNumber", "is", b"IS"),
    0x00200032: ("ImagePositionPatient", "floats", b"DS"),
    0x00200037: ("ImageOrientationPatient", "floats", b"DS"),
    0x00280002: ("SamplesPerPixel", "us", b"US"),
    0x00280004: ("PhotometricInterpretation", "str", b"CS"),
    0x00280008: ("NumberOfFrames", "is", b"IS"),
    0x00280010: ("Rows", "us", b"US"), 0x00280011: ("Columns", "us", b"US"),
    0x00280030: ("PixelSpacing", "floats", b"DS"),
    0x00280100: ("BitsAllocated", "us", b"US"), 0x00280101: ("BitsStored", "us", b"US"),
    0x00280103: ("PixelRepresentation", "us", b"US"),
    0x00281052: ("RescaleIntercept", "float", b"DS"), 0x00281053: ("RescaleSlope", "float", b"DS"),
}


class _Unsupported(Exception):
    """Outside what this reader handles: the caller falls back to pydicom."""


class _NeedMore(Exception):
    """The header runs past the bytes read so far."""


@dataclass
class FastHeader:
    """The values ingest needs from one file (PHI in memory only), as pydicom gives them."""

    values: dict[str, Any] = field(default_factory=dict)  # keyword -> value (absent: missing)
    pixel_offset: int = 0  # byte offset of the Pixel Data value in the file
    pixel_length: int = 0

    def get(self, keyword: str, default: Any = None) -> Any:
        return self.values.get(keyword, default)

    def __contains__(self, keyword: str) -> bool:
        return keyword in self.values

    @property
    def dtype(self) -> np.dtype:
        bits, signed = self.values["BitsAllocated"], self.values["PixelRepresentation"]
        return np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")


def read_file(path: str | os.PathLike, want_pixels: Callable[[FastHeader], bool] | None = None
              ) -> tuple[FastHeader, np.ndarray | None] | None:
    """(header, pixels or None) of one file, or None when pydicom must read it.

    `want_pixels(header)` decides, once the header is known, whether the pixel data is read
    (e.g. only for the series to be loaded; localizers are never read past their header).
    Pixels are the stored values (rows, cols), no rescale, like `ds.pixel_array`.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            buf = f.read(min(size, HEAD_BYTES))
            while True:
                try:
                    header = _parse(buf)
                    break
                except _NeedMore:
                    limit = min(size, MAX_HEADER_BYTES)
                    if len(buf) >= limit:
                        return None  # ends inside the header, or a huge one: pydicom decides
                    buf += f.read(min(limit, 4 * len(buf)) - len(buf))
            _check_image(header, size)
            if want_pixels is None or not want_pixels(header):
                return header, None
            v = header.values
            pixels = np.empty((v["Rows"], v["Columns"]), dtype=header.dtype)
            f.seek(header.pixel_offset)
            if f.readinto(memoryview(pixels).cast("B")) != pixels.nbytes:
                return None
    except (_Unsupported, OSError, ValueError, KeyError, struct.error, UnicodeDecodeError):
        return None
    _correct_unused_bits(pixels, v["BitsAllocated"], v["BitsStored"])
    return header, pixels


def _check_image(header: FastHeader, file_size: int) -> None:
    """Only one whole greyscale frame of 8/16 bits with all the size tags is fast-read."""
    v = header.values
    if not all(k in v for k in ("Rows", "Columns", "BitsAllocated", "BitsStored",
                                "PixelRepresentation")):
        raise _Unsupported("image size tags missing")
    if v["BitsAllocated"] not in (8, 16) or not 1 <= v["BitsStored"] <= v["BitsAllocated"]:
        raise _Unsupported("bit depth")
    if v["PixelRepresentation"] not in (0, 1) or v.get("SamplesPerPixel", 1) != 1:
        raise _Unsupported("pixel representation or colour")
    if v.get("NumberOfFrames", 1) not in (None, 1) or v.get("PhotometricInterpretation") not in (
            "MONOCHROME1", "MONOCHROME2"):
        raise _Unsupported("frames or photometric interpretation")
    nbytes = v["Rows"] * v["Columns"] * v["BitsAllocated"] // 8
    # pydicom accepts one trailing padding byte; anything else (short, long) it judges
    if nbytes == 0 or header.pixel_length not in (nbytes, nbytes + 1) or (
            header.pixel_offset + nbytes > file_size):
        raise _Unsupported("pixel data length")


def _correct_unused_bits(pixels: np.ndarray, allocated: int, stored: int) -> None:
    """pydicom's `correct_unused_bits`: shift the unused high bits out and back (sign-fills
    signed values; for unsigned ones that is masking them, one pass instead of two)."""
    shift = allocated - stored
    if shift and pixels.dtype.kind == "u":
        np.bitwise_and(pixels, pixels.dtype.type((1 << stored) - 1), out=pixels)
    elif shift:
        np.left_shift(pixels, shift, out=pixels)
        np.right_shift(pixels, shift, out=pixels)


def read_text(path: str | os.PathLike, tag: int) -> str | None:
    """The value of one top-level text element (e.g. PatientID, 0x00100020), stripped, as
    `str(ds.Keyword).strip()` gives it; None when pydicom must answer instead.

    Reads only up to that element (the first few KiB; participants.py calls it for every
    file of a tree). None: not the Part 10 little-endian file this module reads, another
    character set, a multi-valued or non-text element, a file that ends early, or the
    element absent (pydicom confirms an absence, so a file with misordered elements is not
    misjudged).
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            buf = f.read(min(size, TEXT_HEAD_BYTES))
            while True:
                try:
                    return _find_text(buf, tag)
                except _NeedMore:
                    limit = min(size, MAX_HEADER_BYTES)
                    if len(buf) >= limit:
                        return None
                    buf += f.read(min(limit, 4 * len(buf)) - len(buf))
    except (_Unsupported, OSError, ValueError, KeyError, struct.error, UnicodeDecodeError):
        return None


def _find_text(buf: bytes, tag: int) -> str | None:
    pos, explicit = _file_meta(buf)
    charset = b""
    end = len(buf)
    while True:
        if pos + 8 > end:
            raise _NeedMore
        if explicit:
            group, elem, vr, length = _TAG_VR_LEN.unpack_from(buf, pos)
            if vr in _LONG_VRS:
                if pos + 12 > end:
                    raise _NeedMore
                start, length = pos + 12, _U32.unpack_from(buf, pos + 8)[0]
            elif vr in _SHORT_VRS:
                start = pos + 8
            else:
                raise _Unsupported("not a VR")
            is_sq = vr == b"SQ" or (vr == b"UN" and length == _UNDEFINED)
        else:
            group, elem, length = _TAG_LEN.unpack_from(buf, pos)
            vr, start, is_sq = None, pos + 8, length == _UNDEFINED
        found = group << 16 | elem
        if found > tag or group == 0xFFFE:
            return None  # passed it: absent (or misordered), pydicom confirms
        if length == _UNDEFINED:
            if not is_sq:
                raise _Unsupported("undefined length")
            pos = _skip_sequence(buf, start, explicit and vr == b"SQ")
            continue
        pos = start + length
        if pos > end:
            raise _NeedMore
        if found == 0x00080005:
            charset = buf[start:pos]
        elif found == tag:
            if explicit and vr not in _TEXT_VRS:
                raise _Unsupported("not a text element")
            encoding = _ENCODINGS.get(charset.decode("ascii").rstrip(" \x00"))
            if encoding is None:
                raise _Unsupported("character set")
            text = buf[start:pos].decode(encoding)
            if "\\" in text:
                raise _Unsupported("multi-valued text")
            return text.rstrip("\x00 ").strip()


def _file_meta(buf: bytes) -> tuple[int, bool]:
    """(position of the first dataset element, explicit VR?) after the preamble and file
    meta group; _Unsupported unless Part 10 explicit or implicit VR little endian."""
    if len(buf) < 132:
        raise _NeedMore
    if buf[128:132] != b"DICM":
        raise _Unsupported("no Part 10 preamble")
    # file meta: group 0002, always explicit VR little endian
    pos, syntax = 132, None
    while True:
        if pos + 8 > len(buf):
            raise _NeedMore
        group, elem, vr = _TAG_VR.unpack_from(buf, pos)
        if group != 0x0002:
            break
        pos, length = _explicit_length(buf, pos, vr)
        if length == _UNDEFINED:
            raise _Unsupported("undefined length in file meta")
        if elem == 0x0010:
            syntax = buf[pos:pos + length].rstrip(b"\x00 ").decode("ascii")
        pos += length
    if syntax not in (EXPLICIT_LE, IMPLICIT_LE):
        raise _Unsupported(f"transfer syntax {syntax}")
    return pos, syntax == EXPLICIT_LE


def _parse(buf: bytes) -> FastHeader:
    pos, explicit = _file_meta(buf)
    header = FastHeader()
    values = header.values
    raw: dict[int, bytes] = {}
    end = len(buf)
    wanted = HEADER_TAGS
    unpack_explicit, unpack_implicit, unpack_u32 = (_TAG_VR_LEN.unpack_from,
                                                    _TAG_LEN.unpack_from, _U32.unpack_from)
    while True:  # one pass over the top-level elements; hot loop, so written out
        if pos + 8 > end:
            raise _NeedMore
        if explicit:
            group, elem, vr, length = unpack_explicit(buf, pos)
            if vr in _LONG_VRS:
                if pos + 12 > end:
                    raise _NeedMore
                start, length = pos + 12, unpack_u32(buf, pos + 8)[0]
            elif vr in _SHORT_VRS:
                start = pos + 8
            else:
                raise _Unsupported("not a VR")  # e.g. implicit data under an explicit syntax
            is_sq = vr == b"SQ" or (vr == b"UN" and length == _UNDEFINED)
        else:
            group, elem, length = unpack_implicit(buf, pos)
            vr, start, is_sq = None, pos + 8, length == _UNDEFINED
        tag = group << 16 | elem
        if tag >= PIXEL_DATA or group == 0xFFFE:
            if tag != PIXEL_DATA or vr not in (b"OW", b"OB", None):
                raise _Unsupported("element order")  # no pixel data, or a stray delimiter
            if length == _UNDEFINED or length % 2:
                raise _Unsupported("encapsulated or odd-length pixel data")
            header.pixel_offset, header.pixel_length = start, length
            break
        if length == _UNDEFINED:
            if not is_sq:
                raise _Unsupported("undefined length")
            # explicit UN of undefined length holds implicit VR items (PS3.5 6.2.2)
            pos = _skip_sequence(buf, start, explicit and vr == b"SQ")
            continue
        pos = start + length
        if tag in wanted:
            if explicit and vr != wanted[tag][2]:
                raise _Unsupported("unexpected VR")
            if pos > end:
                raise _NeedMore
            raw[tag] = buf[start:pos]
    charset = raw.pop(0x00080005, b"").decode("ascii").rstrip(" \x00")
    if charset not in _ENCODINGS:
        raise _Unsupported("character set")
    for tag, data in raw.items():
        keyword, kind, _ = HEADER_TAGS[tag]
        values[keyword] = _convert(data, kind, _ENCODINGS[charset], explicit)
    return header


def _explicit_length(buf: bytes, pos: int, vr: bytes) -> tuple[int, int]:
    """(value start, value length) of the explicit-VR element at `pos`."""
    if vr in _LONG_VRS:
        if pos + 12 > len(buf):
            raise _NeedMore
        return pos + 12, _U32.unpack_from(buf, pos + 8)[0]
    if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
        raise _Unsupported("not a VR")  # e.g. implicit data under an explicit syntax
    return pos + 8, _U16.unpack_from(buf, pos + 6)[0]


def _skip_sequence(buf: bytes, pos: int, explicit: bool) -> int:
    """Position after an undefined-length sequence's delimiter, walking its items."""
    while True:
        if pos + 8 > len(buf):
            raise _NeedMore
        group, elem, length = _TAG_LEN.unpack_from(buf, pos)
        tag = group << 16 | elem
        pos += 8
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise _Unsupported("sequence without items")
        if length != _UNDEFINED:
            pos += length
            continue
        pos = _skip_item(buf, pos, explicit)


def _skip_item(buf: bytes, pos: int, explicit: bool) -> int:
    """Position after an undefined-length item's delimiter, skipping its elements."""
    while True:
        if pos + 8 > len(buf):
            raise _NeedMore
        if explicit:
            group, elem, vr = _TAG_VR.unpack_from(buf, pos)
            if group == 0xFFFE:
                start, length = pos + 8, _U32.unpack_from(buf, pos + 4)[0]
                is_sq = False
            else:
                start, length = _explicit_length(buf, pos, vr)
                is_sq = vr == b"SQ" or (vr == b"UN" and length == _UNDEFINED)
        else:
            group, elem, length = _TAG_LEN.unpack_from(buf, pos)
            start, is_sq = pos + 8, length == _UNDEFINED
        if group << 16 | elem == _ITEM_END:
            return start
        if length == _UNDEFINED:
            if not is_sq:
                raise _Unsupported("undefined length")
            pos = _skip_sequence(buf, start, explicit and vr == b"SQ")
        else:
            pos = start + length


def _convert(data: bytes, kind: str, encoding: str, explicit: bool) -> Any:
    """One element's value as pydicom gives it (through str()/float()/int())."""
    if kind == "us":
        if len(data) != 2:
            raise _Unsupported("US value length")
        return _U16.unpack_from(data)[0]
    if kind == "text":  # LO / SH: one value (a backslash makes it a list: pydicom's path)
        text = data.decode(encoding)
        if "\\" in text:
            raise _Unsupported("multi-valued text")
        return text.rstrip("\x00 ")
    text = data.decode("ascii")
    if kind == "str":  # UI, DA, TM, CS single values
        text = text.rstrip(" \x00")
        if "\\" in text:
            raise _Unsupported("multi-valued")
        return text
    if kind == "strs":
        text = text.rstrip(" \x00")
        return tuple(text.split("\\")) if text else ()
    if kind == "floats":
        text = text.strip(" \x00")
        if not text:
            raise _Unsupported("empty geometry value")  # pydicom's path judges it
        return tuple(float(v) for v in text.split("\\"))
    if kind == "float":
        text = text.strip(" \x00")
        if "\\" in text:
            raise _Unsupported("multi-valued")
        return float(text) if text else None
    if kind == "is":
        text = text.strip(" \x00")
        if "\\" in text:
            raise _Unsupported("multi-valued")
        return int(text) if text else None
    raise AssertionError(kind)
