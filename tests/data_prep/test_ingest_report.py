"""Every table row and DICOM participant accounted for: a site tree where the table and the
images disagree in both directions, a release without some measures, and the study refusing
a grid that asks for one of them."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_dicom_series import CORONAL, write_series

from data_prep import build_store
from data_prep.store import ingest_report_path, open_store, pseudonym, verify_store

SALT = "test-salt-0123456789abcdef"
SPEC = {
    "name": "site", "key": "code",
    "tables": [{"file": "site.csv", "delimiter": ",", "encoding": "utf-8"}],
    "visit": "00m", "visits": {"00m": {"folder": "00m"}, "24m": {"folder": "24m"}},
    "fields": {"sex": {"column": "sex", "map": {"F": "female", "M": "male"}},
               "age": {"column": "age"}, "bmi": {"column": "bmi"},
               "leg_strength": {"column": "strength"}, "gait_speed_short": {"column": "gait"},
               "gait_400m": None, "chair_stand": None, "exercise": None},
    "dicom": {"series_description": ["^AX_T1_THIGH$"]},
}
# P01-P04 have images, P01-P03 and P05-P06 table rows (and one row has a blank code)
TABLE = """code,sex,age,bmi,strength
P01,F,61,27.5,410
P02,M,70,31.0,520
P03,F,55,24.0,380
,M,66,22.0,500
P05,M,59,29.0,450
P06,F,64,26.0,300
"""


def localizer(folder: Path, pid: str, seed: int) -> None:
    write_series(folder, n=3, seed=seed, patient_id=pid, description="MP_LOCATOR_THIGH",
                 orientation=CORONAL, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                 series_number=1)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A site's own layout, <ID>/<visit>/<series>/<files>, disagreeing with its table."""
    root = tmp_path_factory.mktemp("site")
    dicom, tables = root / "dicom", root / "tables"
    write_series(dicom / "P01" / "00m" / "t1", n=15, patient_id="P01")
    localizer(dicom / "P01" / "00m" / "loc", "P01", 1)
    write_series(dicom / "P01" / "24m" / "t1", n=15, seed=2, patient_id="P01")  # not this visit
    # P02: a repeat of the thigh series (series 5 after series 3): the rule picks one
    write_series(dicom / "P02" / "00m" / "t1", n=15, seed=3, patient_id="P02", series_number=3)
    write_series(dicom / "P02" / "00m" / "t1_repeat", n=15, seed=4, patient_id="P02",
                 series_number=5)
    localizer(dicom / "P03" / "00m" / "loc", "P03", 5)  # no thigh series
    write_series(dicom / "P04" / "00m" / "t1", n=15, seed=6, patient_id="P04")  # no table row
    write_series(dicom / "unsorted" / "00m", n=2, seed=7, patient_id="")  # no PatientID: nobody's
    (dicom / "README.txt").write_text("site export\n")  # outside any 00m folder: not read
    tables.mkdir()
    (tables / "site.csv").write_text(TABLE)  # no gait column: a release without that measure
    (root / "site.yaml").write_text(yaml.safe_dump(SPEC))
    return root


def run(site: Path, out: Path, *extra: str) -> int:
    return build_store.main(["--dicom", str(site / "dicom"), "--tables", str(site / "tables"),
                             "--cohort", str(site / "site.yaml"), "--out", str(out),
                             "--size", "32x32", "--workers", "2", "--no-progress", *extra])


@pytest.fixture(scope="module")
def built(site, tmp_path_factory) -> tuple[Path, str]:
    mp = pytest.MonkeyPatch()
    mp.setenv("THIGHMRI_SALT", SALT)
    out = tmp_path_factory.mktemp("store") / "site.zarr"
    printed = io.StringIO()  # the command line's output, checked below
    with contextlib.redirect_stdout(printed):
        assert run(site, out) == 0
    mp.undo()
    return out, printed.getvalue()


def pid(key: str) -> str:
    return pseudonym(SALT.encode(), "site", key)


