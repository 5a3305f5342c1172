"""A launch survives being killed: real launch processes, a real local Ray, a real MLflow server.

- SIGKILL of the driver with one cell finished and trials in flight, then --resume;
- a trial's worker killed mid-trial (retried from its checkpoint, same MLflow run), then
  SIGTERM to the driver (runs KILLED, the resume command printed), then --resume.
Both end with every cell's exact number of trial runs, each with each epoch logged once.
"""

from __future__ import annotations

import os
import signal
import time

import pandas as pd
import pytest
from launch_helpers import Launch, wait_for, write_grid

pytestmark = pytest.mark.slow


def launch_args(grid, url, storage, *extra):
    return ["--grid", str(grid), "--tracking-uri", url, "--num-cpus", "2", "--storage-path", str(storage), *extra]


def runs_of(client, exp_id, where=""):
    return client.search_runs([exp_id], where, max_results=500)


def epochs(client, run_id) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "val_acc"))


def lopsided_seed(grid_path, trials: int) -> int:
    """A split seed whose Optuna draws give the somma cell only 1-epoch trials and the oai cell
    at least two long ones: somma then finishes (trials, evaluation and model logging, ~25 s
    on a busy 2-core machine) while oai still trains (so the kill finds both).

    Random start-up draws depend only on the sampler seed (study.search.cell_seed), so this
    asks Optuna exactly as the cell's OptunaSearch will."""
    import optuna

    from study.config import load_grid
    from study.search import cell_seed, optuna_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = optuna_space(load_grid(grid_path).search)  # in the file's order: the draws depend on it

    def draws(cell: str, seed: int) -> list[int]:
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(
            seed=cell_seed(cell, seed), n_startup_trials=trials))
        return [study.ask(fixed_distributions=space).params["epochs"] for _ in range(trials)]

    long = max(space["epochs"].choices)
    for seed in range(500):
        if max(draws("somma__leg_strength__sex-all__bmi-all", seed)) == 1 and \
                sum(draws("oai__leg_strength__sex-all__bmi-all", seed)) >= long * (trials - 1):
            return seed
    pytest.fail("no split seed gives lopsided draws; widen the search")


def check_complete(client, exp_id, n_cells: int, trials: int, n_epochs: int | None = None) -> list:
    """Every run finished; each cell has exactly `trials` trial runs, each epoch logged once."""
    runs = runs_of(client, exp_id)
    assert {r.info.status for r in runs} == {"FINISHED"}, [(r.info.run_name, r.info.status) for r in runs]
    cells = [r for r in runs if r.data.tags.get("run_type") == "cell"]
    assert len(cells) == n_cells
    trial_runs = [r for r in runs if r.data.tags.get("run_type") == "trial"]
    for cell in cells:
        mine = [t for t in trial_runs if t.data.tags["mlflow.parentRunId"] == cell.info.run_id]
        assert len(mine) == trials, cell.info.run_name
        for t in mine:  # no epoch trained-and-logged twice, none missing
            n = n_epochs or int(t.data.params["epochs"])
            assert epochs(client, t.info.run_id) == list(range(1, n + 1)), t.info.run_name
            assert len(client.get_metric_history(t.info.run_id, "val_acc")) == n
    return trial_runs


def test_sigkill_mid_study_then_resume_keeps_finished_cells(two_cohort_store, mlflow_server, short_tmp, tmp_path):
    from mlflow.tracking import MlflowClient

    url = mlflow_server.url
    spec = dict(search={"lr": {"loguniform": [1e-3, 1e-2]}, "epochs": {"choice": [1, 16]}}, trials_per_cell=3,
                optuna_startup_trials=3, grid={"cohort": ["oai", "somma"], "measure": ["leg_strength"]})
    grid = write_grid(tmp_path / "resume_kill.yaml", two_cohort_store, **spec)
    grid = write_grid(grid, two_cohort_store, **spec, split={"seed": lopsided_seed(grid, trials=3)})
    storage = short_tmp / "kill"
    first = Launch(launch_args(grid, url, storage), tmp_path / "first.log")
    client = MlflowClient(url)
    exp_id = wait_for(lambda: getattr(client.get_experiment_by_name("resume_kill"), "experiment_id", None),
                      what="the experiment")

    def one_cell_done_and_a_trial_in_flight():
        cells = runs_of(client, exp_id, "tags.run_type = 'cell'")
        done = [c for c in cells if c.info.status == "FINISHED"]
        if len(done) != 1 or len(cells) != 2:
            return None
        other = next(c for c in cells if c is not done[0])
        flying = [t for t in runs_of(client, exp_id, f"tags.`mlflow.parentRunId` = '{other.info.run_id}' "
                                                     "and attributes.status = 'RUNNING'")
                  if len(epochs(client, t.info.run_id)) >= 1]
        return (done[0], flying[0]) if flying else None

    def both_cells_done():
        cells = runs_of(client, exp_id, "tags.run_type = 'cell'")
        return len(cells) == 2 and all(c.info.status == "FINISHED" for c in cells)

    finished, in_flight = wait_for(one_cell_done_and_a_trial_in_flight, what="one finished cell + a trial in flight",
                                   too_late=both_cells_done, log=first.log)
    first.kill_all()
    assert first.proc.returncode == -signal.SIGKILL
    (launch,) = runs_of(client, exp_id, "tags.run_type = 'launch'")
    assert launch.info.status == "RUNNING"  # the dead driver could not say otherwise

    plain = Launch(launch_args(grid, url, storage), tmp_path / "plain.log")
    assert plain.wait() == 2
    assert "is unfinished. Continue it with" in plain.output() and "--resume" in plain.output()

    results = tmp_path / "cells.csv"
    resumed = Launch(launch_args(grid, url, storage, "--resume", "--results", str(results)), tmp_path / "resumed.log")
    assert resumed.wait() == 0, resumed.output()[-3000:]

    trial_runs = check_complete(client, exp_id, n_cells=2, trials=3)
    assert len(runs_of(client, exp_id, "tags.run_type = 'launch'")) == 1  # the same launch, not a new one
    again = client.get_run(finished.info.run_id)
    # kept as it was, not recomputed; only the launch-wide numbers (multiplicity over every
    # cell of the launch) are added once the launch has all its cells
    launch_wide = {k: v for k, v in again.data.metrics.items() if k not in finished.data.metrics}
    assert {k: again.data.metrics[k] for k in finished.data.metrics} == finished.data.metrics
    assert set(launch_wide) == {"test_vs_baseline_p_holm", "test_vs_baseline_p_bh", "multiplicity_family_size"}
    assert launch_wide["multiplicity_family_size"] == 2
    assert again.data.tags.get("resumed") is None
    continued = client.get_run(in_flight.info.run_id)
    assert continued.data.tags["attempt"] == "2"  # the in-flight trial went on in its own run
    assert sum(t.data.tags.get("attempt") == "2" for t in trial_runs) >= 1
    table = pd.read_csv(results).set_index("cell")
    assert (table["status"] == "ok").all()
    assert table.loc[finished.data.tags["cell"], "test_acc"] == pytest.approx(finished.data.metrics["test_acc"])
    assert "launch resumed:" in resumed.output()


