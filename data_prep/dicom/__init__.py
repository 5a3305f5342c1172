"""DICOM stage: find participants and their axial thigh series in any tree, load them.

    from data_prep.dicom import find_participants, read_thigh_volume
    found = find_participants("dicom/00m")                   # grouped by PatientID, any depth
    for p in found.participants:
        volume, geometry, selection = read_thigh_volume(p.paths(), ["AX_T1_THIGH"])

Modules, in the order data flows through them:
    participants.py  walk a tree at any depth, read each file's PatientID (or another tag),
                     group files into participants (folders and batches do not matter)
    fast.py          reader for the common uncompressed file (pydicom is the reference)
    series.py        group a participant's files by series, select the axial thigh series
    volume.py        load the selected series as a volume ordered along the slice normal
These are the only modules of the project that read DICOM. PHI read from headers stays in
memory in the returned objects; nothing here prints or stores it.
"""

from data_prep.dicom.participants import (Participant, ParticipantScan, find_participants,
                                          participant_tag)
from data_prep.dicom.series import (REASONS, SERIES_REJECTIONS, DicomSeriesError, ScanResult,
                                    Selection, SeriesInfo, SkippedFile, list_files, scan_tree,
                                    select_thigh_series)
from data_prep.dicom.volume import Geometry, decode_file, load_volume, read_thigh_volume

__all__ = [
    "REASONS", "SERIES_REJECTIONS", "DicomSeriesError", "Geometry", "Participant",
    "ParticipantScan", "ScanResult", "Selection", "SeriesInfo", "SkippedFile", "decode_file",
    "find_participants", "list_files", "load_volume", "participant_tag", "read_thigh_volume",
    "scan_tree", "select_thigh_series",
]
