"""Cohort specs and table parsing: codes, missing codes, 400 m filter, strength rule."""

from __future__ import annotations

import math

import pytest

from data_prep.cohorts import (MEASURES, CohortSpecError, apply_column_overrides,
                               load_cohort_table, load_spec, parse_spec, select_visit)

OAI_HEADER = ("ID|V00AGE|P01BMI|P01WEIGHT|P01HEIGHT|V0020MPACE|V00400MTIM|V00400MCMP|"
              "V00CSTIME1|V00CSPACE|V00REMAXF|V00LEMAXF|V00RFMAXF|V00LFMAXF")
OAI_ROWS = [
    # both sides; completed without stopping
    "9000001|61|27.5|80|1700|1.35|290.5|1: Completed test without stopping|10.2|0.49|400|300|1|1",
    # one side missing; completed with rests; chair missing form
    "9000002|70|.: Missing Form/Incomplete Workbook|70|1650|1.10|350.0|"
    "2: Completed test with one or more rests|.: Missing Form/Incomplete Workbook| |"
    ".A: Not Expected|250|1|1",
    # not completed 400 m: time must be dropped; both strength missing; blank gait
    "9000003|55|31.0|90|1800| |420.0|0: Not completed|12.0|0.41| | |1|1",
    # row without images in the synth; walk completion missing -> time dropped
    "0012345|66|22.0|60|1600|1.2|300.0|.: Missing Form/Incomplete Workbook|9.0|0.5|500|520|1|1",
]
ENROLLEES = ["ID|P02SEX|P02RACE", "9000001|1: Male|1: White", "9000002|2: Female|2: Black",
             "9000003|2: Female|1: White", "0012345|1: Male|1: White"]


def write_oai(tables):
    (tables / "AllClinical_ASCII").mkdir(parents=True)
    (tables / "General_ASCII").mkdir(parents=True)
    (tables / "AllClinical_ASCII" / "AllClinical00.txt").write_bytes(
        "\r\n".join([OAI_HEADER, *OAI_ROWS, ""]).encode("latin-1"))
    (tables / "General_ASCII" / "Enrollees.txt").write_bytes(
        "\r\n".join([*ENROLLEES, ""]).encode("latin-1"))


def test_oai_codes_missing_and_rules(tmp_path):
    write_oai(tmp_path)
    table, report = load_cohort_table(load_spec("oai"), tmp_path)
    assert len(table) == 4 and table.index.name == "key"
    assert table.loc["0012345", "sex"] == "male"  # leading zeros of the key kept
    assert table.loc["9000001", "sex"] == "male" and table.loc["9000002", "sex"] == "female"
    # strength: mean of available sides
    assert table.loc["9000001", "leg_strength"] == 350.0
    assert table.loc["9000002", "leg_strength"] == 250.0
    assert math.isnan(table.loc["9000003", "leg_strength"])
    assert report["combined"]["leg_strength"] == {
        "rule": "mean_available", "columns": ["V00REMAXF", "V00LEMAXF"],
        "from_all": 2, "from_some": 1, "none": 1}
    # 400 m: only completion codes 1 or 2
    assert table.loc["9000001", "gait_400m"] == 290.5
    assert table.loc["9000002", "gait_400m"] == 350.0
    assert math.isnan(table.loc["9000003", "gait_400m"])
    assert math.isnan(table.loc["0012345", "gait_400m"])
    assert report["filtered"]["gait_400m"]["removed"] == 2
    # missing codes -> NaN, counted per column and code
    assert math.isnan(table.loc["9000002", "bmi"]) and math.isnan(table.loc["9000003",
                                                                            "gait_speed_short"])
    assert report["missing"]["P01BMI"] == {".": 1}
    assert report["missing"]["V00CSTIME1"] == {".": 1}
    assert report["missing"]["V00REMAXF"] == {".A": 1, "blank": 1}
    assert report["missing"]["V0020MPACE"] == {"blank": 1}
    assert table.loc["9000001", "age"] == 61 and table.loc["9000001", "chair_stand"] == 10.2
    assert table["exercise"].isna().all()
    assert report["non_missing"]["leg_strength"] == 3