def test_killed_worker_retries_from_checkpoint_then_sigterm_and_resume(two_cohort_store, mlflow_server,
                                                                        short_tmp, tmp_path):
    from mlflow.tracking import MlflowClient

    url = mlflow_server.url
    grid = write_grid(tmp_path / "resume_term.yaml", two_cohort_store, train={"epochs": 5})
    storage = short_tmp / "term"
    first = Launch(launch_args(grid, url, storage), tmp_path / "first.log")
    client = MlflowClient(url)
    exp_id = wait_for(lambda: getattr(client.get_experiment_by_name("resume_term"), "experiment_id", None),
                      what="the experiment")

    def trial_with(n: int, exclude=()):
        for t in runs_of(client, exp_id, "tags.run_type = 'trial' and attributes.status = 'RUNNING'"):
            if t.info.run_id not in exclude and len(epochs(client, t.info.run_id)) >= n:
                return t
        return None

    victim = wait_for(lambda: trial_with(2), what="a trial with 2 epochs")
    os.kill(int(victim.data.tags["worker_pid"]), signal.SIGKILL)  # the trial's worker dies mid-trial
    killed_at = time.time()

    def retried():
        run = client.get_run(victim.info.run_id)
        logged_since = [m for m in client.get_metric_history(victim.info.run_id, "val_acc")
                        if m.timestamp / 1000 > killed_at]
        return run if run.data.tags.get("attempt") == "2" and logged_since else None

    run = wait_for(retried, what="the retried trial's next epoch")
    start = int(run.data.tags["resumed_from_epoch"])
    assert start >= 1  # it restarted from a checkpoint, not from scratch
    history = {m.step: m.timestamp / 1000 for m in client.get_metric_history(victim.info.run_id, "val_acc")}
    assert len(history) == len(client.get_metric_history(victim.info.run_id, "val_acc"))  # no step twice
    before = sorted(e for e, t in history.items() if t < killed_at)
    assert before == list(range(1, len(before) + 1))  # kept from before the kill
    # the checkpoint is the last logged epoch, or one behind when the kill fell between logging an
    # epoch and checkpointing it (that epoch is trained again but not logged twice)
    assert len(before) - 1 <= start <= len(before)
    after = [e for e, t in history.items() if t > killed_at]
    assert after and min(after) == len(before) + 1  # the retry carried on where the log stopped
    assert len(runs_of(client, exp_id, "tags.run_type = 'trial'")) <= 2  # a retry is not a new run

    wait_for(lambda: trial_with(1, exclude={victim.info.run_id}) or None, what="the second trial in flight")
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait(timeout=180) == 128 + signal.SIGTERM
    out = first.output()
    assert "SIGTERM received" in out and "Resume with:" in out and "--resume" in out
    runs = runs_of(client, exp_id)
    assert "RUNNING" not in {r.info.status for r in runs}
    (launch,) = [r for r in runs if r.data.tags.get("run_type") == "launch"]
    assert launch.info.status == "KILLED"
    assert "cells.csv" in {a.path for a in client.list_artifacts(launch.info.run_id)}

    resumed = Launch(launch_args(grid, url, storage, "--resume"), tmp_path / "resumed.log")
    assert resumed.wait() == 0, resumed.output()[-3000:]
    check_complete(client, exp_id, n_cells=1, trials=2, n_epochs=5)
