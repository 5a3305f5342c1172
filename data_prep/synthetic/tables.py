"""Clinical tables of the synthetic cohorts, each in its cohort's own conventions.

    from data_prep.synthetic.tables import write_tables
    write_tables({"oai": oai, "somma": somma, "volunteers": vol}, out, seed=0)

OAI: the classic ASCII release, `oai/tables/AllClinical_ASCII/AllClinical00.txt` and
`General_ASCII/Enrollees.txt` (pipe-delimited, upper-case header, CRLF, latin-1, coded cells
such as "1: Male", missing codes ".: Missing Form/Incomplete Workbook", ".A: Not Expected"
and blanks on about 3% of the measure cells). SOMMA: one CSV with its own names
(data_prep/cohorts/somma.yaml). Volunteers: code, sex, age, exercise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.synthetic.dicom_writer import derive_rng

OAI_MISSING = (".: Missing Form/Incomplete Workbook", ".A: Not Expected", " ")
OAI_400M_CODES = {1: "1: Completed test without stopping",
                  2: "2: Completed test with one or more rests", 0: "0: Not completed"}
OAI_RACE = ("1: White or Caucasian", "2: Black or African American", "3: Asian",
            "0: Other Non-white")


def _fmt(values: pd.Series, spec: str) -> list[str]:
    return [" " if pd.isna(v) else format(v, spec) for v in values]


def _sprinkle(cells: pd.DataFrame, groups: list[list[str]], codes: tuple[str, ...],
              rng: np.random.Generator, eligible: pd.DataFrame | None = None) -> pd.Series:
    """Replace ~3 % of the (row, column group) cells by missing codes; every code appears once.

    Returns the columns made missing per row (';'-joined) for truth.csv.
    """
    ok = None if eligible is None else {c: eligible[c].to_numpy() for c in eligible.columns}
    slots = [(i, g) for i in range(len(cells)) for g in range(len(groups))
             if ok is None or all(ok[c][i] for c in groups[g])]
    k = min(len(slots), max(len(codes), round(0.03 * len(slots))))
    missing = [""] * len(cells)
    for j, s in enumerate(rng.permutation(len(slots))[:k]):
        i, g = slots[s]
        code = codes[j] if j < len(codes) else codes[rng.integers(len(codes))]
        for col in groups[g]:
            cells.iat[i, cells.columns.get_loc(col)] = code
        missing[i] = ";".join(filter(None, [missing[i], *groups[g]]))
    return pd.Series(missing, index=cells.index)


def _write_pipe(df: pd.DataFrame, path: Path) -> None:
    """OAI ASCII release: pipe-delimited, upper-case header, CRLF, latin-1."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["|".join(c.upper() for c in df.columns)]
    lines += ["|".join(r) for r in df.astype(str).itertuples(index=False, name=None)]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode("latin-1"))


def write_tables(subjects: dict[str, pd.DataFrame], out: Path, *, seed: int) -> None:
    """Clinical tables of all cohorts; adds a 'table_missing' column to each frame."""
    rng = derive_rng(seed, 99)
    oai = subjects["oai"].sort_values("id")
    cells = pd.DataFrame({
        "ID": oai["id"], "V00AGE": _fmt(oai["age"], ".0f"), "P01BMI": _fmt(oai["bmi"], ".1f"),
        "P01WEIGHT": _fmt(oai["weight_kg"], ".1f"), "P01HEIGHT": _fmt(oai["height_mm"], ".0f"),
        "V0020MPACE": _fmt(oai["gait_speed_short"], ".2f"),
        "V00400MTIM": _fmt(oai["gait_400m"], ".0f"),
        "V00400MCMP": [OAI_400M_CODES[c] for c in oai["walk400_code"]],
        "V00CSTIME1": _fmt(oai["chair_stand"], ".2f"),
        "V00CSPACE": _fmt(5.0 / oai["chair_stand"], ".3f"),
        "V00REMAXF": _fmt(oai["strength_right"], ".1f"),
        "V00LEMAXF": _fmt(oai["strength_left"], ".1f"),
        "V00RFMAXF": _fmt(oai["flexion_right"], ".1f"),
        "V00LFMAXF": _fmt(oai["flexion_left"], ".1f")}, index=oai.index)
    cells.loc[oai["walk400_code"] == 0, "V00400MTIM"] = OAI_MISSING[0]
    groups = [["V0020MPACE"], ["V00400MTIM"], ["V00CSTIME1", "V00CSPACE"], ["V00REMAXF"],
              ["V00LEMAXF"], ["V00RFMAXF"], ["V00LFMAXF"]]
    eligible = pd.DataFrame(True, index=cells.index, columns=cells.columns)
    eligible["V00400MTIM"] = (oai["walk400_code"] != 0).to_numpy()
    subjects["oai"]["table_missing"] = _sprinkle(cells, groups, OAI_MISSING, rng, eligible)
    base = out / "oai" / "tables"
    _write_pipe(cells, base / "AllClinical_ASCII" / "AllClinical00.txt")
    race = rng.choice(len(OAI_RACE), len(oai), p=[0.79, 0.18, 0.01, 0.02])
    _write_pipe(pd.DataFrame({"ID": oai["id"], "P02SEX": np.where(oai["sex"] == "male",
                                                                  "1: Male", "2: Female"),
                              "P02RACE": [OAI_RACE[r] for r in race]}),
                base / "General_ASCII" / "Enrollees.txt")

    somma = subjects["somma"].sort_values("id")
    table = pd.DataFrame({
        "SOMMA_ID": somma["id"], "GENDER": np.where(somma["sex"] == "male", "M", "F"),
        "AGE_YRS": somma["age"].astype(int), "BMI_KGM2": somma["bmi"],
        "LEGPOWER_W": somma["leg_strength"].round(1),
        "GAIT4M_MS": somma["gait_speed_short"].round(3),
        "WALK400_SEC": somma["gait_400m"].round(1),
        "WALK400_DONE": (somma["walk400_code"] != 0).astype(int),
        "CHAIR5_SEC": somma["chair_stand"].round(2)}, index=somma.index).astype(object)
    eligible = pd.DataFrame(True, index=table.index, columns=table.columns)
    eligible["WALK400_SEC"] = (somma["walk400_code"] != 0).to_numpy()
    subjects["somma"]["table_missing"] = _sprinkle(
        table, [["LEGPOWER_W"], ["GAIT4M_MS"], ["WALK400_SEC"], ["CHAIR5_SEC"]], ("",), rng,
        eligible)
    (out / "somma" / "tables").mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "somma" / "tables" / "somma_baseline.csv", index=False, lineterminator="\n")

    vol = subjects["volunteers"]
    vol["table_missing"] = ""
    (out / "volunteers" / "tables").mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"code": vol["id"], "sex": np.where(vol["sex"] == "male", "M", "F"),
                  "age": vol["age"].astype(int),
                  "exercise": np.where(vol["exercise"] == 1, "yes", "no")}).to_csv(
        out / "volunteers" / "tables" / "volunteers.csv", index=False, lineterminator="\n")
