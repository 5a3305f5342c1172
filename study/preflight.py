"""Refuse, before any MLflow run or Ray trial exists, what could never run on this cluster.

    problems = check_cluster(grid, store_hash=..., tracking_uri=..., storage_path=...)

Checked against the cluster Ray reports (after ray.init), every problem listed at once with
the value at fault and what the cluster has:
- resources_per_trial that fit no alive node (e.g. a GPU fraction on a cluster without GPUs,
  which would otherwise leave every trial PENDING for ever);
- nodes on other machines and a loopback or file tracking URI, which they cannot reach;
- on every node (a zero-CPU probe task pinned to it): the store opens with the expected
  content hash (a local path, or a URL such as s3://bucket/study.zarr read with the node's
  own credentials), the Tune storage path is the same place the driver sees (a probe file
  or object written here must be visible there; for s3:// through pyarrow, as Tune reads
  it), the tracking server answers, and the ResNet18 weights the grid asks for (imagenet or
  a file) can be loaded.
Messages name the URL and what is wrong; the values of credential variables are redacted
(data_prep.store.redact), so a message can be logged.
Grid-only problems (types, ranges, slices per subject) are refused earlier by study.config and
study.plan.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0")
PROBE_TIMEOUT_S = 120.0


class PreflightError(ValueError):
    """The study cannot run on this cluster; the message lists every problem."""


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def resource_problems(cpu: float, gpu: float, nodes: list[dict[str, Any]]) -> list[str]:
    """A trial needs one node with `cpu` CPUs and `gpu` GPUs; say which resource none has."""
    def fits(n: dict[str, Any]) -> bool:
        res = n.get("Resources", {})
        return res.get("CPU", 0) >= cpu and res.get("GPU", 0) >= gpu

    if any(fits(n) for n in nodes):
        return []
    have = "; ".join(f"{n.get('NodeManagerAddress', '?')}: {n.get('Resources', {}).get('CPU', 0):g} CPU, "
                     f"{n.get('Resources', {}).get('GPU', 0):g} GPU" for n in nodes) or "no alive node"
    if gpu and not any(n.get("Resources", {}).get("GPU", 0) > 0 for n in nodes):
        return [f"resources_per_trial.gpu: {gpu:g} GPU per trial, but the cluster has no GPU ({have}); "
                f"use --set resources_per_trial.gpu=0 on CPUs, or a cluster with GPUs (--num-gpus for a local Ray)"]
    return [f"resources_per_trial: {cpu:g} CPU + {gpu:g} GPU per trial fits on no node ({have}); "
            f"lower resources_per_trial.cpu/gpu"]


def is_loopback(uri: str) -> bool:
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("", "file"):
        return True  # a local path or file: URI is node-local too
    return (parsed.hostname or "") in LOOPBACK_HOSTS


def _probe_exists(probe: str) -> bool:
    """Whether the probe file or object (a path, or a URL Tune's pyarrow filesystem reads) exists."""
    if "://" not in probe:
        return Path(probe).exists()
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(probe)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def write_storage_probe(storage_path: str) -> tuple[str | None, str | None]:
    """(probe file or object written under the storage path, or None; the problem, or None).

    A local path is created and probed with a file; a URL (s3://...) with an object written
    through pyarrow, the filesystem layer Ray Tune itself uses for storage_path."""
    name = f".preflight-{uuid.uuid4().hex}"
    if "://" not in storage_path:
        Path(storage_path).mkdir(parents=True, exist_ok=True)
        probe = str(Path(storage_path).resolve() / name)
        Path(probe).write_text("thighmri preflight\n")
        return probe, None
    from data_prep.store import redact

    probe = f"{storage_path.rstrip('/')}/{name}"
    try:
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(probe)
        with fs.open_output_stream(path) as out:
            out.write(b"thighmri preflight\n")
    except Exception as exc:  # OSError from S3 (no bucket, access denied, endpoint down), ValueError (scheme)
        return None, redact(f"storage path {storage_path} cannot be written from the driver "
                            f"({type(exc).__name__}: {exc}); check the bucket exists and the credentials "
                            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a role) and AWS_ENDPOINT_URL")
    return probe, None


def remove_storage_probe(probe: str | None) -> None:
    if probe is None:
        return
    try:
        if "://" not in probe:
            os.unlink(probe)
        else:
            import pyarrow.fs

            fs, path = pyarrow.fs.FileSystem.from_uri(probe)
            fs.delete_file(path)
    except Exception:  # a leftover probe is a few bytes; never fail the launch for it
        pass


def probe_node(*, store: str, store_hash: str, probe_file: str | None, tracking_uri: str,
               weights: str, need_weights: bool) -> list[str]:
    """Runs on one node: what this node cannot reach of what every trial needs."""
    import socket

    from data_prep.store import redact

    where = socket.gethostname()
    problems = []
    remote = "://" in store
    try:
        from data_prep.store import open_store

        found = open_store(store).content_hash
        if found != store_hash:
            problems.append(f"{where}: store {store!r} has content hash {found}, the driver's has {store_hash} "
                            "(a different copy of the store)")
    except Exception as exc:
        problems.append(redact(f"{where}: store {store!r} cannot be opened ({type(exc).__name__}: {exc}); "
                               + ("every node needs credentials for it in its environment (or a role)" if remote
                                  else "it must be on storage every node mounts at the same path")))
    if probe_file is not None:
        try:
            seen = _probe_exists(probe_file)
            why = "" if seen else "the driver's probe is not there"
        except Exception as exc:
            seen, why = False, f"{type(exc).__name__}: {exc}"
        if not seen and "://" not in probe_file:
            problems.append(f"{where}: the storage path {str(Path(probe_file).parent)!r} is not the driver's folder "
                            "(node-local); pass --storage-path on shared storage (NFS, s3://)")
        elif not seen:
            problems.append(redact(f"{where}: the storage path {probe_file.rsplit('/', 1)[0]} is not readable from "
                                   f"this node ({why}); every node needs credentials for it in its environment "
                                   "(or a role) and the same AWS_ENDPOINT_URL"))
    if urllib.parse.urlparse(tracking_uri).scheme in ("http", "https"):
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"{tracking_uri.rstrip('/')}/health", timeout=10) as response:
                if response.status != 200:
                    problems.append(f"{where}: tracking server {tracking_uri} answered {response.status} on /health")
        except (urllib.error.URLError, OSError) as exc:
            problems.append(f"{where}: tracking server {tracking_uri} is unreachable ({exc})")
    if need_weights:
        try:
            from study.model import build_model

            build_model(weights=weights, freeze="fc")
        except Exception as exc:
            problems.append(f"{where}: train.weights {weights!r} cannot be loaded: {exc}")
    return problems


