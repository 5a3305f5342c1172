"""DICOM writer of the synthetic cohorts: headers with PHI, axial T1 series and localizer.

Used by data_prep/synthetic/cohort.py (CLI: data_prep/synth.py). One participant's study holds
    <T1 series folder>/         15 axial slices, SERIES[cohort]["t1"], SeriesNumber 2..5
    <localizer series folder>/  3 coronal slices, LOCALIZER, SeriesNumber 1 (ingest ignores it)
OAI, as the OAI image release lays it out: `dicom/00m/<batch>/<ID>/<StudyDate>/<series>/<image>`
with 8-digit series folders and images numbered by InstanceNumber (`001`, ...); the localizer
may sit in another batch folder (a participant split over two batches). SOMMA:
`dicom/<ID>/<SeriesNumber>/...`, volunteers the same; their files are extensionless random hex
names. Files are written in random order. Slice order:
ImagePositionPatient z increases distal -> proximal; InstanceNumber follows z upwards, or
downwards when the subject row has z_descending. Stored pixels are uint16 (12 bits); where the
row has rescale_slope, stored = round((value - intercept) / slope) and RescaleSlope/Intercept
are written, otherwise the tags are absent.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from data_prep.synthetic.phantom import (N_SLICES, ThighAnatomy, render_axial_stack,
                                         render_localizer)

COHORT_CODE = {"oai": 1, "somma": 2, "volunteers": 3}  # seeds per cohort stay independent
SLICE_MM = 5.0
SERIES = {  # cohort -> strings the ingest code matches on
    "oai": {"study": "OAI^MR^ENROLLMENT^THIGH", "t1": "AX_T1_THIGH", "model": "Trio",
            "dates": ("2004-02-01", "2006-05-31")},
    "somma": {"study": "SOMMA^THIGH", "t1": "T1_AXIAL_THIGH", "model": "Prisma_fit",
              "dates": ("2019-04-01", "2021-12-31")},
    "volunteers": {"study": "THIGH_RESEARCH", "t1": "t1_se_tra_thigh", "model": "Skyra",
                   "dates": ("2023-01-09", "2024-06-28")},
}
LOCALIZER = "MP_LOCATOR_THIGH"
PHI_NAMES = (  # distinctive realistic names, so PHI leak tests can search for them
    "Whitcombe^Harriet", "Okonkwo^Chidera", "Lindqvist^Astrid", "Marchetti^Lorenzo",
    "Nakagawa^Haruto", "Przybylski^Marek", "Delacroix^Amelie", "Abernathy^Clement",
    "Vasquez-Orozco^Lucia", "Thorvaldsen^Eirik", "Kowalczyk^Danuta", "Fairweather^Imogen",
    "Oyelaran^Babatunde", "Castellanos^Ines", "Hargreaves^Winifred", "Szabolcsi^Zoltan",
    "Rautenbach^Pieter", "McAllister^Fiona", "Bergstrom^Ingrid", "Ferreira-Lima^Joao",
    "Quintanilla^Rosario", "Achterberg^Maarten", "Pemberton^Beatrix", "Tanaka-Rowe^Emiko",
    "Galbraith^Duncan", "Esterhuizen^Marlize", "Villanueva^Teodoro", "Wojciechowska^Irena",
    "Blackwood^Cornelius", "Adeyemi-Cole^Folake", "Halvorsen^Sigrid", "Montgomery^Thaddeus",
)
PHI_INSTITUTIONS = {
    "oai": ("OAI Pittsburgh Clinical Center", "OAI Memorial Hospital of Rhode Island",
            "OAI Ohio State University Clinical Center", "OAI University of Maryland Baltimore"),
    "somma": ("SOMMA Wake Forest Clinical Site", "SOMMA University of Pittsburgh MR Center"),
    "volunteers": ("Northfield Research Imaging Centre",),
}
PHI_PHYSICIANS = ("Ravensworth^Ottoline^^Dr", "Abubakar^Ifeoma^^Dr", "Strickland^Benedikt^^Dr",
                  "Yamamura^Kenji^^Dr", "Ellingsen^Tove^^Dr")

def derive_rng(seed: int, *key: int) -> np.random.Generator:
    """Independent random stream for (seed, key...)."""
    return np.random.default_rng(np.random.SeedSequence([seed, *key]))


def _pid_number(pid: str) -> int:
    return int("".join(c for c in pid if c.isdigit()))


def participant_rng(seed: int, cohort: str, pid: str, purpose: str) -> np.random.Generator:
    """Random stream of one participant: purpose 'image' (phantom) or 'header' (PHI, UIDs)."""
    purposes = {"image": 1, "header": 2}
    if cohort not in COHORT_CODE or purpose not in purposes:
        raise ValueError(f"Invalid cohort {cohort!r} or purpose {purpose!r}: cohorts "
                         f"{', '.join(COHORT_CODE)}; purposes {', '.join(purposes)}.")
    return derive_rng(seed, COHORT_CODE[cohort], _pid_number(pid), purposes[purpose])


def anatomy_from_row(row: pd.Series | dict) -> ThighAnatomy:
    """ThighAnatomy of one sample_subjects / truth.csv row."""
    return ThighAnatomy(**{k: float(row[k]) for k in (
        "muscle_area_cm2", "imat_fraction", "fat_area_cm2", "femur_radius_mm", "cortex_mm")},
        asymmetry=float(row["asymmetry"]), taper=float(row["taper"]))


def _uid(seed: int, cohort: str, pid: str, *parts: object) -> str:
    return generate_uid(entropy_srcs=[str(seed), cohort, pid, *map(str, parts)])


def _header(row: pd.Series, seed: int, rng: np.random.Generator) -> dict:
    """PHI and study-level attributes shared by all files of one participant."""
    cohort, pid = row["cohort"], row["id"]
    lo, hi = (dt.date.fromisoformat(d) for d in SERIES[cohort]["dates"])
    study = lo + dt.timedelta(days=int(rng.integers(0, (hi - lo).days + 1)))
    birth = study - dt.timedelta(days=int(365.25 * row["age"] + rng.integers(1, 364)))
    hhmmss = f"{rng.integers(7, 19):02d}{rng.integers(0, 60):02d}{rng.integers(0, 60):02d}"
    return {
        "SpecificCharacterSet": "ISO_IR 100", "Modality": "MR", "Manufacturer": "SIEMENS",
        "ManufacturerModelName": SERIES[cohort]["model"], "SoftwareVersions": "syngo MR B17",
        "InstitutionName": str(rng.choice(PHI_INSTITUTIONS[cohort])),
        "InstitutionAddress": f"{rng.integers(10, 999)} Research Parkway",
        "StationName": f"MRC{rng.integers(10000, 99999)}",
        "DeviceSerialNumber": str(rng.integers(10000, 99999)),
        "ReferringPhysicianName": str(rng.choice(PHI_PHYSICIANS)),
        "OperatorsName": str(rng.choice(PHI_PHYSICIANS)).split("^^")[0],
        "PatientName": str(rng.choice(PHI_NAMES)), "PatientID": pid,
        "PatientBirthDate": birth.strftime("%Y%m%d"), "PatientSex": row["sex"][0].upper(),
        "PatientAge": f"{int(row['age']):03d}Y", "PatientSize": f"{row['height_mm'] / 1000:.2f}",
        "PatientWeight": f"{row['weight_kg']:.1f}",
        "AccessionNumber": f"{rng.integers(10**9, 10**10)}", "StudyID": f"{rng.integers(1, 9999)}",
        "StudyDate": study.strftime("%Y%m%d"), "StudyTime": hhmmss,
        "StudyDescription": SERIES[cohort]["study"], "BodyPartExamined": "THIGH",
        "StudyInstanceUID": _uid(seed, cohort, pid, "study"),
        "FrameOfReferenceUID": _uid(seed, cohort, pid, "frame"),
        "PositionReferenceIndicator": "", "PatientPosition": "FFS",
        "MagneticFieldStrength": 3, "ImagedNucleus": "1H", "ImagingFrequency": "123.2",
        "TransmitCoilName": "Body", "ReceiveCoilName": "Body",
    }


def _write_series(folder: Path, pixels: np.ndarray, common: dict, series: dict,
                  positions: np.ndarray, instances: np.ndarray, orientation: list[float],
                  rng: np.random.Generator, numbered: bool = False) -> None:
    """One file per slice, written in random order: named by InstanceNumber (`001`, OAI)
    or by random hex strings."""
    folder.mkdir(parents=True, exist_ok=True)
    hex_names: set[str] = set()
    while not numbered and len(hex_names) < len(pixels):
        hex_names.add(rng.bytes(6).hex().upper())
    order = rng.permutation(len(pixels))  # slice k is written as the next name in order
    names = [f"{int(instances[k]):03d}" for k in order] if numbered else sorted(hex_names)
    for k, name in zip(order, names):
        sop = generate_uid(entropy_srcs=[series["SeriesInstanceUID"], str(instances[k])])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        for key, value in {**common, **series}.items():
            setattr(ds, key, value)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop
        for tag in ("Series", "Acquisition", "Content"):
            setattr(ds, f"{tag}Date", common["StudyDate"])
            setattr(ds, f"{tag}Time", common["StudyTime"])
        ds.InstanceNumber, ds.AcquisitionNumber = int(instances[k]), 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in positions[k]]
        ds.ImageOrientationPatient = orientation
        axial = orientation[5] == 0  # coronal localizers are located along y
        ds.SliceLocation = f"{positions[k][2 if axial else 1]:.4f}"
        ds.Rows, ds.Columns = pixels.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = np.ascontiguousarray(pixels[k], dtype="<u2").tobytes()
        ds.save_as(folder / name, enforce_file_format=True)


def oai_series_folders(seed: int, pid: str) -> tuple[str, str]:
    """8-digit series folder names (T1, localizer) as in OAI's image release; their own
    random stream, so the rest of the participant's files do not depend on them."""
    rng = derive_rng(seed, COHORT_CODE["oai"], _pid_number(pid), 3)
    t1 = int(rng.integers(10_000_000, 99_000_000))
    return str(t1), str(t1 + int(rng.integers(1, 1_000_000)))  # distinct, 8 digits


