"""The whole path on real components, small sizes: synthetic DICOM → Zarr → Ray Tune + Optuna →
MLflow server → registry → volunteer prediction; and no planted PHI anywhere along it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pydicom
import pytest
import yaml

pytestmark = pytest.mark.slow

GRID = {
    "question": "Does the tiny synthetic cohort run end to end?",
    "name": "e2e",
    # two cells run concurrently: each must train on its own labels and log under its own run
    "grid": {"cohort": ["oai"], "measure": ["leg_strength", "gait_speed_short"]},
    "search": {"lr": {"loguniform": [1.0e-3, 1.0e-2]}, "freeze": {"choice": ["fc", "none"]}},
    "trials_per_cell": 2,
    "optuna_startup_trials": 1,
    "min_subjects_per_cell": 20,
    "min_test_per_class": 1,  # ~11 test subjects: a pipeline check, not a result (default 9 would refuse it)
    "train": {"epochs": 2, "batch_size": 16, "optimizer": "adamw", "weights": "none",
              "slices_per_subject": 3},
    "split": {"val": 0.2, "test": 0.25, "seed": 0},
    "resources_per_trial": {"cpu": 1, "gpu": 0},
}


def _phi_strings(cohort_root: Path) -> set[str]:
    """Identifying values actually planted in the synthetic headers (names, IDs, dates, UIDs)."""
    found: set[str] = set()
    files = sorted(p for sub in ("oai", "somma", "volunteers") for p in (cohort_root / sub / "dicom").rglob("*")
                   if p.is_file())
    for path in files[::7]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for key in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "AccessionNumber",
                    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            value = str(ds.get(key, "")).strip()
            if len(value) >= 6:
                found.add(value)
        name = str(ds.get("PatientName", ""))
        found.update(part for part in name.split("^") if len(part) >= 5)
    return found


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, mlflow_server, short_tmp):
    from data_prep.build_store import main as build_main
    from data_prep.synth import generate_cohort
    from study.launch import main as launch_main

    root = tmp_path_factory.mktemp("e2e")
    cohort = root / "cohort"
    generate_cohort(cohort, subjects=44, seed=3, matrix=(64, 128))
    salt = root / "salt"
    salt.write_text("e2e-test-salt-0123456789abcdef\n")
    store = root / "store.zarr"
    rc = build_main(["--dicom", str(cohort / "oai" / "dicom"), "--tables", str(cohort / "oai" / "tables"),
                     "--cohort", "oai", "--out", str(store), "--size", "32x64", "--salt-file", str(salt)])
    assert rc in (0, None)
    grid_path = root / "e2e.yaml"
    grid_path.write_text(yaml.safe_dump({**GRID, "store": str(store)}))
    results = root / "cells.csv"
    rc = launch_main(["--grid", str(grid_path), "--tracking-uri", mlflow_server.url, "--num-cpus", "2",
                      "--storage-path", str(short_tmp / "ray"), "--results", str(results)])
    assert rc == 0
    return {"cohort": cohort, "store": store, "results": results, "url": mlflow_server.url, "root": root}


def test_runs_are_nested_launch_cell_trial(pipeline):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(pipeline["url"])
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    by_type = {t: [r for r in runs if r.data.tags.get("run_type") == t] for t in ("launch", "cell", "trial")}
    assert len(by_type["launch"]) == 1 and len(by_type["cell"]) == 2 and len(by_type["trial"]) == 4
    launch = by_type["launch"][0]
    assert {r.info.status for r in runs} == {"FINISHED"}
    for cell in by_type["cell"]:
        assert cell.data.tags["mlflow.parentRunId"] == launch.info.run_id
        trials = [t for t in by_type["trial"] if t.data.tags["mlflow.parentRunId"] == cell.info.run_id]
        assert len(trials) == 2, cell.info.run_name  # no cell's trials land under another cell
        assert {t.data.params["axis.measure"] for t in trials} == {cell.data.params["measure"]}
    cell = next(c for c in by_type["cell"] if c.data.params["measure"] == "leg_strength")
    assert cell.data.params["cohort"] == "oai"
    m = cell.data.metrics
    for key in ("n_train", "n_val", "n_test", "best_val_acc", "test_acc", "test_baseline_acc",
                "test_acc_ci_low", "test_acc_ci_high", "size_age_test_acc", "cnn_minus_size_age_acc",
                "test_vs_baseline_p", "test_vs_baseline_p_holm", "test_vs_baseline_p_bh"):
        assert key in m, key
    # Holm over the launch's two cells: never below the raw p, at most twice it
    assert m["test_vs_baseline_p"] <= m["test_vs_baseline_p_holm"] <= min(1.0, 2 * m["test_vs_baseline_p"]) + 1e-12
    assert cell.data.tags["multiplicity_family"] == "launch" and m["multiplicity_family_size"] == 2
    assert m["test_acc_ci_low"] <= m["test_acc"] <= m["test_acc_ci_high"]
    assert 0.0 <= m["test_baseline_acc"] <= 1.0  # train majority applied to test: may be < 0.5
    assert m["n_train"] + m["n_val"] + m["n_test"] == m["n"]
    # every trial reported one validation accuracy per epoch
    for t in by_type["trial"]:
        assert len(client.get_metric_history(t.info.run_id, "val_acc")) == GRID["train"]["epochs"]
    artifacts = {a.path for a in client.list_artifacts(launch.info.run_id)}
    assert {"cells.csv", "accuracy_vs_baseline.png", "resolved_grid.json", "measure_differences.csv"} <= artifacts
    table = pd.read_csv(pipeline["results"]).set_index("measure")
    assert (table["status"] == "ok").all()
    assert table.loc["leg_strength", "test_acc"] == pytest.approx(m["test_acc"])


def test_promote_registers_champion_and_predict_reads_volunteers(pipeline, capsys, monkeypatch):
    import tempfile

    from mlflow.tracking import MlflowClient

    from study.predict import main as predict_main
    from study.promote import main as promote_main

    url = pipeline["url"]
    # step 1: the pooled cell of the launch on this store becomes the candidate, nothing more
    assert promote_main(["--measure", "leg_strength", "--experiment", "e2e", "--store", str(pipeline["store"]),
                         "--tracking-uri", url]) == 0
    client = MlflowClient(url)
    version = client.get_model_version_by_alias("thigh-leg_strength", "candidate")
    assert version.tags["selected_by"] == "best_val_score" and version.tags["cell"] == "oai__leg_strength__sex-all__bmi-all"
    assert "champion" not in client.get_registered_model("thigh-leg_strength").aliases
    # step 2: 44 synthetic subjects rarely beat the baseline on test: forced, and recorded as such
    assert promote_main(["--measure", "leg_strength", "--to", "champion", str(version.version), "--force",
                         "--reason", "end-to-end test", "--tracking-uri", url]) == 0
    champion = client.get_model_version_by_alias("thigh-leg_strength", "champion")
    assert champion.tags["promotion_reason"] == "end-to-end test" and champion.tags["promoted_by"]
    vol = pipeline["cohort"] / "volunteers"
    out = pipeline["root"] / "pred.csv"
    scratch = pipeline["root"] / "predict_tmp"  # the process temp dir, as predict sees it
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    rc = predict_main(["--dicom", str(vol / "dicom"), "--labels", str(vol / "tables" / "volunteers.csv"),
                       "--out", str(out), "--tracking-uri", url, "--salt-file", str(pipeline["root"] / "salt")])
    assert rc == 0
    left = [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")]  # torch's cache
    assert not left, f"predict left its model download behind: {left}"
    pred = pd.read_csv(out)
    assert len(pred) == 8 and pred["p_high"].between(0, 1).all()
    assert set(pred["predicted"]) <= {"high", "low"} and pred["exercise"].notna().all()
    # another site's series name: predicted, with a warning that says so
    assert (pred["verdict"] == "warn").all() and pred["reasons"].str.contains("series description").all()
    assert (out.stat().st_mode & 0o777) == 0o600
    assert "agreement with self-reported exercise" in capsys.readouterr().out


def test_no_planted_phi_reaches_store_or_mlflow(pipeline, mlflow_server):
    phi = _phi_strings(pipeline["cohort"])
    assert len(phi) > 20  # the generator really planted identifying values
    haystacks = [p for p in Path(pipeline["store"]).rglob("*") if p.is_file()]
    haystacks += [p for p in Path(mlflow_server.home).rglob("*") if p.is_file() and p.suffix != ".log"]
    assert haystacks
    for path in haystacks:
        data = path.read_bytes()
        for value in phi:
            assert value.encode() not in data, f"PHI {value!r} found in {path}"


def _launch_single_cell(pipeline, short_tmp, name: str, **overrides):
    """Launch a one-cell, one-trial (fc) variant of GRID on the pipeline's store; its experiment's runs."""
    from mlflow.tracking import MlflowClient

    from study.launch import main as launch_main

    grid = {**GRID, "name": name, "store": str(pipeline["store"]), "trials_per_cell": 1,
            "grid": {"cohort": ["oai"], "measure": ["leg_strength"]}, "search": {"freeze": {"choice": ["fc"]}},
            **overrides}
    path = pipeline["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(grid))
    assert launch_main(["--grid", str(path), "--tracking-uri", pipeline["url"], "--num-cpus", "2",
                        "--storage-path", str(short_tmp / f"ray_{name}")]) == 0
    client = MlflowClient(pipeline["url"])
    exp = client.get_experiment_by_name(name)
    (cell,) = client.search_runs([exp.experiment_id], "tags.run_type = 'cell'")
    trials = client.search_runs([exp.experiment_id], "tags.run_type = 'trial'")
    return client, cell, trials


def test_strata_are_scored_against_the_pooled_model_on_their_own_test_subjects(pipeline, short_tmp):
    from mlflow.tracking import MlflowClient

    from study.launch import main as launch_main

    grid = {**GRID, "name": "e2e_strata", "store": str(pipeline["store"]), "trials_per_cell": 1,
            "grid": {"cohort": ["oai"], "measure": ["leg_strength"], "sex": ["all", "female"]},
            "search": {"freeze": {"choice": ["fc"]}}, "train": {**GRID["train"], "epochs": 1}}
    path = pipeline["root"] / "e2e_strata.yaml"
    path.write_text(yaml.safe_dump(grid))
    assert launch_main(["--grid", str(path), "--tracking-uri", pipeline["url"], "--num-cpus", "2",
                        "--storage-path", str(short_tmp / "ray_strata")]) == 0
    client = MlflowClient(pipeline["url"])
    exp = client.get_experiment_by_name("e2e_strata")
    cells = {c.data.params["sex"]: c for c in client.search_runs([exp.experiment_id], "tags.run_type = 'cell'")}
    female, pooled = cells["female"].data.metrics, cells["all"].data.metrics
    # one split per cohort: the stratum's test subjects are the pooled cell's female test subjects
    assert 0 < female["n_test"] < pooled["n_test"] and female["pooled_n_test"] == female["n_test"]
    assert female["pooled_n_label_differs"] == 0  # threshold: cohort is one number for both cells
    assert cells["female"].data.params["threshold"] == cells["all"].data.params["threshold"]
    assert female["stratum_minus_pooled_acc"] == pytest.approx(female["test_acc"] - female["pooled_test_acc"])
    assert "stratum_minus_pooled_acc_ci_low" in female and "stratum_minus_pooled_auroc_p" in female
    assert not any(k.startswith("stratum_minus_pooled") for k in pooled)


def test_compiled_head_trials_match_the_torch_loop(pipeline, short_tmp):
    """freeze=fc trials on cached features train in study/head_trainer.py; the same launch on
    engine.fit (train.compiled_head: false) gives the same curves and test predictions."""
    from study.evaluation import load_predictions

    runs = {}
    for name, compiled in (("e2e_compiled", True), ("e2e_torch", False)):
        runs[name] = _launch_single_cell(pipeline, short_tmp, name, train={**GRID["train"], "epochs": 6,
                                                                           "compiled_head": compiled})
    (client, cell_c, (trial_c,)), (_, cell_t, (trial_t,)) = runs["e2e_compiled"], runs["e2e_torch"]
    assert trial_c.data.tags["trainer"].startswith("compiled head")
    assert trial_t.data.tags["trainer"].startswith("torch (engine.fit): off")
    assert trial_c.data.params["lr"] == trial_t.data.params["lr"]  # the same Optuna draw
    for key in ("val_acc", "val_loss", "best_val_score"):
        hist_c = [m.value for m in sorted(client.get_metric_history(trial_c.info.run_id, key), key=lambda m: m.step)]
        hist_t = [m.value for m in sorted(client.get_metric_history(trial_t.info.run_id, key), key=lambda m: m.step)]
        assert len(hist_c) == 6 and hist_c == pytest.approx(hist_t, abs=1e-4), key
    assert cell_c.data.metrics["best_epoch"] == cell_t.data.metrics["best_epoch"]
    pred_c, pred_t = load_predictions(client, cell_c.info.run_id), load_predictions(client, cell_t.info.run_id)
    assert (pred_c["rows"] == pred_t["rows"]).all()
    assert abs(pred_c["probs"] - pred_t["probs"]).max() <= 1e-3  # the tolerance


def test_seed_replication_reports_validation_accuracy_by_name(pipeline, short_tmp):
    _, cell, _ = _launch_single_cell(
        pipeline, short_tmp, "e2e_seed", protocol="seed_replication", threshold_fit="all",
        train={**GRID["train"], "epochs": 1}, split={"val": 0.2, "test": 0, "seed": 0})
    assert cell.data.tags["reported_partition"] == "val"
    assert "val_acc" in cell.data.metrics and "val_baseline_acc" in cell.data.metrics
    assert not any(k.startswith("test_") for k in cell.data.metrics)  # nothing pretends to be a test set
    assert cell.data.metrics["n_test"] == 0


def test_nested_cv_tests_every_subject_once_over_the_outer_folds(pipeline, short_tmp):
    from study.evaluation import load_predictions

    client, cell, trials = _launch_single_cell(
        pipeline, short_tmp, "e2e_cv", protocol="nested_cv",
        train={**GRID["train"], "epochs": 2}, split={"outer_folds": 3, "folds": 2, "seed": 0})
    # one search per outer fold, each selecting on its own inner folds
    assert sorted(t.data.tags["outer_fold"] for t in trials) == ["0", "1", "2"]
    for trial in trials:
        assert len(client.get_metric_history(trial.info.run_id, "fold_best_val_acc")) == 2
        assert len(client.get_metric_history(trial.info.run_id, "cv_val_acc")) == 2
    m = cell.data.metrics
    assert m["n_tested"] == m["n"] and m["n_outer_folds"] == 3
    assert len(client.get_metric_history(cell.info.run_id, "outer_test_acc")) == 3
    pooled = load_predictions(client, cell.info.run_id)
    assert len(pooled["rows"]) == len(set(pooled["rows"].tolist())) == m["n"]  # every subject tested once
    assert m["test_acc"] == pytest.approx(((pooled["probs"] >= 0.5) == pooled["labels"]).mean())
    for key in ("test_vs_baseline_p", "test_acc_ci_low", "size_age_test_acc", "cnn_minus_size_age_acc"):
        assert key in m, key
    assert cell.data.tags["model_outer_fold"] in {"0", "1", "2"}
