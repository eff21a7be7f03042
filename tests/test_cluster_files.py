"""cluster/: every file parses, the launcher configs pass Ray's own schema, the RayJob runs a valid dbgen.train
command line, and the local head script really starts a head (slow) that stops on SIGTERM to its PID."""

import copy
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from dbgen.config import load_config

sys.path.insert(0, str(Path(__file__).parent))
from ray_cluster import free_port, free_port_range  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHERS = ["aws-gpu.yaml", "gcp-gpu.yaml"]


def check_train_command(cmd: str, workdir: Path = ROOT) -> None:
    """A ``python -m dbgen.train`` command line: its config file exists and loads with its overrides."""
    args = shlex.split(cmd)
    assert args[:3] == ["python", "-m", "dbgen.train"], cmd
    config = args[args.index("--config") + 1]
    assert (workdir / config).is_file(), config
    skip = {args.index(flag) + i for flag in ("--config", "--name", "--storage") if flag in args for i in (0, 1)}
    overrides = [a for i, a in enumerate(args[3:], 3) if i not in skip]
    load_config(workdir / config, overrides)  # raises ConfigError naming a bad key


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_passes_ray_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((CLUSTER / name).read_text())
    validate_config(prepare_config(copy.deepcopy(cfg)))  # Ray's cluster-launcher schema, with its defaults
    assert cfg["provider"]["type"] == name.split("-")[0]
    workers = [t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]]
    assert workers and all(t["resources"].get("GPU", 0) >= 1 for t in workers)
    setup = " ".join(cfg["setup_commands"])
    assert "install" in setup and "~/dbgen" in setup and "/mnt/shared" in setup
    assert cfg["file_mounts"] == {"/home/ubuntu/dbgen": "."}
    head = " ".join(cfg["head_start_ray_commands"])
    for flag in ("--head", "--port=", "--dashboard-port=", "--metrics-export-port=", "--dashboard-host=127.0.0.1"):
        assert flag in head
    # the example job in the header comment is a valid training command
    text = (CLUSTER / name).read_text()
    example = re.search(r"-- (python -m dbgen\.train.*?)\n#   ray down", text, re.S).group(1)
    check_train_command(" ".join(line.lstrip("# ").rstrip("\\ ") for line in example.splitlines()))


def test_kuberay_rayjob_runs_dbgen_train():
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    check_train_command(spec["entrypoint"])
    assert "--storage /shared/" in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        volumes = {v["name"] for v in pod["volumes"]}
        for c in pod["containers"]:
            assert {m["name"] for m in c["volumeMounts"]} <= volumes
            assert any(m["mountPath"] == "/shared" for m in c["volumeMounts"])
    gpus = sum(
        g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in cluster["workerGroupSpecs"]
    )
    assert f"scale.num_workers={gpus}" in spec["entrypoint"] and "scale.use_gpu=true" in spec["entrypoint"]


def test_dockerfile_installs_dbgen():
    text = (CLUSTER / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM rayproject/ray:" in text and "pip install" in text and "-e ." in text


def test_local_head_script_passes_every_port():
    text = (CLUSTER / "local_head.sh").read_text()
    subprocess.run(["bash", "-n", str(CLUSTER / "local_head.sh")], check=True)
    for flag in (
        "--port=",
        "--dashboard-port=",
        "--dashboard-agent-listen-port=",
        "--dashboard-agent-grpc-port=",
        "--metrics-export-port=",
        "--runtime-env-agent-port=",
        "--ray-client-server-port=",
        "--node-manager-port=",
        "--object-manager-port=",
        "--min-worker-port=",
        "--max-worker-port=",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--block",
        "--temp-dir=",
    ):
        assert flag in text, flag


def _session_gone(pgid: int, timeout: float) -> bool:
    """Whether every process of process group ``pgid`` exits within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.5)
    return False


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_local_head_script_starts_and_stops_on_sigterm(tmp_path):
    import tempfile

    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's unix socket paths
    first, last = free_port_range(60)
    ports = {
        "RAY_PORT": free_port(),
        "DASHBOARD_PORT": free_port(),
        "METRICS_PORT": free_port(),
        "DASHBOARD_AGENT_LISTEN_PORT": free_port(),
        "DASHBOARD_AGENT_GRPC_PORT": free_port(),
        "RUNTIME_ENV_AGENT_PORT": free_port(),
        "RAY_CLIENT_SERVER_PORT": free_port(),
        "NODE_MANAGER_PORT": free_port(),
        "OBJECT_MANAGER_PORT": free_port(),
        "MIN_WORKER_PORT": first,
        "MAX_WORKER_PORT": last,
    }
    env = {
        **os.environ,
        **{k: str(v) for k, v in ports.items()},
        "RAY_TEMP_DIR": temp_dir,
        "NUM_CPUS": "1",
        "RAY_AUTH_MODE": "disabled",
    }
    log = open(tmp_path / "head.log", "wb")
    proc = subprocess.Popen(
        ["bash", str(CLUSTER / "local_head.sh")], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline, version, metrics = time.monotonic() + 120, None, None
        # The metrics endpoint answers with process metrics before Ray's own (ray_*) appear: wait for those.
        while time.monotonic() < deadline and (version is None or metrics is None or "ray_" not in metrics):
            assert proc.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            try:
                version = urllib.request.urlopen(
                    f"http://127.0.0.1:{ports['DASHBOARD_PORT']}/api/version", timeout=3
                ).read()
                metrics = (
                    urllib.request.urlopen(f"http://127.0.0.1:{ports['METRICS_PORT']}/metrics", timeout=3)
                    .read()
                    .decode()
                )
            except OSError:
                pass
            time.sleep(0.5)
        assert version and b"ray_version" in version
        assert metrics is not None and "ray_" in metrics  # the node's Prometheus endpoint on the given port
    finally:
        os.kill(proc.pid, signal.SIGTERM)  # the script exec'd `ray start --block`: same PID
        proc.wait(timeout=60)
        log.close()
        gone = _session_gone(proc.pid, timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert gone, "processes of the head's session still running 30 s after SIGTERM"