def write_participant(row: pd.Series, cohort_dir: Path, *, seed: int,
                      matrix: tuple[int, int], batch: str | None = None,
                      localizer_batch: str | None = None) -> tuple[Path, Path]:
    """Render and write the axial T1 series and the localizer of one participant.

    OAI: `batch` is the batch folder of the T1 series (e.g. `0.C.2`), `localizer_batch` that
    of the localizer (default: the same). Returns the study folders holding the T1 series
    and the localizer (relative paths go into truth.csv).
    """
    cohort, pid = row["cohort"], row["id"]
    rng = participant_rng(seed, cohort, pid, "header")
    common = _header(row, seed, rng)
    study_dir = loc_dir = cohort_dir / "dicom" / pid
    t1_folder = loc_folder = None
    if cohort == "oai":
        visit = cohort_dir / "dicom" / "00m"
        study_dir = visit / (batch or "0.C.1") / pid / common["StudyDate"]
        loc_dir = visit / (localizer_batch or batch or "0.C.1") / pid / common["StudyDate"]
        t1_folder, loc_folder = oai_series_folders(seed, pid)
    stack = render_axial_stack(anatomy_from_row(row), matrix=matrix,
                               rng=participant_rng(seed, cohort, pid, "image"))
    rows, cols = matrix
    dr, dc = stack.pixel_spacing_mm
    z = float(rng.uniform(-180, -120)) + SLICE_MM * (np.arange(N_SLICES) - N_SLICES // 2)
    y0 = -rows * dr / 2 + float(rng.uniform(-10, 10))
    positions = np.stack([np.full(N_SLICES, -cols * dc / 2), np.full(N_SLICES, y0), z], axis=1)
    instances = np.arange(1, N_SLICES + 1)  # slices are rendered distal -> proximal, z upwards
    if row["z_descending"]:
        instances = instances[::-1]
    stored, rescale = stack.image, {}
    if not np.isnan(row["rescale_slope"]):
        slope, intercept = float(row["rescale_slope"]), float(row["rescale_intercept"])
        stored = np.rint((stack.image - intercept) / slope)
        rescale = {"RescaleSlope": f"{slope:g}", "RescaleIntercept": f"{intercept:g}",
                   "RescaleType": "US"}
    t1 = {"SeriesNumber": int(row["t1_series_number"]), "SeriesDescription": SERIES[cohort]["t1"],
          "ProtocolName": SERIES[cohort]["t1"], "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"],
          "SeriesInstanceUID": _uid(seed, cohort, pid, "t1"), "ScanningSequence": "SE",
          "SequenceVariant": "SP", "ScanOptions": "", "MRAcquisitionType": "2D",
          "SequenceName": "*se2d1", "SliceThickness": SLICE_MM, "SpacingBetweenSlices": SLICE_MM,
          "RepetitionTime": 600, "EchoTime": 10, "EchoTrainLength": 1, "FlipAngle": 90,
          "NumberOfAverages": 1, "PixelBandwidth": 130, "PixelSpacing": [dr, dc],
          "WindowCenter": 1200, "WindowWidth": 2400, **rescale}
    _write_series(study_dir / (t1_folder or str(t1["SeriesNumber"])), stored.astype(np.uint16),
                  common, t1, positions, instances, [1, 0, 0, 0, 1, 0], rng,
                  numbered=cohort == "oai")
    loc = render_localizer(anatomy_from_row(row), size=rows, rng=rng)
    spacing = round(500.0 / rows, 4)
    loc_pos = np.array([[-250.0, y, float(z.mean()) + 250.0] for y in (-20.0, 0.0, 20.0)])
    localizer = {"SeriesNumber": 1, "SeriesDescription": LOCALIZER, "ProtocolName": LOCALIZER,
                 "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"],
                 "SeriesInstanceUID": _uid(seed, cohort, pid, "localizer"),
                 "ScanningSequence": "GR", "SequenceVariant": "SP", "MRAcquisitionType": "2D",
                 "SequenceName": "*fl2d1", "SliceThickness": 7, "RepetitionTime": 8.6,
                 "EchoTime": 4, "FlipAngle": 20, "PixelSpacing": [spacing, spacing]}
    _write_series(loc_dir / (loc_folder or "1"), loc.astype(np.uint16), common, localizer,
                  loc_pos, np.arange(1, 4), [1, 0, 0, 0, 0, -1], rng, numbered=cohort == "oai")
    return study_dir, loc_dir
