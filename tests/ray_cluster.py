"""Throwaway Ray clusters for tests: `ray start --head --block` on 127.0.0.1, every port explicit.

Why every port: with Ray's defaults a leftover dashboard agent on port 52365 (from any earlier cluster on the
host) makes every later ``ray job submit`` fail with "No available agent to submit job". Each node started
here gets its own free ports, its own ``--temp-dir`` and runs under ``setsid`` so that a SIGTERM to the
``ray start --block`` process (its PID, never ``ray stop``, which would stop every Ray on the host) takes
down everything it started.

Auth: Ray 2.6x heads enable token auth by default while the ``ray job submit`` CLI defaults to no auth. Here
the token is explicit: ``RAY_AUTH_MODE=token`` plus a fresh ``RAY_AUTH_TOKEN`` for the nodes and for every
client started with :meth:`RayHead.client_env`, so nothing is read from or written to ``~/.ray``.
(``auth="disabled"`` starts the cluster with ``RAY_AUTH_MODE=disabled`` instead.)

Usage::

    with RayHead(num_cpus=2) as head:
        node = head.add_node(num_cpus=1)          # optional second node on the same host
        subprocess.run(["ray", "job", "submit", "--address", head.dashboard_url, ...], env=head.client_env())
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["RayHead", "RayNode", "free_port", "free_port_range", "ray_bin"]

HOST = "127.0.0.1"


def ray_bin() -> str:
    """The ``ray`` CLI of the running interpreter's environment."""
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.exists() else (shutil.which("ray") or "ray")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


_taken: set[int] = set()  # ports handed out by this process (not yet bound by the nodes that got them)


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1, not handed out before by this process."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in _taken:
            _taken.add(port)
            return port
    raise RuntimeError("no free port found on 127.0.0.1")


def free_port_range(n: int, low: int = 20000, high: int = 30000) -> tuple[int, int]:
    """``(first, last)`` of ``n`` consecutive free ports (worker ports of one node)."""
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(low, high - n)
        ports = range(first, first + n)
        if not _taken.intersection(ports) and all(_port_free(p) for p in ports):
            _taken.update(ports)
            return first, first + n - 1
    raise RuntimeError(f"no {n} consecutive free ports in [{low}, {high})")


