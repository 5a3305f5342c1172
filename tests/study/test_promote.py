"""study/promote.py: one experiment, launch, cell and store; candidate then champion, recorded.

The tracking data are real MLflow runs shaped as study/launch.py writes them (launch → cell →
trial, the same params, tags and metrics) on a SQLite store, with a real logged pyfunc; the
whole launch → promote → predict path runs in tests/test_end_to_end.py.
"""

from __future__ import annotations

import time

import pytest

from pyfunc_helpers import _config, cohort  # noqa: F401 (fixtures)

STORE = "a" * 64  # the study's store
DEMO = "d" * 64  # the synthetic demo store, same cohort name
POOLED = "oai__leg_strength__sex-all__bmi-all"
STRATUM = "oai__leg_strength__sex-female__bmi-lt25"


def _launch(client, exp, store_hash, cells: dict[str, dict], model_uri: str, trials=None) -> str:
    from study import tracking

    launch = tracking.create_run(client, exp, name=f"study-{time.time_ns()}", run_type="launch")
    tracking.log_params(client, launch, {"store_hash": store_hash})
    for name, metrics in cells.items():
        sex = "female" if "female" in name else "all"
        bmi = "<25" if "lt25" in name else "all"
        run = tracking.create_run(client, exp, name=name, run_type="cell", parent_run_id=launch,
                                  tags={"cell": name, "model_uri": model_uri, "reported_partition": "test"})
        tracking.log_params(client, run, {"cohort": "oai", "measure": "leg_strength", "sex": sex, "bmi": bmi,
                                          "store_hash": store_hash})
        tracking.log_metrics(client, run, metrics)
        for score in (trials or {}).get(name, []):
            trial = tracking.create_run(client, exp, name="trial", run_type="trial", parent_run_id=run)
            tracking.log_metrics(client, trial, {"best_val_score": score})
            client.set_terminated(trial)
        client.set_terminated(run)
    client.set_terminated(launch)
    time.sleep(0.01)  # distinct start times: "latest" is well defined
    return launch


@pytest.fixture()
def tracking_uri(tmp_path, monkeypatch):
    import mlflow

    from study.model import build_model
    from study.model_card import render_card
    from study.model_package import log_pyfunc

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("study", artifact_location=str(tmp_path / "artifacts"))
    good = {"best_val_acc": 0.72, "test_acc": 0.70, "test_baseline_acc": 0.55, "test_perm_p": 0.01}
    with mlflow.start_run(experiment_id=exp):
        model_uri = log_pyfunc(build_model(weights="none").eval(), _config(),
                               card=render_card(_config(), good)).model_uri
    # a tiny stratum predicting a constant: higher validation accuracy, no signal on test
    constant = {"best_val_acc": 0.89, "test_acc": 0.5, "test_baseline_acc": 0.6, "test_perm_p": 1.0}
    launch = _launch(client, exp, STORE, {POOLED: good, STRATUM: constant}, model_uri,
                     trials={POOLED: [0.70, 0.74]})
    _launch(client, exp, DEMO, {POOLED: {**good, "best_val_acc": 0.99}}, model_uri)  # newer, other store
    other = client.create_experiment("another", artifact_location=str(tmp_path / "artifacts"))
    _launch(client, other, STORE, {POOLED: {**good, "best_val_acc": 0.95}}, model_uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "dr-tester")
    yield {"uri": uri, "client": client, "launch": launch}
    mlflow.set_tracking_uri(None)


def _promote(args, uri, capsys) -> tuple[int, str]:
    from study.promote import main

    rc = main([*args, "--tracking-uri", uri])
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_candidate_is_the_named_cell_of_the_latest_launch_on_the_store(tracking_uri, capsys):
    uri, client = tracking_uri["uri"], tracking_uri["client"]
    rc, text = _promote(["--experiment", "study", "--measure", "leg_strength", "--store-hash", STORE], uri, capsys)
    assert rc == 0, text
    mv = client.get_model_version_by_alias("thigh-leg_strength", "candidate")
    assert mv.tags["cell"] == POOLED and mv.tags["store_hash"] == STORE  # not the stratum, not the demo store
    assert mv.tags["launch_run_id"] == tracking_uri["launch"] and mv.tags["experiment"] == "study"
    assert mv.tags["selected_by"] == "best_val_score" and mv.tags["selection_value"] == "0.7400"
    assert mv.tags["candidate_by"] == "dr-tester" and mv.tags["candidate_at"]
    assert "champion" not in client.get_registered_model("thigh-leg_strength").aliases  # a separate step
    assert "--to champion" in text
    card = client.get_model_version("thigh-leg_strength", mv.version).description  # the model card
    assert card.startswith("# Model card: thigh-leg_strength") and "Not a medical device" in card
    assert "| Accuracy | 0.700" in card


