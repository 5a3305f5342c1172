"""Cohort specs and table parsing: codes, missing codes, 400 m filter, strength rule."""

from __future__ import annotations

import math

import pytest

from data_prep.cohorts import (MEASURES, CohortSpecError, load_cohort_table, load_spec,
                               parse_spec)

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
    spec.fields["leg_strength"] = {"columns": ["V00KNEEXT_R", "V00LEMAXF"],
                                   "combine": "mean_available"}
    with pytest.raises(CohortSpecError, match="V00KNEEXT_R"):
        load_cohort_table(spec, tmp_path)


def test_unknown_cohort():
    with pytest.raises(CohortSpecError, match="oai"):
        load_spec("oia")