def test_somma_and_volunteers(tmp_path):
    (tmp_path / "somma_baseline.csv").write_text(
        "SOMMA_ID,GENDER,AGE_YRS,BMI_KGM2,LEGPOWER_W,GAIT4M_MS,WALK400_SEC,WALK400_DONE,CHAIR5_SEC\n"
        "S0001,F,72,26.1,150.5,1.05,330,1,11.5\n"
        "S0002,M,75,,210,0.95,400,0,\n")
    table, report = load_cohort_table(load_spec("somma"), tmp_path)
    assert table.loc["S0001", "sex"] == "female" and table.loc["S0002", "sex"] == "male"
    assert table.loc["S0001", "leg_strength"] == 150.5
    assert math.isnan(table.loc["S0002", "gait_400m"]) and math.isnan(table.loc["S0002", "bmi"])
    assert report["missing"]["CHAIR5_SEC"] == {"blank": 1}

    (tmp_path / "volunteers.csv").write_text("code,sex,age,exercise\nV01,F,30,yes\nV02,M,41,no\n"
                                             "V03,M,35,\n")
    table, _ = load_cohort_table(load_spec("volunteers"), tmp_path)
    assert table["exercise"].tolist()[:2] == [1.0, 0.0] and math.isnan(table.loc["V03",
                                                                                  "exercise"])
    assert table[list(MEASURES)].isna().all().all()


def test_unknown_spec_keys_listed():
    spec = load_spec("oai")
    raw = {"name": "x", "key": "ID", "tables": [{"file": "t.csv", "sep": ","}],
           "fields": {"strength": {"column": "A"}, "age": {"column": "B", "parse": "num"}},
           "dicom": {"series_description": ["THIGH"], "visit": "00m"}, "extra": 1}
    with pytest.raises(CohortSpecError) as err:
        parse_spec(raw)
    msg = str(err.value)
    for bad in ("['extra']", "['sep']", "['strength']", "['parse']", "['visit']"):
        assert bad in msg
    assert "allowed keys" in msg and "leg_strength" in msg
    assert spec.description_patterns == ["^AX_T1_THIGH$"] and spec.visit_folder == "00m"


def test_spec_column_not_in_table(tmp_path):
    write_oai(tmp_path)
    spec = load_spec("oai")
    spec.fields["age"] = {"column": "V00AGE_YEARS"}
    with pytest.raises(CohortSpecError, match=r"V00AGE_YEARS.*only measures"):
        load_cohort_table(spec, tmp_path)


def test_release_with_only_some_measures(tmp_path, caplog):
    # a restricted pull without the strength columns and the 400 m completion code: the
    # other measures are built, the missing ones are NaN, named in a warning and the report
    write_oai(tmp_path)
    clinical = tmp_path / "AllClinical_ASCII" / "AllClinical00.txt"
    lines = [line.split("|") for line in clinical.read_text("latin-1").splitlines() if line]
    drop = {lines[0].index(c) for c in ("V00REMAXF", "V00LEMAXF", "V00400MCMP")}
    clinical.write_text("\r\n".join("|".join(v for i, v in enumerate(row) if i not in drop)
                                    for row in lines) + "\r\n", "latin-1")
    table, report = load_cohort_table(load_spec("oai"), tmp_path)
    assert report["absent_measures"] == {"leg_strength": ["V00REMAXF", "V00LEMAXF"],
                                         "gait_400m": ["V00400MCMP"]}
    assert table["leg_strength"].isna().all() and table["gait_400m"].isna().all()
    assert table.loc["9000001", "gait_speed_short"] == 1.35 and table["age"].notna().all()
    assert "leg_strength is not in this release" in caplog.text and "V00400MCMP" in caplog.text
    assert "leg_strength" not in report["uncertain"]  # nothing read, nothing to confirm
    # the key and sex stay required
    for column in ("ID", "P02SEX"):
        enrollees = tmp_path / "General_ASCII" / "Enrollees.txt"
        text = enrollees.read_text("latin-1")
        enrollees.write_text(text.replace(column, column + "_X", 1), "latin-1")
        with pytest.raises(CohortSpecError, match=column):
            load_cohort_table(load_spec("oai"), tmp_path)
        enrollees.write_text(text, "latin-1")