def check_cluster(grid, *, store_hash: str, tracking_uri: str, storage_path: str) -> list[str]:
    """Every reason this grid cannot run on the Ray cluster the driver is connected to.

    Args:
        grid: the validated GridConfig.
        store_hash: the content hash of the store the driver opened.
        tracking_uri: where trials will log.
        storage_path: the base of Tune's storage (a path or a URL such as s3://).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = alive_nodes()
    res = grid.resources_per_trial
    problems = resource_problems(res.cpu, res.gpu, nodes)
    here = ray.util.get_node_ip_address()
    elsewhere = sorted({n.get("NodeManagerAddress", "?") for n in nodes} - {here})
    if elsewhere and is_loopback(tracking_uri):
        problems.append(f"tracking URI {tracking_uri!r} is local to this machine ({here}), but trials also run on "
                        f"{', '.join(elsewhere)}; point --tracking-uri (or MLFLOW_TRACKING_URI) at a server every "
                        "node reaches")
    probe_file, problem = write_storage_probe(storage_path)
    if problem:
        problems.append(problem)
    weights = grid.train.weights
    need_weights = weights != "none" or any(p.name == "weights" for p in grid.search)
    store = grid.store if "://" in grid.store else str(Path(grid.store).resolve())
    try:
        probe = ray.remote(num_cpus=0, max_retries=0)(probe_node)
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                    store=store, store_hash=store_hash, probe_file=probe_file, tracking_uri=tracking_uri,
                    weights=weights, need_weights=need_weights) for n in nodes]
        try:
            for found in ray.get(refs, timeout=PROBE_TIMEOUT_S):
                problems.extend(p for p in found if p not in problems)
        except Exception as exc:  # a node that cannot even run a probe will not run trials either
            problems.append(f"a node did not answer the preflight probe within {PROBE_TIMEOUT_S:.0f} s "
                            f"({type(exc).__name__}: {exc})")
    finally:
        remove_storage_probe(probe_file)
    return problems
