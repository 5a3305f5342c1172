"""Cells that share one Tune run (study/shared_run.py, `shared_tune_run`).

The point of sharing a run is fewer worker processes with nothing else changed: a shared-run launch
must propose the same configurations per cell, train them to the same curves, select the same
ones and give the same test predictions as cells that each run a Tune run of their own, while
its trials run in as many worker processes as the cluster has trial slots, not one per cell.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from launch_helpers import Launch, wait_for, write_grid

from study.config import GridError, parse_grid
from study.config_batches import CELL_KEY, shared_run_cells

BASE = {"question": "q?", "store": "s.zarr", "grid": {"cohort": ["oai", "somma"], "measure": ["leg_strength"]},
        "search": {"lr": {"loguniform": [1e-3, 1e-2]}}, "trials_per_cell": 10, "optuna_startup_trials": 4,
        "train": {"freeze": "fc", "weights": "none"}}


class Cell:  # what shared_run_cells reads of a CellContext / CellPlan
    def __init__(self, train, outer_folds=()):
        self.train, self.outer_folds = train, list(outer_folds)


def test_auto_shares_a_run_only_where_every_cell_batches_and_true_refuses_what_cannot_share_a_run():
    g = parse_grid(BASE)
    assert shared_run_cells(g, [Cell(g.train), Cell(g.train)]) != []
    unbatched = parse_grid({**BASE, "configs_per_trial": 1})
    assert shared_run_cells(unbatched, [Cell(unbatched.train)]) == []  # auto: minutes-long trials keep runs of their own
    forced = parse_grid({**BASE, "configs_per_trial": 1, "shared_tune_run": True})
    assert len(shared_run_cells(forced, [Cell(forced.train), Cell(forced.train)])) == 2
    assert shared_run_cells(parse_grid({**BASE, "shared_tune_run": False}), [Cell(g.train)]) == []
    # a nested-CV cell (small_cells: nested_cv) is one search per outer fold: never shared
    plain, nested = Cell(forced.train), Cell(forced.train, outer_folds=[0, 1])
    assert shared_run_cells(forced, [plain, nested]) == [plain]
    assert shared_run_cells(g, [Cell(g.train), Cell(g.train, [0, 1])]) == []  # auto: not when any cell is nested
    with pytest.raises(GridError, match="shared_tune_run: true needs scheduler none"):
        parse_grid({**BASE, "shared_tune_run": True, "scheduler": "asha"})
    with pytest.raises(GridError, match="shared_tune_run: expected 'auto', true or false, got 'yes'"):
        parse_grid({**BASE, "shared_tune_run": "yes"})


def _searcher(tmp_path: Path, name: str, batches: list[int]):
    from study.config import SearchParam
    from study.search import _pruned_aware_searcher, optuna_space

    space = optuna_space((SearchParam("lr", "loguniform", (1e-3, 1e-1)),))
    return _pruned_aware_searcher(space, seed=len(name), startup=2, max_epochs=0, journal=tmp_path / f"{name}.log",
                                  study_name=name, batches=batches)


def test_the_router_asks_cells_in_order_within_their_limits_and_tells_each_its_own_results(tmp_path):
    """The router alone (no Ray): launch order, a cell's limit and budget, results to the right
    study, a snapshot that restores mid-search, and each cell's asks equal to its own searcher's."""
    import optuna
    from ray.tune.search import Searcher

    from study.shared_run import CellRouter

    def router(folder: Path) -> CellRouter:
        folder.mkdir(exist_ok=True)
        return CellRouter({"a": _searcher(folder, "a", [2, 1]), "b": _searcher(folder, "b", [2, 1])},
                          {"a": 2, "b": 2}, limit=1)

    r = router(tmp_path / "pooled")
    t1, t2 = r.suggest("t1"), r.suggest("t2")
    assert (t1[CELL_KEY], t2[CELL_KEY]) == ("a", "b") and len(t1["configs"]) == 2
    assert r.suggest("t3") is None  # both cells run their one allowed trial: wait
    r.on_trial_complete("t1", result={"config_score_0": 0.1, "config_score_1": 0.2})
    snapshot = tmp_path / "router.pkl"
    r.save(str(snapshot))
    r2 = router(tmp_path / "pooled")
    r2.restore(str(snapshot))
    t3 = r2.suggest("t3")
    assert t3[CELL_KEY] == "a" and len(t3["configs"]) == 1 and t3["optuna_trials"] == [2]
    assert r2.suggest("t4") is None  # a: budget used; b: its trial still runs
    r2.on_trial_complete("t2", result={"config_score_0": 0.3, "config_score_1": 0.4})
    r2.on_trial_complete("t3", result={"config_score_0": 0.5})
    t5 = r2.suggest("t5")
    assert t5[CELL_KEY] == "b"
    assert r2.suggest("t6") == Searcher.FINISHED  # every trial asked; t5 still runs and is told below
    r2.on_trial_complete("t5", error=True)

    def study(folder: Path, name: str):
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(folder / f"{name}.log")))
        return optuna.load_study(study_name=name, storage=storage).trials

    a, b = study(tmp_path / "pooled", "a"), study(tmp_path / "pooled", "b")
    assert [t.value for t in a] == [0.1, 0.2, 0.5]
    assert [t.value for t in b] == [0.3, 0.4, None] and b[2].state.name == "FAIL"
    # a cell's own searcher, asked alone, proposes what the router got for it
    alone = tmp_path / "alone"
    alone.mkdir()
    own = _searcher(alone, "b", [2, 1])
    assert own.suggest("x")["configs"] == t2["configs"]


def _grid(tmp_path: Path, store: Path, name: str, pool) -> Path:
    return write_grid(tmp_path / f"{name}.yaml", store, name=name, trials_per_cell=5, optuna_startup_trials=4,
                      configs_per_trial="auto", shared_tune_run=pool, max_concurrent_per_cell=1, select_on="loss",
                      grid={"cohort": ["oai", "somma"], "measure": ["leg_strength", "chair_stand"]},
                      search={"lr": {"loguniform": [1e-3, 3e-1]}, "momentum": {"uniform": [0.0, 0.95]}},
                      train={"freeze": "fc", "epochs": 6, "optimizer": "sgd", "batch_size": 8})


def _runs(client, name: str):
    exp = client.get_experiment_by_name(name)
    cells = {r.data.tags["cell"]: r for r in client.search_runs([exp.experiment_id], "tags.run_type = 'cell'")}
    trials = client.search_runs([exp.experiment_id], "tags.run_type = 'trial'", max_results=1000)
    return cells, trials


@pytest.mark.slow
def test_cells_sharing_a_tune_run_are_the_cells_searched_alone_in_fewer_workers(two_cohort_store, mlflow_server,
                                                                                short_tmp, tmp_path, capsys):
    import re

    from mlflow.tracking import MlflowClient

    from study.evaluation import load_predictions
    from study.launch import main as launch_main

    url = mlflow_server.url
    for name, pool in (("pooled", "auto"), ("alone", False)):
        assert launch_main(["--grid", str(_grid(tmp_path, two_cohort_store, name, pool)), "--tracking-uri", url,
                            "--num-cpus", "2", "--storage-path", str(short_tmp / name)]) == 0
        if name == "pooled":  # progress lines (not a terminal): each trial counted once, all of them
            counts = [tuple(map(int, m)) for m in re.findall(r"all: (\d+)/(\d+) trials", capsys.readouterr().out)]
            assert counts and counts[-1] == (20, 20) and all(done <= total for done, total in counts), counts
    client = MlflowClient(url)
    cells_p, trials_p = _runs(client, "pooled")
    cells_a, trials_a = _runs(client, "alone")
    assert len(cells_p) == len(cells_a) == 4
    assert len(trials_p) == len(trials_a) == 4 * 5
    (launch_dir,) = (short_tmp / "pooled").iterdir()
    assert (launch_dir / "_shared_tune_run").is_dir()  # one Tune run for the four cells, none of their own
    assert not any((launch_dir / cell / "experiment_state").exists() for cell in cells_p)
    pids_p = {t.data.tags["worker_pid"] for t in trials_p}
    pids_a = {t.data.tags["worker_pid"] for t in trials_a}
    assert len(pids_a) >= 4  # a worker process per cell when each cell is a Tune run of its own
    assert len(pids_p) <= 2  # shared run: one per trial slot (2 CPUs), whatever the number of cells

    def by_config(trials):
        return {(t.data.tags["cell"], t.data.params["lr"], t.data.params["momentum"]): t for t in trials}

    pooled, alone = by_config(trials_p), by_config(trials_a)
    assert set(pooled) == set(alone)  # every cell's Optuna study proposed the same five configurations
    for key, tp in pooled.items():
        ta = alone[key]
        for metric in ("val_loss", "best_val_score"):
            hp = [m.value for m in sorted(client.get_metric_history(tp.info.run_id, metric), key=lambda m: m.step)]
            ha = [m.value for m in sorted(client.get_metric_history(ta.info.run_id, metric), key=lambda m: m.step)]
            assert len(hp) == 6 and hp == pytest.approx(ha, abs=1e-5), (key, metric)
    for cell, cp in cells_p.items():
        ca = cells_a[cell]
        assert cp.info.status == ca.info.status == "FINISHED"
        assert cp.data.params["best.lr"] == ca.data.params["best.lr"], cell
        assert cp.data.metrics["n_trials"] == ca.data.metrics["n_trials"] == 5
        pp, pa = load_predictions(client, cp.info.run_id), load_predictions(client, ca.info.run_id)
        assert (pp["rows"] == pa["rows"]).all() and abs(pp["probs"] - pa["probs"]).max() <= 1e-5, cell


@pytest.mark.slow
def test_a_shared_run_stopped_mid_run_resumes_without_asking_or_training_twice(two_cohort_store, mlflow_server,
                                                                                  short_tmp, tmp_path):
    import optuna
    from mlflow.tracking import MlflowClient

    url, storage = mlflow_server.url, short_tmp / "shared_resume"
    grid = _grid(tmp_path, two_cohort_store, "shared_resume", "auto")
    args = ["--grid", str(grid), "--tracking-uri", url, "--num-cpus", "2", "--storage-path", str(storage)]
    client = MlflowClient(url)
    first = Launch(args, tmp_path / "first.log")
    exp_id = wait_for(lambda: getattr(client.get_experiment_by_name("shared_resume"), "experiment_id", None),
                      what="the experiment")

    def some_trials_done():
        runs = client.search_runs([exp_id], "tags.run_type = 'trial' and attributes.status = 'FINISHED'")
        return len(runs) >= 5 and runs

    wait_for(some_trials_done, what="a finished batch", too_late=lambda: first.proc.poll() is not None,
             log=first.log, every=0.1)
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait(timeout=180) == 128 + signal.SIGTERM, first.output()[-3000:]
    assert "stopping the shared Tune run's trials" in first.output() and "--resume" in first.output()
    assert (storage / next(p.name for p in storage.iterdir()) / "_shared_tune_run").exists()

    resumed = Launch([*args, "--resume"], tmp_path / "resumed.log")
    assert resumed.wait(timeout=900) == 0, resumed.output()[-3000:]
    cells, trials = _runs(client, "shared_resume")
    assert all(c.info.status == "FINISHED" and c.data.metrics["n_trials"] == 5 for c in cells.values())
    finished = [t for t in trials if t.info.status == "FINISHED"]
    # every configuration trained to the end once: 5 per cell, each under its own Optuna trial number
    numbers = sorted((t.data.tags["cell"], int(t.data.tags["optuna_trial"])) for t in finished)
    assert numbers == sorted((c, n) for c in cells for n in range(5))
    for cell, run in cells.items():
        folder = client.download_artifacts(run.info.run_id, "optuna", str(tmp_path / cell))
        (journal,) = Path(folder).glob("*.log")
        storage_j = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
        (study,) = [optuna.load_study(study_name=s.study_name, storage=storage_j) for s in storage_j.get_all_studies()]
        assert [t.state.name for t in study.trials] == ["COMPLETE"] * 5, cell