def test_rows_with_a_blank_key_are_listed(tmp_path):
    write_oai(tmp_path)
    clinical = tmp_path / "AllClinical_ASCII" / "AllClinical00.txt"
    clinical.write_bytes(clinical.read_bytes().replace(b"9000003|", b" |"))
    table, report = load_cohort_table(load_spec("oai"), tmp_path)
    assert report["rows_without_key"] == {"AllClinical_ASCII/AllClinical00.txt": [3]}
    assert "9000003" in table.index  # its Enrollees row is still there, without measures
    assert math.isnan(table.loc["9000003", "gait_speed_short"])


def test_unknown_cohort():
    with pytest.raises(CohortSpecError, match="oai"):
        load_spec("oia")


# ---- OAI on the NIMH Data Archive (NDA): description row, one row per visit, joins ----

NDA_DESC = {"src_subject_id": "Subject ID how it's defined in lab/project",
            "visit": "Visit name", "interview_age": "Age in months at the time of the interview",
            "sex": "Sex of the subject", "bmi": "Body mass index"}


def write_nda_table(path, columns, rows):
    """An NDA data-structure file: quoted, tab-delimited, line 2 = column descriptions."""
    def line(cells):
        return "\t".join(f'"{c}"' for c in cells)
    desc = [NDA_DESC.get(c, f"description of {c}") for c in columns]
    path.write_text("\n".join([line(columns), line(desc), *(line(r) for r in rows), ""]),
                    encoding="utf-8")


def write_nda(tables):
    """Three participants, two visits; 9000003 has no 24m rows, 9000002 no oarisk row."""
    pf_cols = ["subjectkey", "src_subject_id", "interview_age", "sex", "visit", "w20mpace",
               "w400mcmp", "w400mtim", "cstime1", "cspace", "remaxf", "lemaxf", "rfmaxf",
               "lfmaxf"]
    write_nda_table(tables / "oai_physfunct01.txt", pf_cols, [
        ["NDAR1", "9000001", "732", "M", "V00", "1.35", "1", "290.5", "10.2", "0.49", "400",
         "300", "150", "140"],
        ["NDAR1", "9000001", "756", "M", "V03", "1.20", "2", "310.0", "11.0", "0.45", "380",
         "", "150", "140"],
        ["NDAR2", "9000002", "840", "F", "V00", "", "0", "420.0", "", "", "", "250", "90",
         "95"],
        ["NDAR2", "9000002", "864", "F", "V03", "1.05", "1", "360.0", "12.5", "0.40", "260",
         "240", "90", "95"],
        ["NDAR3", "9000003", "660", "F", "V00", "1.50", "1", "250.0", "8.0", "0.6", "500",
         "520", "200", "190"],
    ])
    write_nda_table(tables / "oai_oarisk01.txt",
                    ["subjectkey", "src_subject_id", "interview_age", "sex", "visit", "bmi"], [
        ["NDAR1", "9000001", "732", "M", "V00", "27.5"],
        ["NDAR1", "9000001", "756", "M", "V03", "28.0"],
        ["NDAR3", "9000003", "660", "F", "V00", ""],
    ])
    write_nda_table(tables / "ndar_subject01.txt",
                    ["subjectkey", "src_subject_id", "interview_age", "sex", "race"], [
        ["NDAR1", "9000001", "732", "M", "White"], ["NDAR2", "9000002", "840", "F", "Black"],
        ["NDAR3", "9000003", "660", "F", "White"],
    ])


