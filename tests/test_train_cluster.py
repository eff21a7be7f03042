"""Distributed training on a real throwaway Ray cluster (2 nodes on this host), real DeepSpeed, CPU.

One ``ray start --head`` cluster for the module (2 CPUs, 127.0.0.1, every port explicit, token auth, own temp
dir; tests/ray_cluster.py), stopped by PID at the end. Tests:

* ``ray job submit --working-dir . -- python -m dbgen.train`` with 2 workers: job SUCCEEDED, run directory
  complete, bits/dim falling (``dbgen.evaluate`` and ``dbgen.sample`` on a run: tests/test_readme.py).
* two nodes on this host (``ray.cluster_utils.Cluster``, all on loopback), one worker per node
  (``scale.placement_strategy=STRICT_SPREAD``).
* a worker process killed by PID mid-run: the run restarts from its last checkpoint and ends with the same
  parameters (and loader position) as the uninterrupted end-to-end run (which also evaluated and sampled:
  neither may perturb training). A resume by a new driver with more steps is tests/test_train_integrity.py's.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from limits import patience  # noqa: E402
from ray_cluster import RayHead, ray_bin  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/rvae_binary_tiny.yaml"
FAST = ["train.eval_batches=1", "train.num_samples=4", "train.log_every=5"]
E2E_STEPS = ["train.max_steps=40", "train.checkpoint_every=10"]


@pytest.fixture(scope="module")
def cluster():
    # Faster failure handling than Ray's defaults, so the killed-worker test restarts in seconds: the Train
    # controller polls workers every 0.5 s (and registers reported checkpoints then), and gives a surviving
    # worker blocked in a collective 5 s (not 30) to leave its process group before it is killed.
    head = RayHead(
        num_cpus=2, env={"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S": "5"}
    )
    head.start()
    nodes = list(head.nodes)
    yield head
    head.stop()
    for node in nodes:  # stopped by PID: nothing of the head's session is left
        assert not node.session_alive(), f"ray node {node.pid} left processes behind"


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def driver_env(cluster) -> dict:
    env = cluster.client_env()
    env["RAY_ADDRESS"] = cluster.address
    return env


def train_cmd(storage, name, *overrides) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dbgen.train",
        "--config",
        CONFIG,
        "--name",
        name,
        "--storage",
        str(storage),
        *FAST,
        *overrides,
    ]


def run_train(cluster, storage, name, *overrides, timeout=900) -> dict:
    out = subprocess.run(
        train_cmd(storage, name, *overrides),
        env=driver_env(cluster),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=patience(timeout),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return summary_of(storage / name)


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def records(run_dir: Path, kind: str) -> list[dict]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line being appended right now
            continue
        if rec["kind"] == kind:
            out.append(rec)
    return out


def final_state(run_dir: Path, step: int) -> dict:
    return torch.load(
        run_dir / f"checkpoint_{step:07d}" / "ds" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True
    )


def train_worker_actors(cluster) -> list[dict]:
    """Every Ray Train worker actor the cluster has seen, live or dead (from the cluster's state API)."""
    url = (
        "/api/v0/actors?detail=true&limit=1000&filter_keys=class_name&filter_predicates=%3D"
        "&filter_values=RayTrainWorker"
    )
    return cluster._get_json(url)["data"]["result"]["result"]


def train_worker_pids(cluster) -> list[int]:
    """PIDs of the live Ray Train worker processes."""
    return [a["pid"] for a in train_worker_actors(cluster) if a["state"] == "ALIVE" and a.get("pid")]


# ----------------------------------------------------------------------------------------------- end to end
@pytest.mark.timeout(600)
def test_ray_job_submit_end_to_end(cluster, storage):
    sid = f"dbgen-e2e-{uuid.uuid4().hex[:8]}"
    cmd = [
        ray_bin(),
        "job",
        "submit",
        "--address",
        cluster.dashboard_url,
        "--submission-id",
        sid,
        "--working-dir",
        str(ROOT),
        "--runtime-env-json",
        json.dumps({"excludes": [".venv", ".git", "runs"]}),
        "--",
        "python",
        "-m",
        "dbgen.train",
        "--config",
        CONFIG,
        "--name",
        "e2e",
        "--storage",
        str(storage),
        *E2E_STEPS,
        "train.eval_every=20",
        "train.sample_every=20",
        *FAST,
    ]
    out = subprocess.run(cmd, env=cluster.client_env(), cwd=ROOT, capture_output=True, text=True, timeout=patience(900))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert cluster._get_json(f"/api/jobs/{sid}")["status"] == "SUCCEEDED"

    # The job's console (the driver's output) is dbgen's alone: header, step/eval/checkpoint/sample lines and
    # the summary; the workers' DeepSpeed / Ray Train / Ray Data output stays in Ray's log files.
    console = cluster._get_json(f"/api/jobs/{sid}/logs")["logs"]
    # The job log opens with two lines of Ray's job supervisor (before the driver starts); the rest is the driver's.
    preamble = re.compile(r".*job_manager\.py:\d+ -- Runtime env is setting up\.$|^Running entrypoint for job ")
    every_line = [line for line in console.splitlines() if line.strip()]
    lines = [line for line in every_line if not preamble.match(line)]
    assert len(every_line) - len(lines) <= 2, console[:1000]
    for noise in (
        "Reporting training result",
        "TrainingReport(",
        "Running Dataset",
        "RayTrainWorker",
        "(pid=",
        "DeepSpeed",
        "WARNING",
        "Traceback",
    ):
        assert noise not in console, f"{noise!r} on the job's console:\n{console[-3000:]}"
    # dbgen's lines; also those of building the built-in data set, when this is the suite's first run to need
    # it (which run that is depends on timing: under load it was this one)
    dbgen_line = re.compile(
        r"^\d\d:\d\d:\d\d (run |model |\d+ worker|data |ray: |step +\d+|resumed "
        r"|\S+: \d+ rows in \d+ shards |built \w+ into )"
        r"|^summary \(|^[a-z_]+: "
    )
    assert all(dbgen_line.match(line) for line in lines), [line for line in lines if not dbgen_line.match(line)]
    for step in range(5, 41, 5):
        assert re.search(rf"step +{step}/40 \| bpd \d+\.\d+ \| \d+ img/s", console), step
    assert re.search(r"step 20 \| eval bpd \d", console) and re.search(r"step 30 \| checkpoint", console)
    assert "run e2e in" in console and "2 worker(s) on CPU" in console and "steps: 40" in console

    run = storage / "e2e"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["images_seen"] == 40 * 32
    assert summary["resumed_from"] is None and summary["recovered_from"] == []
    assert summary["world_size"] == 2 and summary["micro_batch_size"] == 16
    assert 0 < summary["final_eval_bpd"] < 9 and 0 < summary["final_train_bpd"] < 9
    assert summary["wall_s"] > 0 and summary["images_per_s"] > 0 and summary["skipped_steps"] == 0
    train = records(run, "train")
    assert [r["step"] for r in train] == list(range(5, 41, 5))
    assert train[-1]["bpd"] < train[0]["bpd"]  # it learns
    for key in ("images_per_s", "grad_norm", "lr", "eta_s", "t_forward", "t_backward", "t_communication"):
        assert key in train[0]
    assert [r["step"] for r in records(run, "eval")] == [20, 40]
    assert [r["step"] for r in records(run, "checkpoint")] == [10, 20, 30, 40]
    for step in (20, 40):
        assert (run / "samples" / f"step_{step:07d}.png").stat().st_size > 0
    for step in (30, 40):  # train.keep_checkpoints = 2
        assert json.loads((run / f"checkpoint_{step:07d}" / "meta.json").read_text())["step"] == step
    assert not (run / "checkpoint_0000010").exists()
    assert (run / "config.yaml").exists()


# ---------------------------------------------------------------------------------------------- two nodes
@pytest.mark.timeout(600)
def test_two_nodes_one_worker_each(storage):
    """Two raylets on this host (``ray.cluster_utils.Cluster``: a second ``ray start --address`` would need Ray's
    cluster mode, which moves every node off loopback), 1 CPU each, explicit ports. Auth is off here: this
    process starts the nodes and its Ray config was read at import (token auth is covered by the other tests)."""
    from ray.cluster_utils import Cluster
    from ray_cluster import free_port, free_port_range

    temp_dir = tempfile.mkdtemp(prefix="rayc", dir="/tmp")  # short: Ray's unix socket paths
    # Cluster writes its address file to <Ray's default temp root>/ray/ray_current_cluster and does not create
    # that folder: point the root at this test's own folder (never /tmp/ray, which exists only where Ray ran).
    os.mkdir(os.path.join(temp_dir, "ray"))
    node_env = {"RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": temp_dir}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in node_env.items():
            mp.setenv(k, v)  # the node processes inherit the test process's environment

        def ports(head: bool) -> dict:
            first, last = free_port_range(60)
            p = {
                "node_manager_port": free_port(),
                "object_manager_port": free_port(),
                "dashboard_agent_listen_port": free_port(),
                "metrics_agent_port": free_port(),
                "metrics_export_port": free_port(),
                "runtime_env_agent_port": free_port(),
                "min_worker_port": first,
                "max_worker_port": last,
                "num_cpus": 1,
            }
            if head:
                p.update(
                    gcs_server_port=free_port(),
                    include_dashboard=True,
                    dashboard_host="127.0.0.1",
                    dashboard_port=free_port(),
                    ray_client_server_port=free_port(),
                    temp_dir=temp_dir,
                )
            return p

        cluster = Cluster(shutdown_at_exit=False)
        try:
            cluster.add_node(**ports(head=True))
            worker = cluster.add_node(**ports(head=False))
            env = {**os.environ, "RAY_ADDRESS": cluster.address}
            out = subprocess.run(
                train_cmd(
                    storage,
                    "spread",
                    "train.max_steps=4",
                    "train.checkpoint_every=0",
                    "train.eval_every=0",
                    "train.sample_every=0",
                    "scale.placement_strategy=STRICT_SPREAD",
                    "data.loader=arrow",  # placement is under test, not the loader (Ray Data adds ~7 CPU-s a run)
                ),
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=patience(900),  # ~60 s on an idle machine; generous for a loaded one
            )
            nodes = {cluster.head_node.node_id, worker.node_id}
        finally:
            cluster.shutdown()  # kills the processes it started, by their PIDs
            shutil.rmtree(temp_dir, ignore_errors=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    summary = summary_of(storage / "spread")
    assert summary["steps"] == 4
    placed = {w["rank"]: w["node_id"] for w in summary["workers"]}
    assert set(placed.values()) == nodes, (placed, nodes)  # one worker on each node


# --------------------------------------------------------------------------------- failure, resume, exactness
@pytest.mark.timeout(900)
def test_killed_worker_recovers_exactly(cluster, storage):
    ref_dir = storage / "e2e"  # the uninterrupted reference: same training settings, seed and data
    if not (ref_dir / "summary.json").exists():
        pytest.fail("needs the run of test_ray_job_submit_end_to_end as its uninterrupted reference")
    ref = summary_of(ref_dir)

    # The same run (checkpointing more often does not change the numbers), one worker killed by PID as soon as
    # the checkpoint at step 5 is committed (its directory appears complete, by rename).
    proc = subprocess.Popen(
        train_cmd(
            storage,
            "exact-kill",
            "train.max_steps=40",
            "train.checkpoint_every=5",
            "train.eval_every=0",
            "train.sample_every=0",
            "scale.max_failures=2",
        ),
        env=driver_env(cluster),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    run = storage / "exact-kill"
    try:
        deadline = time.monotonic() + patience(900)  # generous: a loaded machine is ~10x slower
        while not (run / "checkpoint_0000005").is_dir():
            assert proc.poll() is None and time.monotonic() < deadline, "checkpoint 5 never committed"
            time.sleep(0.05)
        pids = train_worker_pids(cluster)
        assert len(pids) == 2, pids
        os.kill(pids[-1], signal.SIGKILL)
        killed_at = max([r["step"] for r in records(run, "train")], default=0)
        output, _ = proc.communicate(timeout=patience(600))
    finally:
        if proc.poll() is None:
            proc.kill()  # the driver we started, by its PID
    assert proc.returncode == 0, output[-6000:]
    summary = summary_of(run)
    assert killed_at < 40, "the run finished before the worker was killed"
    assert summary["steps"] == 40 and summary["images_seen"] == 40 * 32
    assert summary["recovered_from"] and all(5 <= s < 40 and s % 5 == 0 for s in summary["recovered_from"])
    assert summary["resumed_from"] is None
    assert pids[-1] not in {w["pid"] for w in summary["workers"]}  # a new worker group finished the run
    assert [r for r in records(run, "resume") if r["restart"]]

    # exactness: the interrupted run ends where the uninterrupted one does
    a, b = final_state(ref_dir, 40), final_state(run, 40)
    assert a["module"].keys() == b["module"].keys()
    diff = max((a["module"][k].float() - b["module"][k].float()).abs().max().item() for k in a["module"])
    assert diff <= 1e-6, f"parameters differ by {diff}"
    assert a["loader"] == b["loader"]  # same epoch and position: the same rows were consumed
    assert a["step"] == b["step"] == 40 and a["skipped"] == b["skipped"]
    assert summary["final_train_bpd"] == pytest.approx(ref["final_train_bpd"], abs=1e-6)
