"""The study report: Optuna journals, per-cell figures, the launch's HTML report, MLflow source
tags and the store as a dataset input.

Fast tests drive the real pieces directly (Optuna journals, Ray's OptunaSearch subclass, a real
MLflow server); one slow test runs a real short launch and checks everything it leaves.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import optuna
import pytest
from launch_helpers import Launch, write_grid

from study import figures, tracking
from study.search import _pruned_aware_searcher, close_journal, journal_path, journal_storage, optuna_space

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(path, name: str, n: int, params=lambda t: {"lr": t.suggest_float("lr", 1e-4, 1e-2, log=True)}):
    study = optuna.create_study(study_name=name, storage=journal_storage(path), direction="maximize")
    study.optimize(lambda t: sum(v for v in params(t).values() if isinstance(v, float)), n_trials=n)
    return study


def test_study_figures_drawn_or_skipped_with_reason(tmp_path):
    _study(tmp_path / "a.log", "a", 4)
    paths, skipped = figures.study_figures(tmp_path / "a.log", "a", tmp_path)
    assert {p.name for p in paths} == {"optimization_history.png", "slice.png", "param_importances.png"}
    assert skipped == {} and all(p.stat().st_size > 5000 for p in paths)

    _study(tmp_path / "b.log", "b", 1)  # one trial: no importances, said why
    paths, skipped = figures.study_figures(tmp_path / "b.log", "b", tmp_path, "_outer1")
    assert {p.name for p in paths} == {"optimization_history_outer1.png", "slice_outer1.png"}
    assert "at least 2" in skipped["param_importances_outer1"]

    _study(tmp_path / "c.log", "c", 3, params=lambda t: {"freeze": t.suggest_categorical("freeze", ["none"]),
                                                          "score": float(t.number)})
    _, skipped = figures.study_figures(tmp_path / "c.log", "c", tmp_path)
    assert "more than one value" in skipped["param_importances"]
    _study(tmp_path / "d.log", "d", 3, params=lambda t: {"lr": t.suggest_float("lr", 0.1, 0.2), "score": -t.params["lr"]})
    _, skipped = figures.study_figures(tmp_path / "d.log", "d", tmp_path)
    assert "same score" in skipped["param_importances"]


def test_prediction_figures(tmp_path):
    paths, skipped = figures.prediction_figures([0, 1, 1, 0, 1], [0.2, 0.7, 0.4, 0.6, 0.9], tmp_path)
    assert {p.name for p in paths} == {"roc_test.png", "confusion_test.png"} and not skipped
    paths, skipped = figures.prediction_figures([1, 1, 1], [0.2, 0.7, 0.9], tmp_path, "val")
    assert [p.name for p in paths] == ["confusion_val.png"] and "one class" in skipped["roc_val"]


def test_searcher_journal_survives_restore_elsewhere_and_double_tell(tmp_path):
    """The journal is the searcher's storage; Tune's snapshot carries its bytes, so a restore on a
    node without the file gets it back; a trial told after the snapshot is not told twice; trials
    asked and lost with a killed driver are closed as failed."""
    from study.config import SearchParam

    journal = journal_path(str(tmp_path / "ray"), "cell_a")
    assert journal == tmp_path / "ray" / "cell_a" / "optuna_journal.log"
    assert journal_path("s3://bucket/runs/launch1", "cell_a").parts[-2:] == ("cell_a", "optuna_journal.log")
    space = optuna_space((SearchParam("lr", "loguniform", (1e-4, 1e-2)),))
    searcher = _pruned_aware_searcher(space, seed=1, startup=2, max_epochs=0, journal=journal, study_name="cell_a")
    for t in ("t1", "t2", "t3"):
        assert "lr" in searcher.suggest(t)
    searcher.on_trial_complete("t1", {"best_val_score": 0.6, "training_iteration": 3})
    snapshot = tmp_path / "searcher-state.pkl"
    searcher.save(str(snapshot))
    searcher.on_trial_complete("t2", {"best_val_score": 0.7, "training_iteration": 3})  # after the snapshot

    restored = _pruned_aware_searcher(space, seed=1, startup=2, max_epochs=0, journal=journal, study_name="cell_a")
    restored.restore(str(snapshot))
    restored.on_trial_result("t2", {"best_val_score": 0.7, "training_iteration": 3})  # Tune reruns t2: no error
    restored.on_trial_complete("t2", {"best_val_score": 0.7, "training_iteration": 3})
    restored.on_trial_complete("t3", {"best_val_score": 0.5, "training_iteration": 3})
    study = optuna.load_study(study_name="cell_a", storage=journal_storage(journal))
    assert [t.value for t in study.trials] == [0.6, 0.7, 0.5]

    journal.unlink()  # a resume on another node: the file is not there
    elsewhere = _pruned_aware_searcher(space, seed=1, startup=2, max_epochs=0, journal=journal, study_name="cell_a")
    journal.unlink()
    elsewhere.restore(str(snapshot))
    assert "lr" in elsewhere.suggest("t4")  # asked, then the "driver" dies: never told
    study = optuna.load_study(study_name="cell_a", storage=journal_storage(journal))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING", "RUNNING", "RUNNING"]
    assert close_journal(journal, "cell_a") == 3
    study = optuna.load_study(study_name="cell_a", storage=journal_storage(journal))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "FAIL", "FAIL"]
    assert "killed" in study.trials[-1].user_attrs["closed_because"]


def test_runs_carry_source_tags_and_store_input(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE

    client = MlflowClient(mlflow_server.url)
    exp = tracking.get_or_create_experiment(client, "source_tags_test")
    run_id = tracking.create_run(client, exp, name="a cell", run_type="cell")
    content_hash = "sha256:" + "0123456789abcdef" * 4
    tracking.log_store_input(client, run_id, str(tmp_path / "study.zarr"), content_hash)
    run = client.get_run(run_id)
    assert run.data.tags[MLFLOW_SOURCE_NAME] == "study/launch.py"
    assert run.data.tags[MLFLOW_SOURCE_TYPE] == "LOCAL"
    assert re.fullmatch(r"[0-9a-f]{40}", run.data.tags[MLFLOW_GIT_COMMIT])
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.digest == "0123456789abcdef" * 2 and inp.dataset.name == "study.zarr"
    assert str(tmp_path / "study.zarr") in inp.dataset.source
    assert {t.key: t.value for t in inp.tags}["content_hash"] == content_hash


@pytest.mark.slow
def test_launch_leaves_journals_figures_and_a_self_contained_report(two_cohort_store, mlflow_server, short_tmp,
                                                                     tmp_path):
    """A real short launch of two strata (one of them nested CV): every cell's journal loads with
    its trials, its figures are logged, the report embeds every figure and names every cell."""
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME

    trials = 2
    grid = write_grid(tmp_path / "report_launch.yaml", two_cohort_store, trials_per_cell=trials,
                      grid={"cohort": ["oai"], "measure": ["leg_strength"], "sex": ["all", "female"]},
                      small_cells="nested_cv", min_test_per_class=4, split={"outer_folds": 2},
                      train={"epochs": 2})
    reports = tmp_path / "reports"
    launch = Launch(["--grid", str(grid), "--tracking-uri", mlflow_server.url, "--num-cpus", "2", "--quiet",
                     "--storage-path", str(short_tmp / "report"), "--report-dir", str(reports)], tmp_path / "launch.log")
    assert launch.wait() == 0, launch.output()[-3000:]
    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name("report_launch").experiment_id
    runs = client.search_runs([exp], max_results=200)
    (launch_run,) = [r for r in runs if r.data.tags["run_type"] == "launch"]
    cells = [r for r in runs if r.data.tags["run_type"] == "cell"]
    assert len(cells) == 2
    for run in runs:  # launch, cells and trials
        assert run.data.tags[MLFLOW_SOURCE_NAME] == "study/launch.py" and MLFLOW_GIT_COMMIT in run.data.tags
    for run in [launch_run, *cells]:
        (inp,) = run.inputs.dataset_inputs
        assert inp.dataset.digest and {t.key: t.value for t in inp.tags}["content_hash"].split(":")[-1].startswith(inp.dataset.digest)
    nested = 0
    for cell in cells:
        rid = cell.info.run_id
        names = {a.path.split("/")[-1] for a in client.list_artifacts(rid, "figures")}
        journals = [a.path for a in client.list_artifacts(rid, "optuna")]
        folds = [k for k in journals if "__outer" in k]
        nested += bool(folds)
        suffixes = [f"_outer{j}" for j in range(len(folds))] if folds else [""]
        assert len(journals) == (len(folds) or 1)
        assert {"roc_test.png", "confusion_test.png"} <= names
        for s in suffixes:
            assert {f"optimization_history{s}.png", f"slice{s}.png"} <= names
            assert f"param_importances{s}.png" in names or f"figure_skipped.param_importances{s}" in cell.data.tags
        for path in journals:  # each loads back with exactly the search's trials, all complete
            local = client.download_artifacts(rid, path, str(tmp_path / rid))
            name = path.split("/")[-1].removesuffix(".journal.log")
            study = optuna.load_study(study_name=name, storage=journal_storage(Path(local)))
            assert [t.state.name for t in study.trials] == ["COMPLETE"] * trials
    assert nested == 1, "the female stratum is small enough for nested CV"
    report = reports / launch_run.info.run_id / "report.html"
    assert f"report: {report}" in launch.output()
    text = report.read_text()
    assert "report.html" in {a.path for a in client.list_artifacts(launch_run.info.run_id)}
    assert not re.search(r"<(script|link|iframe)\b|src=\"(?!data:)", text), "not self-contained"
    n_figures = sum(len(client.list_artifacts(c.info.run_id, "figures")) for c in cells)
    assert text.count('src="data:image/png;base64,') == n_figures + 2  # + Figure 3 + accuracy plot
    for cell in cells:
        assert cell.info.run_name in text and cell.info.run_id in text
    for needle in ("Holm", "BH", "Figure 3", "size+age", "optuna-dashboard", "store content hash"):
        assert needle in text
    assert "accuracy_by_stratum.png" in {a.path for a in client.list_artifacts(launch_run.info.run_id)}
    subject_ids = __import__("data_prep.store", fromlist=["open_store"]).open_store(two_cohort_store).subjects["subject_id"]
    assert not any(s in text for s in subject_ids), "a subject pseudonym in the report"


def test_strata_plot_keeps_every_stratum_and_a_failed_one(tmp_path):
    """Figure 3 per stratum: a panel per cohort and measure, a group per stratum; a cell without
    a result keeps its place (no bars, its status), NaN baselines draw nothing and do not crash."""
    from study.report import plot_strata, results_table

    ok = dict(measure="leg_strength", bmi="all", status="ok", test_acc=0.7, test_acc_ci_low=0.6, test_acc_ci_high=0.8,
              test_baseline_acc=0.55, size_age_test_acc=float("nan"), test_vs_baseline_p=0.03)
    rows = [dict(ok, cell=f"{c}__{s}", cohort=c, sex=s) for c in ("oai", "somma") for s in ("all", "male")]
    rows.append(dict(cell="oai__female", cohort="oai", measure="leg_strength", sex="female", bmi="all",
                     status="failed: RuntimeError: no trial finished"))
    out = plot_strata(results_table(rows), tmp_path / "strata.png", "Does it work?")
    from PIL import Image

    width, height = Image.open(out).size
    assert height > 500 and width > 600  # two panels, three groups in the wider one