def test_oai_nda_baseline(tmp_path):
    write_nda(tmp_path)
    spec = load_spec("oai_nda")
    table, report = load_cohort_table(spec, tmp_path)
    assert sorted(table.index) == ["9000001", "9000002", "9000003"]
    assert table.loc["9000001", "sex"] == "male" and table.loc["9000002", "sex"] == "female"
    assert table.loc["9000001", "age"] == pytest.approx(61.0)  # 732 months
    assert table.loc["9000001", "leg_strength"] == 350.0  # mean of remaxf, lemaxf
    assert table.loc["9000002", "leg_strength"] == 250.0  # one side
    assert table.loc["9000001", "gait_400m"] == 290.5
    assert math.isnan(table.loc["9000002", "gait_400m"])  # walk not completed (0)
    assert report["filtered"]["gait_400m"]["removed"] == 1
    assert table.loc["9000001", "bmi"] == 27.5
    assert math.isnan(table.loc["9000002", "bmi"]) and math.isnan(table.loc["9000003", "bmi"])
    # blanks and absent rows are both missing, counted apart
    assert report["missing"]["bmi"] == {"blank": 1, "no_row": 1}
    assert report["missing"]["w20mpace"] == {"blank": 1}
    assert report["missing"]["w400mtim"] == {}  # every column read is listed
    assert report["missing_labels"]["no_row"] == "no row in this table"
    # the description row is not a participant, the visit filter kept baseline rows only
    assert [(t["rows_read"], t["rows_kept"]) for t in report["tables"]] == [(5, 3), (3, 2),
                                                                             (3, 3)]
    assert report["visit"] == "00m" and spec.visit_folder == "00m"
    assert report["uncertain"]["leg_strength"]["columns"] == ["remaxf", "lemaxf"]


def test_oai_nda_follow_up_visit(tmp_path):
    write_nda(tmp_path)
    spec = select_visit(load_spec("oai_nda"), "24m")
    table, report = load_cohort_table(spec, tmp_path)
    assert spec.visit_folder == "24m"
    assert table.loc["9000001", "age"] == pytest.approx(63.0)  # 756 months at 24m
    assert table.loc["9000001", "leg_strength"] == 380.0  # left blank at 24m
    assert table.loc["9000002", "gait_400m"] == 360.0 and math.isnan(table.loc["9000002", "bmi"])
    # 9000003 came to baseline only: 24m measures missing ("no_row"); sex from ndar_subject01
    assert table.loc["9000003", "sex"] == "female"
    assert math.isnan(table.loc["9000003", "gait_speed_short"])
    assert report["missing"]["w20mpace"] == {"no_row": 1}


def test_nda_without_visit_column_reports_duplicates(tmp_path):
    write_nda(tmp_path)
    spec = load_spec("oai_nda")
    spec.tables[0] = {k: v for k, v in spec.tables[0].items() if k != "visit_column"}
    with pytest.raises(CohortSpecError, match="2 duplicate keys.*visit_column"):
        load_cohort_table(spec, tmp_path)


# ---- visit choice, column templates, overrides ----

def test_oai_visit_selects_prefix_and_folder(tmp_path):
    spec = load_spec("oai")
    assert spec.visit == "00m" and spec.column("{V}20MPACE") == "V0020MPACE"
    late = select_visit(spec, "24m")
    assert late.visit_folder == "24m" and late.column("{V}20MPACE") == "V0320MPACE"
    assert late.resolved_fields()["leg_strength"]["columns"] == ["V03REMAXF", "V03LEMAXF"]
    assert late.resolved_fields()["gait_400m"]["only_if"]["column"] == "V03400MCMP"
    assert spec.visit == "00m"  # the original is untouched
    # a 24m table: the V03 names are read, V00 names would be absent
    (tmp_path / "AllClinical_ASCII").mkdir()
    (tmp_path / "General_ASCII").mkdir()
    header = OAI_HEADER.replace("V00", "V03")
    (tmp_path / "AllClinical_ASCII" / "AllClinical00.txt").write_text(
        "\n".join([header, OAI_ROWS[0], ""]), encoding="latin-1")
    (tmp_path / "General_ASCII" / "Enrollees.txt").write_text("\n".join(ENROLLEES) + "\n")
    table, report = load_cohort_table(late, tmp_path)
    assert table.loc["9000001", "gait_speed_short"] == 1.35 and report["visit"] == "24m"
    with pytest.raises(CohortSpecError, match="V00AGE"):  # the wrong visit's age: an error
        load_cohort_table(spec, tmp_path)
    with pytest.raises(CohortSpecError, match=r"unknown visit '06m'; allowed visits: \['00m'"):
        select_visit(spec, "06m")
    with pytest.raises(CohortSpecError, match="defines no visits"):
        select_visit(load_spec("somma"), "00m")


