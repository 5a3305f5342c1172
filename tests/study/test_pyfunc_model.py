"""The registered model as a pyfunc from code (study/pyfunc_model.py, study/model_package.py).

Its own copies of the DICOM reading, recipe and input conversion equal data_prep's and
study's bit for bit; logged and loaded back it predicts a DICOM folder or a preprocessed
stack, flags another protocol (refused with strict) and a participant outside its stratum;
and (slow) it loads and predicts in a fresh venv holding only its logged requirements.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch

from pyfunc_helpers import _altered_copy, _oai_visits, cohort, logged  # noqa: F401 (fixtures)


@pytest.mark.parametrize("size", [(32, 64), (48, 80)])  # block mean (v2) and Gaussian + zoom
def test_copies_equal_data_prep_and_study(cohort, size):
    import study.pyfunc_model as pf
    from data_prep.dicom import read_thigh_volume
    from data_prep.dicom.acquisition import read_acquisition
    from data_prep.preprocess import Recipe, apply_recipe
    from study.data import central_slices, to_model_input
    from study.model import build_model

    recipe = Recipe(size=size)
    for visit in _oai_visits(cohort):
        volume, geometry, selection = read_thigh_volume(visit, ["^AX_T1_THIGH$"])
        expected, _ = apply_recipe(volume, recipe)
        ours, acq, header, warnings = pf.read_series(visit, ["^AX_T1_THIGH$"])
        assert not warnings and header["sex"] in ("male", "female") and header["bmi"] > 10
        np.testing.assert_array_equal(ours, volume)
        got = pf.apply_recipe(ours, recipe.to_dict())
        np.testing.assert_array_equal(got, expected)
        assert acq == read_acquisition(selection.series, geometry)
        keep = central_slices(len(expected), 3)
        torch.testing.assert_close(pf.model_input(got, 3, [16, 32]), to_model_input(expected[keep], (16, 32)),
                                   rtol=0, atol=0)
    net = build_model(weights="none").eval()
    copy = pf.ThighNet()
    copy.load_state_dict(net.state_dict(), strict=True)
    x = torch.rand(2, 1, 32, 64)
    with torch.no_grad():
        torch.testing.assert_close(copy.eval()(x), net(x), rtol=0, atol=0)


def test_logged_model_is_code_weights_and_pinned_requirements(logged):
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(logged["model_uri"]))
    mlmodel = mlflow.models.Model.load(local)
    flavor = mlmodel.flavors["python_function"]
    assert flavor.get("model_code_path"), flavor  # models-from-code, not a pickled object
    assert not list(local.rglob("*.pkl")) and not (local / "python_model.pkl").exists()
    state = torch.load(local / "artifacts" / "weights.pt", weights_only=True)
    assert "backbone.fc.weight" in state
    requirements = (local / "requirements.txt").read_text().split()
    names = {r.split("==")[0] for r in requirements if "==" in r}
    assert {"mlflow", "torch", "torchvision", "numpy", "pydicom"} <= names
    assert all("==" in r for r in requirements if not r.startswith("-"))
    assert mlmodel.signature.inputs.input_names() == ["path", "sex", "bmi"]
    assert mlmodel.saved_input_example_info is not None
    code = next(local.rglob("pyfunc_model.py")).read_text()  # the code MLflow stored with it
    imported = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "json", "math", "re", "pathlib", "typing", "mlflow", "numpy", "pandas",
                        "torch", "torchvision", "scipy", "pydicom"}, imported


def test_predicts_folder_and_stack_flags_protocol_and_stratum(logged, cohort, tmp_path):
    import study.pyfunc_model as pf
    from data_prep.dicom import read_thigh_volume
    from data_prep.preprocess import Recipe, apply_recipe

    model = logged["model"]
    visit = t1 = _oai_visits(cohort)[0]
    volunteer = sorted((cohort / "volunteers" / "dicom").iterdir())[0]  # T1 + localizer, other name
    ds = pydicom.dcmread(next(t1.iterdir()))
    other = _altered_copy(t1, tmp_path / "DOE^JANE-1954",
                          PixelSpacing=[2 * float(v) for v in ds.PixelSpacing],
                          ImageOrientationPatient=[1, 0, 0, 0, 0.98, -0.199])
    volume, _, _ = read_thigh_volume(visit, ["^AX_T1_THIGH$"])
    stack = tmp_path / "SMITH-MRN-778812.npy"
    np.save(stack, apply_recipe(volume, Recipe(size=(32, 64)))[0])
    frame = pd.DataFrame({"path": [str(visit), str(other), str(stack), str(tmp_path / "missing"),
                                   str(volunteer)]})
    out = model.predict(frame)
    assert list(out["verdict"]) == ["accept", "warn", "warn", "refuse", "warn"], out.to_string()
    assert out.loc[4, "reasons"].startswith("series description matches none")
    assert out.loc[0, "predicted"] in ("low", "high") and 0 <= out.loc[0, "p_high"] <= 1
    assert out.loc[2, "p_high"] == pytest.approx(out.loc[0, "p_high"], abs=1e-6)  # same slices
    assert "pixel spacing (rows, mm)" in out.loc[1, "reasons"] and "orientation" in out.loc[1, "reasons"]
    assert out.loc[3, "predicted"] == "" and np.isnan(out.loc[3, "p_high"])
    strict = model.predict(frame, params={"strict": True})
    assert list(strict["verdict"]) == ["accept", "refuse", "refuse", "refuse", "refuse"]
    for text in out["reasons"]:  # no folder or file name in any reason
        assert not any(name in text for name in ("DOE", "SMITH", "778812", "pytest", visit.name)), text
    # the stratum: a male-only model refuses a female participant (sex from the input or header)
    male_only = pf.check_stratum("female", 22.0, {"sex": "male", "bmi": [None, 25.0], "bmi_label": "<25"})
    assert male_only[0] and not male_only[1]
    refusals, warnings = pf.check_stratum(None, 31.0, {"sex": "female", "bmi": [None, 25.0], "bmi_label": "<25"})
    assert any("BMI outside" in r for r in refusals) and any("sex unknown" in w for w in warnings)
    sexed = model.predict(pd.DataFrame({"path": [str(visit)], "sex": ["F"], "bmi": [21.0]}))
    assert sexed.loc[0, "verdict"] == "accept"


@pytest.fixture()
def venv(tmp_path):
    """A fresh venv's folder, removed afterwards (about 6 GB with torch's CUDA wheels)."""
    import shutil

    folder = tmp_path / "venv"
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_loads_and_predicts_in_a_fresh_venv_without_this_repo(logged, cohort, tmp_path, venv):
    """python -m venv + pip install -r the logged requirements.txt, then `mlflow models predict`
    and mlflow.pyfunc.load_model("models:/thigh-test@champion") from a folder outside the repo."""
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(logged["model_uri"], dst_path=str(tmp_path / "model")))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=logged["uri"])
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-compile", "-r", str(local / "requirements.txt")],
                   check=True, env=env, cwd=tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    python = str(venv / "bin" / "python")
    probe = subprocess.run([python, "-c", "import study"], env=env, cwd=work, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'study'" in probe.stderr  # the repo is not there
    visit = _oai_visits(cohort)[0]
    request = work / "input.json"
    request.write_text(json.dumps({"dataframe_records": [{"path": str(visit)}]}))
    result = work / "out.json"
    subprocess.run([str(venv / "bin" / "mlflow"), "models", "predict", "-m", str(local), "-i", str(request),
                    "-t", "json", "-o", str(result), "--env-manager", "local"], check=True, env=env, cwd=work)
    cli = json.loads(result.read_text())["predictions"][0]
    assert cli["verdict"] == "accept" and cli["predicted"] in ("low", "high") and cli["n_slices"] == 3
    script = ("import mlflow, pandas as pd, sys\n"
              "m = mlflow.pyfunc.load_model('models:/thigh-test@champion')\n"
              "out = m.predict(pd.DataFrame({'path': [sys.argv[1]]}), params={'strict': True})\n"
              "print(out.to_json(orient='records'))\n")
    run = subprocess.run([python, "-c", script, str(visit)], env=env, cwd=work, capture_output=True, text=True,
                         check=True)
    registry = json.loads(run.stdout.strip().splitlines()[-1])[0]
    assert registry["verdict"] == "accept" and registry["p_high"] == pytest.approx(cli["p_high"], abs=1e-6)


def test_missing_slice_is_refused_and_stray_files_are_counted(cohort, tmp_path):
    import shutil

    import study.pyfunc_model as pf

    t1 = _oai_visits(cohort)[0]
    gap = tmp_path / "gap"
    shutil.copytree(t1, gap)
    ordered = sorted(gap.iterdir(), key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    ordered[7].unlink()  # a slice in the middle of the stack
    with pytest.raises(pf.InputRefused, match="uneven slice spacing"):
        pf.read_series(gap, ["^AX_T1_THIGH$"])
    stray = tmp_path / "stray"
    shutil.copytree(t1, stray)
    (stray / "notes.txt").write_text("not an image")
    _, _, _, warnings = pf.read_series(stray, ["^AX_T1_THIGH$"])
    assert warnings == ["1 file(s) that are not readable DICOM were skipped"]
    unrecorded = {"numeric": {}, "categorical": {}, "n_training": 9, "n_recorded": 0}  # an older store
    assert pf.check_acquisition({}, unrecorded) == [
        "the model's training acquisitions were not recorded: protocol not checked"]