class RayNode:
    """One ``ray start --block`` process (head or worker node) in its own session."""

    def __init__(self, args: list[str], env: dict, log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )  # setsid: its own process group

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def session_alive(self) -> bool:
        """Whether any process of this node's session (``ray start`` and what it started) still runs."""
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def stop(self, grace: float = 10.0, timeout: float = 30.0) -> None:
        """SIGTERM to the ``ray start --block`` PID: it stops every process it started (about 5 s on an idle
        node). After a Ray Train job its shutdown can take ~30 s (orphaned worker processes wait for their
        raylet), so whatever of its session is still running after ``grace`` seconds gets SIGKILL: the process
        group of that PID (its own session, so only what it started). Waits until nothing of it is left."""
        if self.alive():
            os.kill(self.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        killed = False
        while self.session_alive():
            self.proc.poll()  # reap `ray start` once it exits (a zombie still counts as alive)
            if not killed and time.monotonic() > deadline:
                os.killpg(self.proc.pid, signal.SIGKILL)
                killed, deadline = True, time.monotonic() + timeout
            elif killed and time.monotonic() > deadline:
                raise RuntimeError(f"processes of ray node {self.proc.pid} survive SIGKILL")
            time.sleep(0.25)
        self.proc.wait(timeout=10)
        self._log.close()


class RayHead:
    """A throwaway head node on 127.0.0.1 (see the module docstring); a context manager."""

    def __init__(
        self,
        temp_dir: str | Path | None = None,
        num_cpus: int = 2,
        auth: str = "token",
        resources: dict | None = None,
        env: dict | None = None,
        worker_ports: int = 100,
    ):
        if auth not in ("token", "disabled"):
            raise ValueError(f"auth must be 'token' or 'disabled', got {auth!r}")
        # Ray puts unix sockets under the temp dir and their paths must stay under 108 bytes, so the default
        # is a short fresh directory in /tmp (removed by stop()); pytest's tmp_path is often too long.
        self._own_temp_dir = temp_dir is None
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp") if temp_dir is None else temp_dir).resolve()
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.num_cpus = num_cpus
        self.auth = auth
        self.token = secrets.token_hex(32) if auth == "token" else None
        self.resources = resources
        self.extra_env = dict(env or {})
        self.worker_ports = worker_ports
        self.port = free_port()
        self.dashboard_port = free_port()
        self.metrics_port = free_port()
        self.client_server_port = free_port()
        self.nodes: list[RayNode] = []

    # ------------------------------------------------------------------------------------------ addresses
    @property
    def address(self) -> str:
        """GCS address for ``ray.init(address=...)`` and ``ray start --address``."""
        return f"{HOST}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """Job server / dashboard, for ``ray job submit --address``."""
        return f"http://{HOST}:{self.dashboard_port}"

    def auth_env(self) -> dict:
        if self.auth == "token":
            return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        return {"RAY_AUTH_MODE": "disabled"}

    def client_env(self, base: dict | None = None) -> dict:
        """Environment for a client process (``ray job submit``, a driver): the cluster's auth settings."""
        env = dict(os.environ if base is None else base)
        env.pop("RAY_ADDRESS", None)
        # Job entrypoints run ``python`` from the head's PATH: make it this interpreter's environment.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.update(self.auth_env())
        return env

    # ------------------------------------------------------------------------------------------ lifecycle
    def _node_args(self, num_cpus: int, resources: dict | None) -> list[str]:
        first, last = free_port_range(self.worker_ports)
        args = [
            f"--node-ip-address={HOST}",
            f"--num-cpus={num_cpus}",
            f"--temp-dir={self.temp_dir}",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--min-worker-port={first}",
            f"--max-worker-port={last}",
            "--object-store-memory=200000000",
            "--disable-usage-stats",
            "--block",
        ]
        if resources:
            import json

            args.append(f"--resources={json.dumps(resources)}")
        return args

    def _env(self) -> dict:
        env = self.client_env()
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 90.0) -> RayHead:
        args = [
            ray_bin(),
            "start",
            "--head",
            f"--port={self.port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--metrics-export-port={self.metrics_port}",
            f"--ray-client-server-port={self.client_server_port}",
            "--include-dashboard=true",
        ]
        args += self._node_args(self.num_cpus, self.resources)
        self.nodes.append(RayNode(args, self._env(), self.temp_dir / "ray-start-head.log"))
        try:
            self._wait_ready(expected_nodes=1, timeout=timeout)
        except Exception:
            self.stop()
            raise
        return self

    def add_node(self, num_cpus: int = 1, resources: dict | None = None, timeout: float = 90.0) -> RayNode:
        """A second (third, ...) node on this host joined to the head: its own ports, same temp dir.

        ``ray start --address`` refuses to start a worker node while Ray's "cluster mode" is off
        (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which tests/conftest.py sets to keep single-node Ray on
        loopback), so it is switched on for this process only; Ray then registers the node under the host's
        own address instead of 127.0.0.1 (still this host).
        """
        args = [ray_bin(), "start", f"--address={self.address}"] + self._node_args(num_cpus, resources)
        env = {**self._env(), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
        node = RayNode(args, env, self.temp_dir / f"ray-start-node{len(self.nodes)}.log")
        self.nodes.append(node)
        self._wait_ready(expected_nodes=len(self.nodes), timeout=timeout)
        return node

    def _wait_ready(self, expected_nodes: int, timeout: float) -> None:
        """Until the job server answers and ``expected_nodes`` nodes (each with its agent) are alive."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for node in self.nodes:
                if not node.alive():
                    raise RuntimeError(
                        f"ray node (pid {node.pid}) exited with {node.proc.returncode}:\n{node.log_tail()}"
                    )
            try:
                nodes = self._get_json("/api/v0/nodes?detail=false&limit=100")
                alive = [n for n in nodes["data"]["result"]["result"] if n.get("state") == "ALIVE"]
                agents = self._get_json("/api/jobs/")  # the job server itself
                if len(alive) >= expected_nodes and isinstance(agents, list):
                    return
                last = f"{len(alive)} of {expected_nodes} nodes alive"
            except (OSError, urllib.error.URLError, KeyError, ValueError) as e:
                last = repr(e)
            time.sleep(0.5)
        raise TimeoutError(f"ray cluster not ready after {timeout}s ({last}); head log:\n{self.nodes[0].log_tail()}")

    def _get_json(self, path: str):
        import json

        req = urllib.request.Request(self.dashboard_url + path)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        """Stop every node this object started, worker nodes first, each by the PID of its ``ray start``."""
        for node in reversed(self.nodes):
            node.stop()
        self.nodes.clear()
        if self._own_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> RayHead:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