def test_a_model_from_another_store_is_never_a_candidate(tracking_uri, capsys):
    uri = tracking_uri["uri"]
    rc, text = _promote(["--experiment", "study", "--measure", "leg_strength", "--store-hash", "b" * 64],
                        uri, capsys)
    assert rc == 2 and "never a candidate" in text
    rc, text = _promote(["--experiment", "study", "--measure", "leg_strength", "--store-hash", STORE,
                         "--launch", tracking_uri["client"].search_runs(
                             [tracking_uri["client"].get_experiment_by_name("study").experiment_id],
                             f"tags.run_type = 'launch' and params.store_hash = '{DEMO}'")[0].info.run_id],
                        uri, capsys)
    assert rc == 2 and "ran on store" in text
    with pytest.raises(Exception):
        tracking_uri["client"].get_registered_model("thigh-leg_strength")


def test_champion_needs_a_reason_and_a_test_that_beats_the_baseline(tracking_uri, capsys):
    uri, client = tracking_uri["uri"], tracking_uri["client"]
    base = ["--experiment", "study", "--measure", "leg_strength", "--store-hash", STORE]
    assert _promote([*base, "--cell", STRATUM], uri, capsys)[0] == 0  # version 1: the constant stratum
    assert _promote(base, uri, capsys)[0] == 0  # version 2: the pooled cell
    rc, text = _promote(["--measure", "leg_strength", "--to", "champion", "1", "--reason", "best val"], uri, capsys)
    assert rc == 2 and "does not beat its baseline" in text and "test_perm_p" in text
    assert "champion" not in client.get_registered_model("thigh-leg_strength").aliases
    rc, text = _promote(["--measure", "leg_strength", "--to", "champion", "2"], uri, capsys)
    assert rc == 2 and "--reason is required" in text
    rc, text = _promote(["--measure", "leg_strength", "--to", "champion", "candidate", "--reason", "replicates"],
                        uri, capsys)
    assert rc == 0, text
    mv = client.get_model_version_by_alias("thigh-leg_strength", "champion")
    assert str(mv.version) == "2" and mv.tags["promoted_by"] == "dr-tester" and mv.tags["promotion_reason"] == "replicates"
    assert mv.tags["promotion_forced"] == "false" and mv.tags["baseline_test"] == "test_perm_p"
    assert mv.tags["promoted_at"] and mv.tags["replaced_champion_version"] == ""
    rc, text = _promote(["--measure", "leg_strength", "--to", "champion", "1", "--reason", "demo only", "--force"],
                        uri, capsys)
    assert rc == 0 and "forced" in text
    mv = client.get_model_version_by_alias("thigh-leg_strength", "champion")
    assert str(mv.version) == "1" and mv.tags["promotion_forced"] == "true" and mv.tags["replaced_champion_version"] == "2"


def test_the_cells_own_vs_baseline_test_is_used_when_logged():
    from study.promote import baseline_verdict

    metrics = {"test_acc": 0.7, "test_baseline_acc": 0.55, "test_perm_p": 0.01, "test_vs_baseline_p": 0.2}
    beats, why, used, p = baseline_verdict(metrics, "test", 0.05)
    assert not beats and used == "test_vs_baseline_p" and p == 0.2
    assert baseline_verdict({**metrics, "test_vs_baseline_p": 0.01}, "test", 0.05)[0]
    assert not baseline_verdict(metrics, "val", 0.05)[0]  # seed replication: no test at all
    assert not baseline_verdict({"test_acc": 0.5, "test_baseline_acc": 0.6, "test_perm_p": 1.0}, "test", 0.05)[0]
