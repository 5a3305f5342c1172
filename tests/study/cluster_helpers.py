"""A real multi-node Ray cluster on this machine: `ray start --head` plus `ray start --address`
worker nodes, each a separate process tree with its own resources and environment.

    nodes = [NodeSpec("head", cpus=1, env={...}), NodeSpec("node2", cpus=1, env={...})]
    with LocalRayCluster(tmp / "ray", nodes) as cluster:
        launch --ray-address cluster.address ...
        cluster.node_ids()          # {"head": NodeID, "node2": NodeID}

Every node is started with `ray start --block` in its own session and carries a custom
resource named after it (its label, e.g. {"node2": 1}), so a test can tell which Ray node id
is which. The cluster uses Ray's token authentication (on by default for `ray start` in the
Ray 2.60 used here) with a random token of its own in RAY_AUTH_TOKEN: `cluster.env` is what
a driver (study/launch.py --ray-address) needs to join it. Stopping kills exactly these
process groups, then any process still naming this cluster's temp dir: never `ray stop`,
which would stop every Ray on the machine (other test sessions' too).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class NodeSpec:
    """One Ray node: `label` becomes a custom resource {label: 1}; `env` is its environment
    on top of this process's (a node-local THIGHMRI_FEATURE_CACHE, say)."""

    label: str
    cpus: int = 1
    env: dict[str, str] = field(default_factory=dict)


class LocalRayCluster:
    """Head + worker nodes as `ray start --block` processes (see module docstring)."""

    def __init__(self, temp_dir: Path, nodes: list[NodeSpec], *, timeout: float = 120) -> None:
        self.temp_dir = Path(temp_dir)  # Ray's unix sockets: keep it short (<= 107 bytes)
        self.nodes = nodes
        self.timeout = timeout
        self.port = free_port()
        import secrets

        import ray

        self.address = f"{ray.util.get_node_ip_address()}:{self.port}"  # where `ray start` binds
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> LocalRayCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start_node(self, spec: NodeSpec, head: bool) -> None:
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        args = [RAY, "start", "--block", "--disable-usage-stats", "--num-cpus", str(spec.cpus),
                "--num-gpus", "0", "--resources", json.dumps({spec.label: 1})]
        if head:
            args += ["--head", "--port", str(self.port), "--temp-dir", str(self.temp_dir),
                     "--include-dashboard", "false", "--node-manager-port", str(free_port()),
                     "--object-manager-port", str(free_port())]
        else:
            args += ["--address", self.address, "--node-manager-port", str(free_port()),
                     "--object-manager-port", str(free_port())]
        log = open(self.temp_dir / f"ray_start_{spec.label}.log", "w")
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **self.env, **spec.env}
        env.pop("RAY_ADDRESS", None)
        self.procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True))
        log.close()

    def start(self) -> None:
        """Start the head, then each worker node; return once Ray reports them all alive."""
        self._start_node(self.nodes[0], head=True)
        self._wait(1)
        for spec in self.nodes[1:]:
            self._start_node(spec, head=False)
        self._wait(len(self.nodes))

    def _wait(self, n: int) -> None:
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"ray start exited ({dead[0].returncode}); see {self.logs()}")
            try:
                if len(self.node_ids(timeout=30)) >= n:
                    return
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
            time.sleep(1.0)
        raise RuntimeError(f"{n} Ray node(s) not alive after {self.timeout:.0f} s; see {self.logs()}")

    def logs(self) -> str:
        return ", ".join(str(p) for p in sorted(self.temp_dir.glob("ray_start_*.log")))

    def nodes_info(self, timeout: float = 120) -> list[dict]:
        """ray.nodes() of the alive nodes, asked by a separate short-lived driver."""
        code = ("import json, ray; ray.init(address=%r, log_to_driver=False); "
                "print(json.dumps([n for n in ray.nodes() if n['Alive']], default=str))" % self.address)
        env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **self.env}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env,
                             cwd=self.temp_dir)
        if out.returncode != 0:
            raise RuntimeError(f"cannot list the cluster's nodes: {out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def node_ids(self, timeout: float = 120) -> dict[str, str]:
        """{label: Ray NodeID} of the alive nodes (the label is the node's custom resource)."""
        labels = {s.label for s in self.nodes}
        found = {}
        for n in self.nodes_info(timeout):
            for label in labels & set(n.get("Resources", {})):
                found[label] = n["NodeID"]
        return found

    def stop(self) -> None:
        """Kill the nodes' process groups (workers first, head last), then stragglers of this cluster."""
        for p in reversed(self.procs):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(timeout=10)  # a node drains for up to 30 s on SIGTERM: not worth it here
                    break
                except subprocess.TimeoutExpired:
                    continue
        for pid in self.leftover_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def leftover_pids(self) -> list[int]:
        """Processes still running whose command line names this cluster (its temp dir or port)."""
        marks = (str(self.temp_dir), f"--address {self.address}", f"--gcs-address={self.address}")
        mine, pid = set(), os.getpid()  # this process and its ancestors (a shell whose command names the dir)
        while pid > 1:
            mine.add(pid)
            try:
                pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                break
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) in mine:
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "ray" in cmd and any(m in cmd for m in marks):
                pids.append(int(proc.name))
        return pids
