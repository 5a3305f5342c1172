"""study/predict.py: verdicts against the model's training protocol, pseudonyms, no names leak."""

from __future__ import annotations

import stat
from pathlib import Path

import pandas as pd
import pydicom
import pytest

from pyfunc_helpers import _altered_copy, _oai_visits, cohort, logged  # noqa: F401 (fixtures)

SALT = "predict-test-salt-0123456789abcdef"
# identifying strings planted in folder names, file names and PatientIDs
PLANTED = ("DOE^JANE", "MRN778812", "ROE_RICHARD", "PID-4411", "PID-5522", "PID-6633")


@pytest.fixture()
def site(cohort, tmp_path) -> Path:
    """A site's export: three participants in folders named after them, files named by MRN.

    PID-4411 is an OAI scan as trained (accept); PID-5522 the same with twice the pixel
    spacing and a tilted orientation (warn; refused with --strict); PID-6633 a volunteer
    scan whose series description the training cohort never used (warn).
    """
    t1 = _oai_visits(cohort)[0]
    root = tmp_path / "export"
    ds = pydicom.dcmread(next(t1.iterdir()))
    _altered_copy(t1, root / "DOE^JANE_1954", PatientID="PID-4411")
    _altered_copy(t1, root / "ROE_RICHARD" / "MRN778812", PatientID="PID-5522",
                  PixelSpacing=[2 * float(v) for v in ds.PixelSpacing],
                  ImageOrientationPatient=[1, 0, 0, 0, 0.98, -0.199])
    volunteer = sorted((cohort / "volunteers" / "dicom").iterdir())[0]
    _altered_copy(volunteer, root / "MRN778812-b", PatientID="PID-6633")
    for i, path in enumerate(sorted(p for p in root.rglob("*.dcm"))):
        path.rename(path.with_name(f"MRN778812_{i:03d}.dcm"))
    labels = tmp_path / "labels.csv"
    labels.write_text("code,exercise,sex\nPID-4411,yes,F\nPID-5522,no,F\nPID-6633,yes,M\n")
    return root


def _run(args, capsys, monkeypatch, logged) -> tuple[int, str]:
    from study.predict import main

    monkeypatch.setenv("THIGHMRI_SALT", SALT)
    rc = main([*args, "--model", "models:/thigh-test@champion", "--tracking-uri", logged["uri"]])
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_verdicts_pseudonyms_private_csv_and_no_names(site, logged, capsys, monkeypatch, tmp_path):
    from data_prep.pseudonyms import pseudonym

    out = tmp_path / "pred.csv"
    rc, text = _run(["--dicom", str(site), "--labels", str(tmp_path / "labels.csv"), "--out", str(out)],
                    capsys, monkeypatch, logged)
    assert rc == 0, text
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    csv = out.read_text()
    df = pd.read_csv(out).set_index("participant")
    ids = {k: pseudonym(SALT.encode(), "volunteers", k) for k in ("PID-4411", "PID-5522", "PID-6633")}
    assert set(df.index) == set(ids.values())
    verdicts = {k: df.loc[v, "verdict"] for k, v in ids.items()}
    assert verdicts == {"PID-4411": "accept", "PID-5522": "warn", "PID-6633": "warn"}, df.to_string()
    assert "pixel spacing" in df.loc[ids["PID-5522"], "reasons"] and "orientation" in df.loc[ids["PID-5522"], "reasons"]
    assert df["predicted"].isin(["high", "low"]).all() and df["p_high"].between(0, 1).all()
    assert list(df.columns[:5]) == ["p_high", "predicted", "verdict", "reasons", "n_slices"]
    assert "baseline: the training majority class 'low' (60% of 10" in text
    assert "training-majority baseline 0.33" in text  # 1 of 3 expected "low" = the majority
    for planted in (*PLANTED, str(site), str(tmp_path)):
        assert planted not in text and planted not in csv, planted


def test_strict_refuses_warnings_and_show_ids(site, logged, capsys, monkeypatch, tmp_path):
    out = tmp_path / "strict.csv"
    out.write_text("old\n")
    out.chmod(0o644)  # an existing file is narrowed too
    rc, text = _run(["--dicom", str(site), "--strict", "--show-ids", "--out", str(out)],
                    capsys, monkeypatch, logged)
    assert rc == 1, text  # a refusal is not a clean run
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    df = pd.read_csv(out, keep_default_na=False).set_index("participant")
    assert dict(df["verdict"]) == {"PID-4411": "accept", "PID-5522": "refuse", "PID-6633": "refuse"}
    assert (df.loc[["PID-5522", "PID-6633"], "predicted"] == "").all()
    assert "verdicts: accept 1, warn 0, refuse 2 (--strict: warnings refuse)" in text


def test_stratum_from_labels_and_errors_name_no_path(site, logged, capsys, monkeypatch, tmp_path):
    """A female-only model refuses the participant the labels call male; bad arguments say
    what is wrong without echoing the path."""
    import mlflow
    from study.model import build_model
    from study.model_package import log_pyfunc

    from pyfunc_helpers import _config

    mlflow.set_tracking_uri(logged["uri"])
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("pyfunc-test").experiment_id):
        info = log_pyfunc(build_model(weights="none").eval(),
                          _config(stratum={"sex": "female", "bmi": None, "bmi_label": "all"}))
    version = mlflow.register_model(info.model_uri, "thigh-female")
    mlflow.MlflowClient(logged["uri"]).set_registered_model_alias("thigh-female", "champion", version.version)
    from study.predict import main

    monkeypatch.setenv("THIGHMRI_SALT", SALT)
    out = tmp_path / "female.csv"
    rc = main(["--dicom", str(site), "--labels", str(tmp_path / "labels.csv"), "--show-ids", "--out", str(out),
               "--series-description", "AX_T1_THIGH|t1_se_tra", "--model", "models:/thigh-female@champion",
               "--tracking-uri", logged["uri"]])
    capsys.readouterr()
    df = pd.read_csv(out, keep_default_na=False).set_index("participant")
    assert rc == 1 and df.loc["PID-6633", "verdict"] == "refuse", df.to_string()
    assert "sex outside the model's stratum" in df.loc["PID-6633", "reasons"]
    assert df.loc["PID-4411", "verdict"] == "accept"
    rc, text = _run(["--dicom", str(tmp_path / "DOE^JANE-nothere")], capsys, monkeypatch, logged)
    assert rc == 2 and "--dicom is not a directory" in text and "DOE" not in text
    monkeypatch.delenv("THIGHMRI_SALT")
    from study.predict import main as predict_main

    rc = predict_main(["--dicom", str(site), "--tracking-uri", logged["uri"]])
    assert rc == 2 and "THIGHMRI_SALT" in capsys.readouterr().err  # no salt: no pseudonyms, no run