def test_every_unmatched_row_and_participant_has_its_category(built):
    out, _ = built
    store = open_store(out)
    assert store.subjects["subject_id"].tolist() == [pid("P01"), pid("P02")]
    report = pd.read_csv(ingest_report_path(out))
    lines = {(r.source, r.reason): r for r in report.itertuples()}
    # table rows without images, images without a table row, and neither
    assert lines[(pid("P05"), "no_images")].skipped and lines[(pid("P06"), "no_images")].skipped
    assert lines[(pid("P04"), "no_table_row")].skipped
    assert lines[(pid("P03"), "no_thigh_series")].skipped
    assert lines[("site.csv#row4", "no_key")].skipped
    assert set(report.loc[report["reason"] == "no_patient_id", "source"]) == {
        "<dicom root>/file#0", "<dicom root>/file#1"}
    # two qualifying thigh series: which one and why, and the participant is kept
    note = lines[(pid("P02"), "several_thigh_series")]
    assert not note.skipped and "chose series number 5" in note.detail
    assert "most files, then highest series number" in note.detail
    assert len(report) == 8  # nothing else, nothing twice
    accounting = store.attrs["cohorts"]["site"]["accounting"]
    assert accounting["table_rows"] == {"n": 6, "ingested": 2, "not_ingested": {
        "no_images": 2, "no_key": 1, "no_thigh_series": 1}}
    assert accounting["dicom_participants"] == {"n": 4, "ingested": 2, "not_ingested": {
        "no_table_row": 1, "no_thigh_series": 1}}
    assert accounting["files"] == {"no_patient_id": 2}
    assert accounting["notes"] == {"several_thigh_series": 1}
    assert store.attrs["cohorts"]["site"]["n_files_outside_visit"] == 1
    assert verify_store(out) == []


def test_summary_counts_categories_and_warns_last(built, site, tmp_path, monkeypatch, capsys):
    _, printed = built
    assert "table rows: 6, ingested 2, not ingested 4:" in printed
    assert "DICOM participants: 4, ingested 2, not ingested 2:" in printed
    assert str(ingest_report_path(built[0])) in printed
    assert "measure not in this release: gait_speed_short (columns gait" in printed
    assert "1 files outside the folder '00m' not read" in printed
    last = printed.strip().splitlines()[-1]
    assert last.startswith("WARNING: 2 of 6 table rows (33%) found no images")
    # a share the user allows: no warning
    monkeypatch.setenv("THIGHMRI_SALT", SALT)
    assert run(site, tmp_path / "ok.zarr", "--max-rows-without-images", "0.4") == 0
    assert "WARNING" not in capsys.readouterr().out


def test_no_phi_in_the_report_or_the_summary(built, site):
    out, printed = built
    text = ingest_report_path(out).read_text() + json.dumps(open_store(out).attrs) + printed
    files = {p.name for p in (site / "dicom").rglob("*") if p.is_file()}
    assert len(files) > 50 and not [n for n in files if n in text]
    for phi in ("P01", "P02", "P03", "P04", "P05", "P06", "Doe", "Jane"):  # IDs, the name
        assert phi not in text


def test_release_without_a_measure_is_recorded_and_a_grid_asking_for_it_refused(built):
    from study.config import parse_grid
    from study.plan import PlanError, plan_cells

    out, _ = built
    store = open_store(out)
    assert store.attrs["cohorts"]["site"]["measures_absent"] == {"gait_speed_short": ["gait"]}
    assert store.subjects["gait_speed_short"].isna().all()
    assert store.subjects["leg_strength"].notna().all()
    grid = parse_grid({"question": "q", "store": str(out),
                       "search": {"lr": {"loguniform": [1e-4, 1e-2]}},
                       "grid": {"cohort": ["site"], "measure": ["gait_speed_short"]}})
    with pytest.raises(PlanError, match=r"'gait_speed_short' is not in cohort 'site''s release: "
                                        r"its tables lack column\(s\) gait"):
        plan_cells(grid, store)
