"""Scale-out for real: a 2-node Ray cluster (`ray start` processes on this machine), and a
launch whose store and Tune storage live on an S3-compatible server (moto, started here).

Both run `study/launch.py` as a separate process against one real MLflow server and check
the results from MLflow, Ray and the storage itself, not from the launch's own words.
"""

from __future__ import annotations

import pytest
from cluster_helpers import LocalRayCluster, NodeSpec
from launch_helpers import Launch, write_grid

pytestmark = pytest.mark.slow


def _runs(client, name: str, run_type: str) -> list:
    exp = client.get_experiment_by_name(name)
    assert exp is not None, f"no experiment {name!r}"
    return client.search_runs([exp.experiment_id], f"tags.run_type = '{run_type}'", max_results=1000)


def test_trials_run_on_both_nodes_and_each_node_builds_and_reuses_its_feature_cache(
        two_cohort_store, mlflow_server, short_tmp, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    caches = {label: short_tmp / f"features_{label}" for label in ("head", "node2")}
    nodes = [NodeSpec(label, cpus=1, env={"THIGHMRI_FEATURE_CACHE": str(path)}) for label, path in caches.items()]
    # the cache is node-local: each node's own setting, not one path forwarded from the driver
    monkeypatch.delenv("THIGHMRI_FEATURE_CACHE", raising=False)
    # freeze fc: the frozen prefix's features go to the node's cache; 2 trials at once, one per node
    grid = write_grid(tmp_path / "two_nodes.yaml", two_cohort_store, trials_per_cell=4, max_concurrent_per_cell=2,
                      train={"epochs": 2, "freeze": "fc"})
    with LocalRayCluster(short_tmp / "ray", nodes) as cluster:
        node_ids = cluster.node_ids()
        launch = Launch(["--grid", str(grid), "--tracking-uri", mlflow_server.url, "--ray-address", cluster.address,
                         "--storage-path", str(short_tmp / "tune"), "--quiet"], tmp_path / "launch.log",
                        env=cluster.env)
        rc = launch.wait(timeout=900)
        assert rc == 0, launch.output()[-4000:]
    assert set(node_ids) == {"head", "node2"}
    assert not cluster.leftover_pids(), "Ray processes of the test cluster are still running"

    client = MlflowClient(mlflow_server.url)  # the one tracking server every node logged to
    trials = sorted(_runs(client, "two_nodes", "trial"), key=lambda r: r.info.start_time)
    assert len(trials) == 4 and {t.info.status for t in trials} == {"FINISHED"}
    by_node = {label: [t for t in trials if t.data.tags["node_id"] == node_id] for label, node_id in node_ids.items()}
    assert all(by_node.values()), {k: len(v) for k, v in by_node.items()}  # trials on both nodes
    assert sum(map(len, by_node.values())) == 4  # and on no other
    cell = _runs(client, "two_nodes", "cell")
    assert len(cell) == 1 and {t.data.tags["mlflow.parentRunId"] for t in trials} == {cell[0].info.run_id}

    n_slices = None
    for label, runs in by_node.items():
        assert {r.data.tags["feature_cache"] for r in runs} == {"used"}
        first, *later = runs
        m = first.data.metrics
        # the node's first trial computes every slice it needs, even though the other node already
        # has them: nothing is shared between nodes' caches
        assert m["feature_cache_computed"] > 0 and m["feature_cache_cached"] == 0, (label, m)
        n_slices = n_slices or m["feature_cache_computed"]
        assert m["feature_cache_computed"] == n_slices  # same split and slices: the same rows
        for r in later:  # later trials on the node read its cache
            assert r.data.metrics["feature_cache_computed"] == 0, (label, r.data.metrics)
            assert r.data.metrics["feature_cache_cached"] == n_slices
        entries = sorted(p.name for p in caches[label].glob("*.zarr"))
        assert len(entries) == 1, (label, entries)  # one entry per node, the same key on both
    assert {p.name for p in caches["head"].glob("*.zarr")} == {p.name for p in caches["node2"].glob("*.zarr")}
    assert any(len(runs) > 1 for runs in by_node.values())  # some node reused its cache


def test_store_and_tune_storage_on_object_storage(two_cohort_store, mlflow_server, s3_server, store_cache_dir,
                                                  short_tmp, tmp_path, monkeypatch):
    import s3fs
    from mlflow.tracking import MlflowClient

    from data_prep.store import open_store, upload_store

    for key, value in s3_server.env.items():  # credentials from the environment, as on a cluster
        monkeypatch.setenv(key, value)
    bucket = s3_server.make_bucket("thighmri-study")
    url = f"{bucket}/stores/two_cohorts.zarr"
    assert upload_store(two_cohort_store, url, progress=False) == []
    digest = open_store(two_cohort_store).content_hash
    grid = write_grid(tmp_path / "on_s3.yaml", url, train={"epochs": 2})
    args = ["--grid", str(grid), "--tracking-uri", mlflow_server.url, "--num-cpus", "2", "--quiet"]

    # a storage path no node can write: refused by preflight, naming the URL, keeping the secret out
    missing = "s3://no-such-bucket-thighmri/ray"
    refused = Launch([*args, "--storage-path", missing], tmp_path / "refused.log")
    assert refused.wait(timeout=600) == 2, refused.output()[-3000:]
    out = refused.output()
    assert f"storage path {missing} cannot be written from the driver" in out, out[-3000:]
    assert "problem(s) with this cluster (nothing was started)" in out
    assert s3_server.secret_key not in out and s3_server.access_key not in out

    launch = Launch([*args, "--storage-path", f"{bucket}/ray"], tmp_path / "launch.log")
    assert launch.wait(timeout=900) == 0, launch.output()[-4000:]
    assert s3_server.secret_key not in launch.output()

    client = MlflowClient(mlflow_server.url)
    launch_run, = _runs(client, "on_s3", "launch")
    assert launch_run.data.params["store"] == url and launch_run.data.params["store_hash"] == digest
    storage = launch_run.data.params["storage_path"]
    assert storage == f"{bucket}/ray/{launch_run.info.run_id}"
    trials = _runs(client, "on_s3", "trial")
    assert len(trials) == 2 and {t.info.status for t in trials} == {"FINISHED"}
    exp = client.get_experiment_by_name("on_s3")
    for run in client.search_runs([exp.experiment_id], max_results=1000):  # no credential in any run
        values = [*run.data.params.values(), *run.data.tags.values()]
        assert not [v for v in values if s3_server.secret_key in v or s3_server.access_key in v], run.info.run_id

    # Tune's experiment (its state, every trial's checkpoints) is on the object storage
    fs = s3fs.S3FileSystem()
    keys = fs.find(storage.removeprefix("s3://"))
    cell = _runs(client, "on_s3", "cell")[0].data.tags["cell"]
    assert any(k.endswith("tuner.pkl") for k in keys), keys[:20]
    assert any("/checkpoint_" in k for k in keys), keys[:20]
    assert all(f"/{cell}/" in k for k in keys if "/checkpoint_" in k)  # under the cell's experiment
    # trials read the store through this node's cache: whole participant shards under the store's hash
    folder = store_cache_dir / digest.split(":")[-1][:32]
    shards = sorted((folder / "images").glob("c.*"))
    n_subjects = len(open_store(two_cohort_store).subjects)
    assert 0 < len(shards) <= n_subjects, (len(shards), n_subjects)
    assert [p for p in store_cache_dir.iterdir()] == [folder]  # one store version, one folder
