"""Tests of data_prep/synth.py and data_prep/synthetic/: real files in tmp_path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from scipy import ndimage

from data_prep.synthetic.phantom import ThighAnatomy, render_axial_stack
from data_prep.synth import main
from data_prep.synthetic import generate_cohort, sample_subjects
from data_prep.synthetic.dicom_writer import PHI_NAMES, SERIES, anatomy_from_row, participant_rng
from data_prep.synthetic.tables import OAI_400M_CODES, OAI_MISSING

REPO = Path(__file__).resolve().parents[2]
MATRIX = (128, 256)  # small but fine enough (1.95 mm) for area checks by threshold
SUBJECTS = 4
SEED = 7


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, subjects=SUBJECTS, seed=SEED, matrix=MATRIX)
    return out


@pytest.fixture(scope="module")
def truth(cohort) -> pd.DataFrame:
    return pd.read_csv(cohort / "truth.csv", dtype={"id": str, "dicom_dir": str,
                                                    "localizer_dir": str, "batch": str},
                       keep_default_na=True)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _read_study(*study_dirs: Path) -> dict[str, list[pydicom.Dataset]]:
    series: dict[str, list[pydicom.Dataset]] = {}
    for f in sorted({f for d in study_dirs for f in _files(d)}):
        ds = pydicom.dcmread(f)
        ds.filename_ = f.name
        series.setdefault(ds.SeriesDescription, []).append(ds)
    return series


def _axial_volume(slices: list[pydicom.Dataset]) -> tuple[np.ndarray, list[pydicom.Dataset]]:
    """Physical values (rescale applied), ordered by z along the slice normal."""
    ordered = sorted(slices, key=lambda d: float(d.ImagePositionPatient[2]))
    vol = np.stack([d.pixel_array.astype(np.float64) * float(getattr(d, "RescaleSlope", 1))
                    + float(getattr(d, "RescaleIntercept", 0)) for d in ordered])
    return vol, ordered


# --- layout and DICOM ---------------------------------------------------------------------

def test_layout_and_counts(cohort, truth):
    manifest = json.loads((cohort / "manifest.json").read_text())
    assert manifest["counts"] == {"oai": {"imaged": 4, "table_only": 3},
                                  "somma": {"imaged": 2, "table_only": 0},
                                  "volunteers": {"imaged": 8, "table_only": 0}}
    assert manifest["seed"] == SEED and manifest["null"] is False
    assert manifest["correlations"]["planted"]["leg_strength"] == {"feature": "muscle_area_cm2",
                                                                   "r": 0.65}
    for rel in ("oai/tables/AllClinical_ASCII/AllClinical00.txt",
                "oai/tables/General_ASCII/Enrollees.txt", "somma/tables/somma_baseline.csv",
                "volunteers/tables/volunteers.csv"):
        assert (cohort / rel).is_file(), rel
    # OAI's release tree: <visit>/<batch>/<ID>/<date>/<8-digit series>/<numbered images>, at
    # least two batches, and a participant whose localizer is in another batch (0.E.1)
    batches = sorted(p.name for p in (cohort / "oai/dicom/00m").iterdir())
    assert batches == ["0.C.1", "0.C.2", "0.E.1"] == manifest["oai_batches"]
    assert manifest["oai_split_over_two_batches"] == 1
    oai = truth[(truth["cohort"] == "oai") & truth["has_images"]]
    (split,) = oai.index[oai["dicom_dir"] != oai["localizer_dir"]]
    split_id = oai.loc[split, "id"]
    assert oai.loc[split, "localizer_dir"].startswith(f"oai/dicom/00m/0.E.1/{split_id}/")
    for _, row in oai.iterrows():
        study = cohort / row["dicom_dir"]
        assert study.parent.name == row["id"] and study.parent.parent.name == row["batch"]
        assert len(study.name) == 8 and study.name.startswith("200")
        series = sorted({p.parent for p in _files(study)} | {p.parent for p in _files(
            cohort / row["localizer_dir"])})
        assert len(series) == 2 and all(len(s.name) == 8 and s.name.isdigit() for s in series)
        for s in series:  # images numbered as in the release: 001, 002, ...
            assert sorted(p.name for p in s.iterdir()) in ([f"{i:03d}" for i in range(1, 16)],
                                                           ["001", "002", "003"])
    assert len(list((cohort / "somma/dicom").iterdir())) == 2
    assert sorted(p.name for p in (cohort / "volunteers/dicom").iterdir()) == [
        f"V{i:02d}" for i in range(1, 9)]
    imaged = truth[truth["has_images"]]
    assert len(imaged) == 14 and truth["dicom_dir"].isna().sum() == 3
    assert all((cohort / d).is_dir() for d in imaged["dicom_dir"])
    names = [p.name for p in _files(cohort / "somma/dicom")]
    assert all("." not in n and len(n) == 12 and int(n, 16) >= 0 for n in names)


def test_dicom_round_trip(cohort, truth):
    descending, rescaled, name_order_wrong = 0, set(), 0
    for _, row in truth[truth["has_images"]].iterrows():
        series = _read_study(cohort / row["dicom_dir"], cohort / row["localizer_dir"])
        t1, loc = series[SERIES[row["cohort"]]["t1"]], series["MP_LOCATOR_THIGH"]
        assert set(series) == {SERIES[row["cohort"]]["t1"], "MP_LOCATOR_THIGH"}
        assert len(t1) == 15 and len(loc) == 3
        for ds in t1 + loc:
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.PatientID == row["id"] and str(ds.PatientName) in PHI_NAMES
            assert ds.StudyDescription == SERIES[row["cohort"]]["study"]
            assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (
                16, 12, 11, 0)
            assert ds.PatientBirthDate and ds.InstitutionName and ds.AccessionNumber
        assert len({d.StudyInstanceUID for d in t1 + loc}) == 1
        assert len({d.SOPInstanceUID for d in t1 + loc}) == 18
        assert all("LOCALIZER" in d.ImageType for d in loc)
        assert all([float(v) for v in d.ImageOrientationPatient] == [1, 0, 0, 0, 0, -1]
                   for d in loc)
        vol, ordered = _axial_volume(t1)
        first = ordered[0]
        assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert (first.Rows, first.Columns) == MATRIX and first.pixel_array.dtype == np.uint16
        assert float(first.PixelSpacing[0]) == pytest.approx(250 / MATRIX[0], abs=1e-3)
        assert (first.Manufacturer, float(first.MagneticFieldStrength), first.ScanningSequence,
                float(first.RepetitionTime), float(first.EchoTime)) == ("SIEMENS", 3, "SE", 600, 10)
        z = np.array([float(d.ImagePositionPatient[2]) for d in ordered])
        np.testing.assert_allclose(np.diff(z), 5.0, atol=1e-3)
        inst = [int(d.InstanceNumber) for d in ordered]
        assert inst == (list(range(15, 0, -1)) if row["z_descending"] else list(range(1, 16)))
        descending += bool(row["z_descending"])
        names = [d.filename_ for d in ordered]
        if row["cohort"] == "oai":  # numbered by InstanceNumber, whatever the slice order
            assert names == [f"{int(d.InstanceNumber):03d}" for d in ordered]
        else:
            name_order_wrong += names != sorted(names)
        if "RescaleSlope" in first:
            rescaled.add(float(first.RescaleSlope))
            assert float(first.RescaleSlope) == row["rescale_slope"]
        else:
            assert np.isnan(row["rescale_slope"])
        # pixels equal a fresh rendering of the same participant (up to rescale rounding)
        stack = render_axial_stack(anatomy_from_row(row), matrix=MATRIX,
                                   rng=participant_rng(SEED, row["cohort"], row["id"], "image"))
        slope = float(getattr(first, "RescaleSlope", 1))
        assert np.abs(vol - stack.image).max() <= slope / 2
        assert 500 < vol.max() <= 4095 * slope and vol.min() >= 0
    assert 0 < descending < 14 and rescaled == {1.0, 2.0} and name_order_wrong >= 8


def test_phi_in_headers_is_distinctive(cohort):
    ds = pydicom.dcmread(_files(cohort / "somma/dicom")[0])
    assert "^" in str(ds.PatientName) and ds.PatientID.startswith("SM")
    assert ds.InstitutionName.startswith("SOMMA") and "^" in str(ds.ReferringPhysicianName)
    assert len(ds.PatientBirthDate) == 8 and int(ds.PatientBirthDate[:4]) < 1952


def test_same_seed_same_bytes_other_seed_differs(cohort, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    generate_cohort(again, subjects=SUBJECTS, seed=SEED, matrix=MATRIX)
    generate_cohort(other, subjects=SUBJECTS, seed=SEED + 1, matrix=MATRIX)
    files = [p.relative_to(cohort) for p in _files(cohort)]
    assert files == [p.relative_to(again) for p in _files(again)]
    for rel in files:
        assert (cohort / rel).read_bytes() == (again / rel).read_bytes(), rel
    assert (cohort / "truth.csv").read_bytes() != (other / "truth.csv").read_bytes()
    a = pydicom.dcmread(_files(cohort / "volunteers/dicom/V01")[0])
    b = pydicom.dcmread(_files(other / "volunteers/dicom/V01")[0])
    assert a.StudyInstanceUID != b.StudyInstanceUID and a.PixelData != b.PixelData
    with pytest.raises(FileExistsError):
        generate_cohort(again, subjects=SUBJECTS, seed=SEED, matrix=MATRIX)


# --- tables -------------------------------------------------------------------------------

def test_oai_tables_follow_conventions(cohort, truth):
    raw = (cohort / "oai/tables/AllClinical_ASCII/AllClinical00.txt").read_bytes()
    assert raw.endswith(b"\r\n") and raw.count(b"\n") == raw.count(b"\r\n") == 8
    text = raw.decode("latin-1")
    assert text.splitlines()[0] == ("ID|V00AGE|P01BMI|P01WEIGHT|P01HEIGHT|V0020MPACE|V00400MTIM|"
                                    "V00400MCMP|V00CSTIME1|V00CSPACE|V00REMAXF|V00LEMAXF|"
                                    "V00RFMAXF|V00LFMAXF")
    clin = pd.read_csv(cohort / "oai/tables/AllClinical_ASCII/AllClinical00.txt", sep="|",
                       dtype=str, keep_default_na=False, encoding="latin-1")
    oai = truth[truth["cohort"] == "oai"]
    assert sorted(clin["ID"]) == sorted(oai["id"])  # imaged and table-only participants
    cells = clin.drop(columns=["ID", "V00400MCMP"]).to_numpy().ravel().tolist()
    for code in OAI_MISSING:
        assert code in cells, f"missing code {code!r} never used"
    assert set(clin["V00400MCMP"]) <= set(OAI_400M_CODES.values())
    assert (clin.loc[clin["V00400MCMP"].str.startswith("0"), "V00400MTIM"] == OAI_MISSING[0]).all()
    bmi = clin["P01WEIGHT"].astype(float) / (clin["P01HEIGHT"].astype(float) / 1000) ** 2
    np.testing.assert_allclose(bmi, clin["P01BMI"].astype(float), atol=0.06)
    ok = ~clin["V00REMAXF"].str.startswith((".", " "))
    merged = clin[ok].merge(oai, left_on="ID", right_on="id")
    assert np.corrcoef(merged["V00REMAXF"].astype(float), merged["leg_strength"])[0, 1] > 0.95
    enr = pd.read_csv(cohort / "oai/tables/General_ASCII/Enrollees.txt", sep="|", dtype=str,
                      encoding="latin-1")
    sex = dict(zip(enr["ID"], enr["P02SEX"]))
    assert all(sex[i] == {"male": "1: Male", "female": "2: Female"}[s]
               for i, s in zip(oai["id"], oai["sex"]))


def test_somma_and_volunteer_tables(cohort, truth):
    somma = pd.read_csv(cohort / "somma/tables/somma_baseline.csv", dtype={"SOMMA_ID": str})
    assert list(somma.columns) == ["SOMMA_ID", "GENDER", "AGE_YRS", "BMI_KGM2", "LEGPOWER_W",
                                   "GAIT4M_MS", "WALK400_SEC", "WALK400_DONE", "CHAIR5_SEC"]
    assert set(somma["GENDER"]) <= {"F", "M"} and set(somma["WALK400_DONE"]) <= {0, 1}
    assert somma.isna().sum().sum() >= 1 and (somma["AGE_YRS"] >= 70).all()
    assert sorted(somma["SOMMA_ID"]) == sorted(truth.loc[truth["cohort"] == "somma", "id"])
    vol = pd.read_csv(cohort / "volunteers/tables/volunteers.csv")
    assert list(vol.columns) == ["code", "sex", "age", "exercise"]
    assert list(vol["code"]) == [f"V{i:02d}" for i in range(1, 9)]
    assert set(vol["exercise"]) == {"yes", "no"} and 3 <= (vol["exercise"] == "yes").sum() <= 5


# --- image content ------------------------------------------------------------------------

def test_areas_measured_from_images_match_truth(cohort, truth):
    """Threshold muscle vs fat inside the body outline; compare with truth.csv (8 %).

    Skin-edge pixels (part air, part fat) look like muscle, so muscle is counted inside the
    body outline eroded by one pixel, as one would on a real scan.
    """
    for _, row in truth[truth["has_images"]].iterrows():
        vol, ordered = _axial_volume(_read_study(cohort / row["dicom_dir"])[
            SERIES[row["cohort"]]["t1"]])
        pixel_cm2 = float(np.prod([float(v) for v in ordered[0].PixelSpacing])) / 100
        fat_level = np.median(vol[vol > 0.5 * np.percentile(vol, 99.5)])
        smooth = ndimage.median_filter(vol, size=(1, 3, 3))
        body = np.stack([ndimage.binary_fill_holes(s > 0.15 * fat_level) for s in smooth])
        inner = ndimage.binary_erosion(body, np.ones((1, 3, 3), bool))
        muscle = inner & (vol > 0.15 * fat_level) & (vol < 0.6 * fat_level)
        fat_like = body & (vol >= 0.6 * fat_level)  # subcutaneous fat + IMAT + marrow
        per_thigh = pixel_cm2 / 2 / len(vol)
        marrow = np.pi * (row["femur_radius_mm"] - row["cortex_mm"]) ** 2 / 100
        assert muscle.sum() * per_thigh == pytest.approx(row["muscle_area_cm2"], rel=0.08)
        assert fat_like.sum() * per_thigh == pytest.approx(
            row["fat_area_cm2"] + row["imat_area_cm2"] + marrow, rel=0.08)


def test_phantom_tissue_areas_are_exact():
    anat = ThighAnatomy(muscle_area_cm2=120, imat_fraction=0.12, fat_area_cm2=150,
                        asymmetry=0.04, taper=0.05)
    stack = render_axial_stack(anat, matrix=(64, 128), rng=np.random.default_rng(3))
    per_thigh = np.prod(stack.pixel_spacing_mm) / 100 / 2
    areas = {k: stack.tissue[k].sum(axis=(1, 2)) * per_thigh for k in stack.tissue}
    assert areas["muscle"].mean() == pytest.approx(120, rel=0.02)
    assert areas["imat"].mean() == pytest.approx(anat.imat_area_cm2, rel=0.05)
    assert areas["subcut_fat"].mean() == pytest.approx(150, rel=0.01)
    ratio = areas["subcut_fat"][-1] / areas["subcut_fat"][0]  # proximal / distal
    assert 1.05 < ratio < 1.15
    right, left = (stack.tissue["subcut_fat"][..., s].sum() for s in (slice(0, 64), slice(64, 128)))
    assert right / left == pytest.approx(1.04 / 0.96, rel=0.01)
    assert stack.image.dtype == np.float32 and stack.image.max() <= 4095
    air = stack.image[:, :4, :4]  # Rician noise floor, not zero
    assert 0 < air.mean() < 0.05 * stack.image.max()


# --- subject model at large n -------------------------------------------------------------

def _r(df: pd.DataFrame, a: str, b: str) -> float:
    ok = df[[a, b]].dropna()
    return float(np.corrcoef(ok[a], ok[b])[0, 1])


@pytest.mark.parametrize("cohort_name", ["oai", "somma"])
def test_planted_correlations(cohort_name):
    df = sample_subjects(4000, seed=11, cohort=cohort_name)
    assert _r(df, "muscle_area_cm2", "leg_strength") == pytest.approx(0.65, abs=0.05)
    assert _r(df, "imat_fraction", "gait_speed_short") == pytest.approx(-0.30, abs=0.05)
    assert _r(df, "imat_fraction", "gait_400m") == pytest.approx(0.25, abs=0.05)
    assert _r(df, "muscle_area_cm2", "chair_stand") == pytest.approx(-0.20, abs=0.05)
    assert _r(df, "bmi", "gait_speed_short") < -0.05  # through intermuscular fat
    strong = sample_subjects(4000, seed=11, cohort=cohort_name, r_strength=0.4)
    assert _r(strong, "muscle_area_cm2", "leg_strength") == pytest.approx(0.40, abs=0.05)


def test_sex_bmi_and_age_effects():
    oai = sample_subjects(4000, seed=5, cohort="oai")
    men, women = oai[oai["sex"] == "male"], oai[oai["sex"] == "female"]
    assert (oai["sex"] == "female").mean() == pytest.approx(0.58, abs=0.03)
    assert men["muscle_area_cm2"].mean() - women["muscle_area_cm2"].mean() > 25
    assert women["fat_area_cm2"].mean() - men["fat_area_cm2"].mean() > 30
    assert men["leg_strength"].mean() > 1.15 * women["leg_strength"].mean()
    assert _r(oai, "bmi", "fat_area_cm2") > 0.5 and 0.15 < _r(oai, "bmi", "muscle_area_cm2") < 0.6
    assert oai["bmi"].between(18, 48).all() and oai["bmi"].mean() == pytest.approx(28.5, abs=0.5)
    assert oai["age"].between(45, 79).all() and oai["walk400_code"].isin([0, 1, 2]).all()
    somma = sample_subjects(2000, seed=5, cohort="somma")
    assert somma["age"].min() >= 70 and (somma["sex"] == "female").mean() == pytest.approx(
        0.59, abs=0.03)
    total = oai[["muscle_area_cm2", "imat_area_cm2", "bone_area_cm2", "fat_area_cm2"]].sum(axis=1)
    assert total.max() <= 330  # every thigh fits its half of the field of view


def test_null_cohort_has_no_image_signal_same_marginals():
    null = sample_subjects(10_000, seed=11, cohort="oai", null=True)
    real = sample_subjects(10_000, seed=11, cohort="oai")
    for feature in ("muscle_area_cm2", "imat_fraction", "fat_area_cm2", "bmi"):
        for measure in ("leg_strength", "gait_speed_short", "gait_400m", "chair_stand"):
            assert abs(_r(null, feature, measure)) < 0.05, (feature, measure)
    for measure in ("leg_strength", "gait_speed_short", "chair_stand"):
        assert null[measure].mean() == pytest.approx(real[measure].mean(), rel=0.02)
        assert null[measure].std() == pytest.approx(real[measure].std(), rel=0.05)
    pd.testing.assert_series_equal(null["muscle_area_cm2"], real["muscle_area_cm2"])


def test_volunteer_exercisers_have_more_muscle():
    diffs = []
    for seed in range(150):
        v = sample_subjects(8, seed=seed, cohort="volunteers")
        assert 3 <= v["exercise"].sum() <= 5 and v["leg_strength"].isna().all()
        z = v.groupby("sex")["muscle_area_cm2"].transform(lambda s: (s - s.mean()) / s.std())
        diffs.append(z[v["exercise"] == 1].mean() - z[v["exercise"] == 0].mean())
    assert np.nanmean(diffs) > 0.5


def test_invalid_arguments_are_reported(tmp_path):
    with pytest.raises(ValueError, match="Invalid cohort 'ukb'"):
        sample_subjects(10, seed=0, cohort="ukb")
    with pytest.raises(ValueError, match="Invalid correlation 1.5"):
        sample_subjects(10, seed=0, cohort="oai", r_strength=1.5)
    with pytest.raises(ValueError, match="unknown feature 'thigh_volume'"):
        sample_subjects(10, seed=0, cohort="oai", correlations={"chair_stand": ("thigh_volume", .2)})
    with pytest.raises(ValueError, match="does not fit"):
        render_axial_stack(ThighAnatomy(muscle_area_cm2=200, imat_fraction=0.1, fat_area_cm2=300),
                           matrix=(64, 128), rng=np.random.default_rng(0))
    with pytest.raises(SystemExit):
        main(["--out", "x", "--matrix", "256by512"])
    with pytest.raises(SystemExit, match="Invalid matrix 64x127"):
        main(["--out", str(tmp_path), "--matrix", "64x127"])
    assert not any(tmp_path.iterdir())  # checked before anything was written


# --- CLI ----------------------------------------------------------------------------------

def test_cli_runs_as_a_file(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, str(REPO / "data_prep/synth.py"), "--out", str(out),
                           "--subjects", "1", "--seed", "3", "--matrix", "64x128", "--null"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "oai 1 imaged + 3 table-only, somma 1 imaged, volunteers 8 imaged" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["null"] is True and manifest["matrix"] == [64, 128]
    assert manifest["correlations"]["planted"]["leg_strength"]["r"] == 0.0
    assert len(_files(out / "oai/dicom")) == 18


def test_a_pure_muscle_quality_effect_can_be_planted():
    """Strength from muscle quality only: intermuscular fat at fixed size, independent of muscle area,
    more visible with a larger imat_quality_sd."""
    from data_prep.synthetic.subjects import sample_subjects

    plant = {"leg_strength": ("muscle_quality", 0.8)}
    df = sample_subjects(4000, seed=1, cohort="oai", correlations=plant, imat_quality_sd=0.06)
    r = df[["leg_strength", "muscle_quality", "muscle_area_cm2", "imat_fraction", "bmi"]].corr()
    assert r.loc["leg_strength", "muscle_quality"] == pytest.approx(0.8, abs=0.03)
    assert abs(r.loc["leg_strength", "muscle_area_cm2"]) < 0.05 and abs(r.loc["muscle_quality", "bmi"]) < 0.05
    assert r.loc["muscle_quality", "imat_fraction"] < -0.8  # quality is what the images show as IMAT
    default = sample_subjects(4000, seed=1, cohort="oai", correlations=plant)
    assert df["imat_fraction"].std() > 1.5 * default["imat_fraction"].std()
    with pytest.raises(ValueError, match="imat_quality_sd"):
        sample_subjects(10, seed=1, cohort="oai", imat_quality_sd=0.5)
