"""The launch's control pieces without a cluster: progress lines, resume's settings check,
preflight's resource and reachability rules."""

from __future__ import annotations

import io
import time

import pytest

from study import preflight, progress, resume


def events(cell, trial, iterations, end=None, best=0.6):
    out = [{"kind": "trial_start", "cell": cell, "trial": trial}]
    out += [{"kind": "trial_result", "cell": cell, "trial": trial, "iteration": i, "best": best} for i in iterations]
    if end is not None:
        out.append({"kind": "trial_end", "cell": cell, "trial": trial, "iteration": end, "best": best, "error": False})
    return out


def test_display_prints_a_line_per_event_when_not_a_terminal():
    out = io.StringIO()
    display = progress.Display(["a", "b"], trials=2, epochs=4, stream=out)
    display.start -= 10  # 10 s elapsed
    display.update(events("a", "t1", [1, 2, 3, 4], end=4, best=0.7))
    display.update(events("b", "t2", [1, 2], end=2, best=0.55))  # pruned after 2 of 4 epochs
    display.update([{"kind": "cache", "cell": "a", "entry": "e1", "block": "avgpool", "node": "n1",
                     "done": d, "total": 100, "rate": 10.0} for d in (5, 50, 55, 100)])
    display.cell_finished("a", {"status": "ok", "test_acc": 0.8, "test_acc_ci_low": 0.6,
                                "test_acc_ci_high": 0.9, "test_baseline_acc": 0.5})
    text = out.getvalue()
    assert "a: trial 1/2 done after 4 epoch(s), best validation so far 0.700" in text
    assert "all: 2/4 trials, 0 running, ETA" in text
    assert "feature cache (avgpool, n1): 50/100 slices, ETA 0:00:05" in text
    assert text.count("feature cache") == 3  # the first event, 50% and 100%; 55% is in 50%'s tenth
    assert "cell a finished: accuracy 0.800 [0.60, 0.90] vs baseline 0.500" in text
    totals = display.totals()
    # pruned trial b will never run its last 2 epochs; cell a is done (its 2nd trial never ran)
    assert totals["trials_done"] == 2 and totals["total"] == 4 + 4 + 2


def test_display_is_silent_when_quiet():
    out = io.StringIO()
    display = progress.Display(["a"], trials=1, epochs=2, stream=out, quiet=True)
    display.update(events("a", "t1", [1, 2], end=2))
    display.cell_finished("a", {"status": "failed: boom"})
    assert out.getvalue() == ""


def test_post_without_a_hub_never_raises_nor_starts_ray():
    import ray

    progress.post(None, {"kind": "x"})
    progress.post("no-such-hub-anywhere", {"kind": "x"})
    assert not ray.is_initialized()  # a later launch in this process must be able to start its own


def test_settings_diff_names_each_changed_key():
    a = {"name": "g", "source": "a.yaml", "train": {"epochs": 3, "lr": 0.1}, "trials_per_cell": 4}
    b = {"name": "g", "source": "b.yaml", "train": {"epochs": 2, "lr": 0.1}, "trials_per_cell": 4}
    assert resume.settings_diff(a, b) == ["train.epochs: now 3, the launch had 2"]
    assert resume.settings_diff(a, dict(a, source="elsewhere.yaml")) == []


def test_a_launch_is_alive_only_with_a_recent_heartbeat():
    now = time.time()
    prior = resume.PriorLaunch(run_id="r", name="n", status="RUNNING", start_time=now - 1000,
                               heartbeat=now - 10, driver="otherhost:1", storage_path="s", grid={})
    assert prior.alive(now)
    prior.heartbeat = now - resume.DEAD_AFTER_S - 1
    assert not prior.alive(now)
    prior.heartbeat, prior.status = now, "KILLED"
    assert not prior.alive(now)


def test_a_dead_local_driver_is_not_alive_even_with_a_fresh_heartbeat():
    import socket
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    prior = resume.PriorLaunch(run_id="r", name="n", status="RUNNING", start_time=time.time(),
                               heartbeat=time.time(), driver=f"{socket.gethostname()}:{proc.pid}",
                               storage_path="s", grid={})
    assert not prior.alive()


NODES = [{"NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 2.0}},
         {"NodeManagerAddress": "10.0.0.2", "Resources": {"CPU": 8.0, "GPU": 1.0}}]


@pytest.mark.parametrize("cpu, gpu, nodes, expect", [
    (1, 0, NODES, None),
    (4, 0.25, NODES, None),
    (1, 0.25, NODES[:1], "resources_per_trial.gpu: 0.25 GPU per trial, but the cluster has no GPU"),
    (16, 0, NODES, "resources_per_trial: 16 CPU + 0 GPU per trial fits on no node (10.0.0.1: 2 CPU, 0 GPU; "
                   "10.0.0.2: 8 CPU, 1 GPU)"),
])
def test_resource_problems(cpu, gpu, nodes, expect):
    found = preflight.resource_problems(cpu, gpu, nodes)
    if expect is None:
        assert found == []
    else:
        assert len(found) == 1 and found[0].startswith(expect), found


@pytest.mark.parametrize("uri, loopback", [
    ("http://127.0.0.1:5050", True), ("http://localhost:5000", True), ("file:///tmp/mlruns", True),
    ("/tmp/mlruns", True), ("http://mlflow.lab.example:5000", False), ("https://10.1.2.3", False),
])
def test_loopback_tracking_uris(uri, loopback):
    assert preflight.is_loopback(uri) is loopback


def test_a_resumed_cell_counts_its_earlier_trials():
    out = io.StringIO()
    display = progress.Display(["a"], trials=3, epochs=4, stream=out, done_before={"a": 2})
    display.update(events("a", "t3", [3, 4], end=4))  # restored from its epoch-2 checkpoint
    assert "a: trial 3/3 done after 4 epoch(s)" in out.getvalue()
    totals = display.totals()
    assert totals["trials_done"] == 3 and totals["done"] == 12 and totals["total"] == 12
