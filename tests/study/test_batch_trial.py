"""Several Optuna configurations per Tune trial (study/config_batches.py, study/batch_trial.py).

The point of a batch is speed with nothing else changed: the same launch with K = 4 and K = 1
must propose the same configurations, train each to the same curves, tell Optuna the same
values, select the same configuration and give the same test predictions, while Optuna, MLflow
and the cell's counts still see every configuration as a trial of its own.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from launch_helpers import write_grid

from study.config import GridError, parse_grid
from study.config_batches import batch_reason, batch_sizes, configs_per_trial

BASE = {"question": "q?", "store": "s.zarr", "grid": {"cohort": ["oai"], "measure": ["leg_strength"]},
        "search": {"lr": {"loguniform": [1e-3, 1e-2]}}, "trials_per_cell": 10, "optuna_startup_trials": 4,
        "train": {"freeze": "fc", "weights": "none"}}


def grid_of(**overrides):
    return parse_grid({**BASE, **overrides})


def test_batch_sizes_cover_every_configuration_once():
    assert batch_sizes(10, 4) == [4, 4, 2]
    assert batch_sizes(10, 10) == [10]
    assert batch_sizes(3, 1) == [1, 1, 1]
    assert sum(batch_sizes(37, 6)) == 37


def test_auto_batches_by_the_random_start_up_only_where_a_batch_can_train():
    g = grid_of()
    assert configs_per_trial(g, g.train) == 4
    assert configs_per_trial(grid_of(optuna_startup_trials=20), g.train) == 10  # at most the search
    assert configs_per_trial(grid_of(configs_per_trial=1), g.train) == 1
    cases = {  # each a reason a cell trains one configuration per Tune trial
        "scheduler": grid_of(scheduler="asha"),
        "freeze": grid_of(train={"freeze": "layer4", "weights": "none"}),
        "compiled_head": grid_of(train={"freeze": "fc", "weights": "none", "compiled_head": False}),
        "searched": grid_of(search={"lr": {"loguniform": [1e-3, 1e-2]}, "freeze": {"choice": ["fc", "none"]}}),
        "gpu": grid_of(resources_per_trial={"cpu": 1, "gpu": 0.5}),
    }
    for what, g2 in cases.items():
        assert batch_reason(g2, g2.train) is not None, what
        assert configs_per_trial(g2, g2.train) == 1, what
    # a freeze axis: cells with freeze fc batch, the others do not
    axis = grid_of(grid={"cohort": ["oai"], "measure": ["leg_strength"], "freeze": ["fc", "none"]})
    assert configs_per_trial(axis, dataclasses.replace(axis.train, freeze="none")) == 1


def test_an_explicit_batch_no_cell_can_train_is_refused_with_why():
    with pytest.raises(GridError, match="configs_per_trial: 5 needs cells that can batch; .*searched freeze"):
        grid_of(configs_per_trial=5, search={"freeze": {"choice": ["fc", "none"]}})
    with pytest.raises(GridError, match="configs_per_trial: expected 'auto' or an integer >= 1, got 0"):
        grid_of(configs_per_trial=0)
    assert grid_of(configs_per_trial=5).configs_per_trial == 5


def _launch(store, url, storage, tmp_path, name: str, k: int):
    from mlflow.tracking import MlflowClient

    from study.launch import main as launch_main

    grid = write_grid(tmp_path / f"{name}.yaml", store, name=name, trials_per_cell=5, optuna_startup_trials=5,
                      configs_per_trial=k, max_concurrent_per_cell=2, select_on="loss",
                      search={"lr": {"loguniform": [1e-3, 3e-1]}, "momentum": {"uniform": [0.0, 0.95]}},
                      train={"freeze": "fc", "epochs": 6, "optimizer": "sgd", "batch_size": 8})
    assert launch_main(["--grid", str(grid), "--tracking-uri", url, "--num-cpus", "2", "--quiet",
                        "--storage-path", str(storage / name)]) == 0
    client = MlflowClient(url)
    exp = client.get_experiment_by_name(name)
    (cell,) = client.search_runs([exp.experiment_id], "tags.run_type = 'cell'")
    trials = client.search_runs([exp.experiment_id], "tags.run_type = 'trial'")
    return client, cell, trials


@pytest.mark.slow
def test_a_batched_search_is_the_unbatched_search_trained_faster(two_cohort_store, mlflow_server, short_tmp,
                                                                  tmp_path):
    import optuna

    from study.evaluation import load_predictions

    client, cell_b, trials_b = _launch(two_cohort_store, mlflow_server.url, short_tmp, tmp_path, "batched", 4)
    _, cell_s, trials_s = _launch(two_cohort_store, mlflow_server.url, short_tmp, tmp_path, "single", 1)

    # every configuration is a trial run of its own: 5 = one batch of 4 + one of 1
    assert len(trials_b) == len(trials_s) == 5
    assert sorted(t.data.tags.get("configs_in_trial") for t in trials_b) == ["1", "4", "4", "4", "4"]
    assert len({t.data.tags["tune_trial_id"] for t in trials_b}) == 2
    assert all(t.info.status == "FINISHED" for t in trials_b + trials_s)
    assert all(t.data.tags["trainer"].startswith("compiled head, batched") for t in trials_b
               if t.data.tags["configs_in_trial"] == "4")

    def by_config(trials):
        return {(t.data.params["lr"], t.data.params["momentum"]): t for t in trials}

    batched, single = by_config(trials_b), by_config(trials_s)
    assert set(batched) == set(single)  # Optuna proposed the same five configurations
    for key, tb in batched.items():
        ts = single[key]
        for metric in ("val_loss", "val_acc", "best_val_score", "train_loss"):
            hb = [m.value for m in sorted(client.get_metric_history(tb.info.run_id, metric), key=lambda m: m.step)]
            hs = [m.value for m in sorted(client.get_metric_history(ts.info.run_id, metric), key=lambda m: m.step)]
            assert len(hb) == 6 and hb == pytest.approx(hs, abs=1e-5), (key, metric)

    # Optuna was told each configuration's own value, under its own trial number
    for cell, trials in ((cell_b, trials_b), (cell_s, trials_s)):
        folder = client.download_artifacts(cell.info.run_id, "optuna", str(tmp_path / cell.info.run_id))
        (journal,) = Path(folder).glob("*.log")
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
        (study,) = [optuna.load_study(study_name=s.study_name, storage=storage) for s in storage.get_all_studies()]
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert len(done) == len(study.trials) == 5
        values = {(str(t.params["lr"]), str(t.params["momentum"])): t.value for t in done}
        for t in trials:
            key = (t.data.params["lr"], t.data.params["momentum"])
            assert values[key] == pytest.approx(t.data.metrics["best_val_score"], abs=1e-9), key
        numbers = sorted(int(t.data.tags["optuna_trial"]) for t in trials if "optuna_trial" in t.data.tags)
        assert numbers == ([] if cell is cell_s else [0, 1, 2, 3, 4])

    # the same configuration selected, the same test predictions, counted in configurations
    assert cell_b.data.params["best.lr"] == cell_s.data.params["best.lr"]
    assert cell_b.data.metrics["best_epoch"] == cell_s.data.metrics["best_epoch"]
    assert cell_b.data.metrics["n_trials"] == cell_s.data.metrics["n_trials"] == 5
    pred_b, pred_s = load_predictions(client, cell_b.info.run_id), load_predictions(client, cell_s.info.run_id)
    assert (pred_b["rows"] == pred_s["rows"]).all()
    assert abs(pred_b["probs"] - pred_s["probs"]).max() <= 1e-5


def test_the_searcher_asks_k_configurations_per_tune_trial_and_tells_each_its_own_score(tmp_path):
    """The batch searcher alone (no Ray): batch sizes, Optuna trial numbers, each score told to its
    own Optuna trial, a failed batch failing all of its trials, and a snapshot that restores
    without telling anything twice or asking beyond the search."""
    import optuna
    from ray.tune.search import Searcher

    from study.config import SearchParam
    from study.search import _pruned_aware_searcher, optuna_space

    space = optuna_space((SearchParam("lr", "loguniform", (1e-3, 1e-1)),))
    journal = tmp_path / "j.log"

    def searcher():
        return _pruned_aware_searcher(space, seed=0, startup=4, max_epochs=0, journal=journal, study_name="cell",
                                      batches=[2, 2, 1])

    s = searcher()
    a, b = s.suggest("t1"), s.suggest("t2")
    assert [len(a["configs"]), len(b["configs"])] == [2, 2]
    assert a["optuna_trials"] == [0, 1] and b["optuna_trials"] == [2, 3]
    assert s.suggest("t1") == a  # asked again (a restored trial): the same configurations
    s.on_trial_complete("t1", result={"config_score_0": 0.25, "config_score_1": 0.75, "best_val_score": 0.75})
    s.on_trial_complete("t2", error=True)
    snapshot = tmp_path / "searcher.pkl"
    s.save(str(snapshot))

    restored = searcher()
    restored.restore(str(snapshot))
    restored.on_trial_complete("t1", result={"config_score_0": 9.0, "config_score_1": 9.0})  # told before: ignored
    c = restored.suggest("t3")
    assert len(c["configs"]) == 1 and c["optuna_trials"] == [4]
    assert restored.suggest("t4") == Searcher.FINISHED  # 5 configurations asked: the search is done
    restored.on_trial_complete("t3", result={"config_score_0": 0.5})

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    trials = optuna.load_study(study_name="cell", storage=storage).trials
    states = [t.state.name for t in trials]
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "FAIL", "COMPLETE"]
    assert [t.value for t in trials] == [0.25, 0.75, None, None, 0.5]
    assert a["configs"][1]["lr"] == trials[1].params["lr"]