def test_spec_visit_and_template_errors():
    raw = {"name": "x", "key": "ID", "tables": [{"file": "t.csv", "visit_column": "visit"}],
           "visit": "12m", "visits": {"00m": {"folder": "00m", "prefix": "V00"}},
           "fields": {"age": {"column": "{V}AGE"}, "bmi": {"column": "{VISIT}BMI"}},
           "dicom": {"series_description": ["THIGH"], "visit_folder": "00m"}}
    with pytest.raises(CohortSpecError) as err:
        parse_spec(raw)
    msg = str(err.value)
    for part in ("visit '12m' is not one of the visits ['00m']", "['prefix']",
                 "{VISIT}", "not dicom.visit_folder", "defines V", "defines rows"):
        assert part in msg, part


def test_apply_column_overrides(tmp_path):
    write_oai(tmp_path)
    spec = load_spec("oai")
    new = apply_column_overrides(spec, ["gait_speed_short=V00CSPACE",
                                        "leg_strength={V}RFMAXF,{V}LFMAXF",
                                        "gait_400m.only_if=V00CSTIME1"])
    assert spec.fields["gait_speed_short"]["column"] == "{V}20MPACE"  # copy, not in place
    assert new.overrides == ["gait_speed_short=V00CSPACE", "leg_strength={V}RFMAXF,{V}LFMAXF",
                             "gait_400m.only_if=V00CSTIME1"]
    table, report = load_cohort_table(new, tmp_path)
    assert table.loc["9000001", "gait_speed_short"] == 0.49
    assert table.loc["9000001", "leg_strength"] == 1.0
    assert "leg_strength" not in report["uncertain"]  # named by the user: no longer a guess
    assert report["overrides"] == new.overrides
    somma = apply_column_overrides(load_spec("volunteers"), ["bmi=BMI", "key=ID"])
    assert somma.fields["bmi"] == {"column": "BMI"} and somma.key == "ID"
    with pytest.raises(CohortSpecError) as err:
        apply_column_overrides(spec, ["strength=X", "age", "leg_strength=ONE",
                                      "age.only_if=X", "gait_speed_short=A,B"])
    msg = str(err.value)
    assert "unknown field 'strength'; allowed fields: ['key', 'sex'" in msg
    assert "'age' must look like FIELD=COLUMN" in msg
    assert "give them all, comma-separated" in msg and "has no only_if" in msg
    assert "several need combine" in msg
    no_sex = load_spec("somma")
    no_sex.fields["sex"] = None
    with pytest.raises(CohortSpecError, match="sex is null in the spec and needs a 'map'"):
        apply_column_overrides(no_sex, ["sex=GENDER"])


def test_uncertain_columns_are_reported(tmp_path, caplog):
    write_oai(tmp_path)
    with caplog.at_level("WARNING", logger="data_prep.cohorts"):
        _, report = load_cohort_table(load_spec("oai"), tmp_path)
    assert report["uncertain"]["leg_strength"]["columns"] == ["V00REMAXF", "V00LEMAXF"]
    assert "uncertain" in caplog.text and "--column" in caplog.text


def test_dicom_conventions_of_a_spec():
    spec = load_spec("oai")
    assert spec.participant_tag == "PatientID" and spec.participant_depth is None
    assert spec.visit_folder == "00m"
    assert spec.other_visit_folders == ["12m", "24m", "36m", "48m"]
    assert select_visit(spec, "24m").other_visit_folders == ["00m", "12m", "36m", "48m"]
    assert load_spec("somma").other_visit_folders == []
    raw = {"name": "x", "key": "ID", "tables": [{"file": "t.csv"}], "fields": {},
           "dicom": {"series_description": ["THIGH"], "participant_tag": "Patient ID",
                     "participant_depth": 0}}
    with pytest.raises(CohortSpecError) as exc:
        parse_spec(raw)
    assert "participant_tag must be a DICOM keyword" in str(exc.value)
    assert "participant_depth must be an integer >= 1" in str(exc.value)
    raw["dicom"].update(participant_tag="OtherPatientIDs", participant_depth=2)
    spec = parse_spec(raw)
    assert spec.participant_tag == "OtherPatientIDs" and spec.participant_depth == 2


def test_builtin_specs_load():
    from data_prep.cohorts import builtin_specs
    assert builtin_specs() == ["oai", "oai_nda", "somma", "volunteers"]
    for name in builtin_specs():
        spec = load_spec(name)
        assert spec.description_patterns, name
