"""Distributed training on a real throwaway Ray cluster (2 nodes on this host), real DeepSpeed, CPU.

One ``ray start --head`` cluster for the module (2 CPUs, 127.0.0.1, every port explicit, token auth, own temp
dir; tests/ray_cluster.py), stopped by PID at the end. Tests:

* ``ray job submit --working-dir . -- python -m dbgen.train`` with 2 workers: job SUCCEEDED, run directory
  complete, bits/dim falling; ``dbgen.evaluate`` and ``dbgen.sample`` on the result.
* two nodes on this host (``ray.cluster_utils.Cluster``, all on loopback), one worker per node
  (``scale.placement_strategy=STRICT_SPREAD``).
* a worker process killed by PID mid-run: the run restarts from its last checkpoint and ends with the same
  parameters (and loader position) as the uninterrupted end-to-end run (which also evaluated and sampled:
  neither may perturb training); re-submitted with more steps, it resumes.
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
    head = RayHead(num_cpus=2, env={"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
                                    "TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S": "5"})
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
    return [sys.executable, "-m", "dbgen.train", "--config", CONFIG, "--name", name, "--storage", str(storage),
            *FAST, *overrides]


def run_train(cluster, storage, name, *overrides, timeout=400) -> dict:
    out = subprocess.run(train_cmd(storage, name, *overrides), env=driver_env(cluster), cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout)
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
    return torch.load(run_dir / f"checkpoint_{step:07d}" / "ds" / "mp_rank_00_model_states.pt",
                      map_location="cpu", weights_only=True)


def train_worker_actors(cluster) -> list[dict]:
    """Every Ray Train worker actor the cluster has seen, live or dead (from the cluster's state API)."""
    url = ("/api/v0/actors?detail=true&limit=1000&filter_keys=class_name&filter_predicates=%3D"
           "&filter_values=RayTrainWorker")
    return cluster._get_json(url)["data"]["result"]["result"]


def train_worker_pids(cluster) -> list[int]:
    """PIDs of the live Ray Train worker processes."""
    return [a["pid"] for a in train_worker_actors(cluster) if a["state"] == "ALIVE" and a.get("pid")]


# ----------------------------------------------------------------------------------------------- end to end
@pytest.mark.timeout(600)
def test_ray_job_submit_end_to_end(cluster, storage, tmp_path):
    sid = f"dbgen-e2e-{uuid.uuid4().hex[:8]}"
    cmd = [ray_bin(), "job", "submit", "--address", cluster.dashboard_url, "--submission-id", sid,
           "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"excludes": [".venv", ".git", "runs"]}),
           "--", "python", "-m", "dbgen.train", "--config", CONFIG, "--name", "e2e", "--storage", str(storage),
           *E2E_STEPS, "train.eval_every=20", "train.sample_every=20", *FAST]
    out = subprocess.run(cmd, env=cluster.client_env(), cwd=ROOT, capture_output=True, text=True, timeout=500)
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
    for noise in ("Reporting training result", "TrainingReport(", "Running Dataset", "RayTrainWorker",
                  "(pid=", "DeepSpeed", "WARNING", "Traceback"):
        assert noise not in console, f"{noise!r} on the job's console:\n{console[-3000:]}"
    dbgen_line = re.compile(r"^\d\d:\d\d:\d\d (run |model |\d+ worker|data |ray: |step +\d+|resumed )"
                            r"|^summary \(|^[a-z_]+: ")
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

    # evaluate and sample work on the run directory (single process, no Ray)
    ev = subprocess.run([sys.executable, "-m", "dbgen.evaluate", "--run", str(run), "--json", "--max-batches", "1",
                         "--batch-size", "64", "--samples", "2"], capture_output=True, text=True, timeout=120)
    assert ev.returncode == 0, ev.stderr[-2000:]
    result = json.loads(ev.stdout.strip().splitlines()[-1])
    assert result["step"] == 40 and result["rows"] == 64 and 0 < result["bpd"] < 10
    png = tmp_path / "grid.png"
    sm = subprocess.run([sys.executable, "-m", "dbgen.sample", "--run", str(run), "--n", "9", "--out", str(png)],
                        capture_output=True, text=True, timeout=120)
    assert sm.returncode == 0 and png.stat().st_size > 0, sm.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- two nodes
@pytest.mark.timeout(400)
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
            p = {"node_manager_port": free_port(), "object_manager_port": free_port(),
                 "dashboard_agent_listen_port": free_port(), "metrics_agent_port": free_port(),
                 "metrics_export_port": free_port(), "runtime_env_agent_port": free_port(),
                 "min_worker_port": first, "max_worker_port": last, "num_cpus": 1}
            if head:
                p.update(gcs_server_port=free_port(), include_dashboard=True, dashboard_host="127.0.0.1",
                         dashboard_port=free_port(), ray_client_server_port=free_port(),
                         temp_dir=temp_dir)
            return p

        cluster = Cluster(shutdown_at_exit=False)
        try:
            cluster.add_node(**ports(head=True))
            worker = cluster.add_node(**ports(head=False))
            env = {**os.environ, "RAY_ADDRESS": cluster.address}
            out = subprocess.run(train_cmd(storage, "spread", "train.max_steps=4", "train.checkpoint_every=0",
                                           "train.eval_every=0", "train.sample_every=0",
                                           "scale.placement_strategy=STRICT_SPREAD"),
                                 env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
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
def test_killed_worker_recovers_exactly_and_resubmission_resumes(cluster, storage):
    ref_dir = storage / "e2e"  # the uninterrupted reference: same training settings, seed and data
    if not (ref_dir / "summary.json").exists():
        pytest.fail("needs the run of test_ray_job_submit_end_to_end as its uninterrupted reference")
    ref = summary_of(ref_dir)

    # The same run (checkpointing more often does not change the numbers), one worker killed by PID as soon as
    # the checkpoint at step 5 is committed (its directory appears complete, by rename).
    proc = subprocess.Popen(train_cmd(storage, "exact-kill", "train.max_steps=40", "train.checkpoint_every=5",
                                      "train.eval_every=0", "train.sample_every=0", "scale.max_failures=2"),
                            env=driver_env(cluster), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    run = storage / "exact-kill"
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoint_0000005").is_dir():
            assert proc.poll() is None and time.monotonic() < deadline, "checkpoint 5 never committed"
            time.sleep(0.05)
        pids = train_worker_pids(cluster)
        assert len(pids) == 2, pids
        os.kill(pids[-1], signal.SIGKILL)
        killed_at = max([r["step"] for r in records(run, "train")], default=0)
        output, _ = proc.communicate(timeout=600)
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

    # re-submitted with the same name and more steps: continues from step 40
    more = run_train(cluster, storage, "exact-kill", "train.max_steps=45", "train.eval_every=0",
                     "train.sample_every=0")
    assert more["resumed_from"] == 40 and more["steps"] == 45 and more["steps_this_attempt"] == 5
    assert more["images_seen"] == 45 * 32
    assert [r["step"] for r in records(run, "resume") if not r["restart"]] == [40]


# ------------------------------------------------------------------------------ integrity, divergence, interrupts
def _flip(path: Path, n: int = 16) -> None:
    """Invert ``n`` bytes in the middle of ``path`` (same size: only a checksum can tell)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def _checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith(("checkpoint_", ".checkpoint_")))


def test_damaged_checkpoint_refused_resume_falls_back_and_divergence_stops(cluster, storage, tmp_path):
    """A flipped checkpoint file is refused by evaluate and export, naming it; a resume falls back to the
    previous checkpoint and says so; a refused resume keeps config.yaml; a diverged run stops at once (no
    retries), exit 1, keeping the last finite checkpoint."""
    from dbgen import evaluate, export

    run = storage / "integrity"
    run_train(cluster, storage, "integrity", "train.max_steps=10", "train.checkpoint_every=5",
              "train.eval_every=0", "train.sample_every=0")
    assert _checkpoints(run) == ["checkpoint_0000005", "checkpoint_0000010"]
    damaged = run / "checkpoint_0000010" / "ds" / "mp_rank_00_model_states.pt"
    _flip(damaged)

    for cli, argv in ((evaluate, ["--run", str(run), "--max-batches", "1"]),
                      (export, ["--run", str(run), "--out", str(tmp_path / "x.dbgen")])):
        proc = subprocess.run([sys.executable, "-m", cli.__name__, *argv], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and f"{damaged}: sha256 does not match" in proc.stderr, (cli, proc.stderr)
    assert not (tmp_path / "x.dbgen").exists()

    config_before = (run / "config.yaml").read_text()
    refused = subprocess.run(train_cmd(storage, "integrity", "model.width=8"), env=driver_env(cluster), cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "another model" in refused.stderr and "model.width: " in refused.stderr
    assert (run / "config.yaml").read_text() == config_before

    out = subprocess.run(train_cmd(storage, "integrity", "train.max_steps=12", "train.checkpoint_every=5",
                                   "train.eval_every=0", "train.sample_every=0"),
                         env=driver_env(cluster), cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    log = out.stdout + out.stderr
    assert "not resuming from checkpoint_0000010" in log and "mp_rank_00_model_states.pt: sha256" in log
    assert "resuming from checkpoint_0000005, step 5" in log
    assert summary_of(run)["resumed_from"] == 5 and summary_of(run)["steps"] == 12
    assert [r["step"] for r in records(run, "resume") if not r["restart"]][-1] == 5  # what the workers restored
    assert _checkpoints(run) == ["checkpoint_0000010", "checkpoint_0000012"]  # 10 rewritten whole
    assert evaluate.main(["--run", str(run / "checkpoint_0000010"), "--max-batches", "1"]) == 0  # intact again

    start, workers_before = time.monotonic(), len(train_worker_actors(cluster))
    diverged = subprocess.run(train_cmd(storage, "integrity", "train.max_steps=200", "train.checkpoint_every=2",
                                        "train.keep_checkpoints=1", "train.max_bad_steps=4", "train.log_every=1",
                                        "optimizer.lr=1e6", "schedule.min_lr=1e6", "scale.max_failures=3",
                                        "train.eval_every=0", "train.sample_every=0"),
                              env=driver_env(cluster), cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert diverged.returncode == 1, diverged.stdout[-3000:] + diverged.stderr[-3000:]
    assert "the run diverged: steps" in diverged.stderr and "train.max_bad_steps=4" in diverged.stderr
    assert "Traceback" not in diverged.stderr
    assert len(train_worker_actors(cluster)) - workers_before == 2, "a diverged run was retried"
    assert time.monotonic() - start < 300
    steps = [int(name.rsplit("_", 1)[1]) for name in _checkpoints(run)]
    metas = {s: json.loads((run / f"checkpoint_{s:07d}" / "meta.json").read_text()) for s in steps}
    assert any(m["finite"] for m in metas.values()), metas.keys()  # the newest finite one is never rotated away


def _ray_processes(marker: str) -> list[int]:
    """PIDs whose command line mentions ``marker`` (a Ray temp dir unique to one test)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_sigint_stops_cleanly_and_the_resume_names_the_restored_step(cluster, storage):
    """SIGINT to a driver that started its own local Ray: the workers stop at a step boundary, the driver
    prints where the run resumes and exits 130, keep_checkpoints holds, nothing of that Ray outlives it by more
    than a few seconds; the resume (driver and workers) continues from exactly that checkpoint."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="dbs", dir="/tmp"))  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(ray_tmp)
    run = storage / "interrupted"
    proc = subprocess.Popen(train_cmd(storage, "interrupted", "train.max_steps=2000", "train.checkpoint_every=3",
                                      "train.keep_checkpoints=2", "train.log_every=1", "train.eval_every=0",
                                      "train.sample_every=0"),
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoint_0000009").is_dir():
            assert proc.poll() is None and time.monotonic() < deadline, "checkpoint 9 never committed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    try:
        assert proc.returncode == 130, out[-2000:] + err[-4000:]
        hint = re.search(r"interrupted: stopped at step (\d+); the same command resumes run interrupted from "
                         r"checkpoint_(\d+) \(step (\d+)\)", err)
        assert hint, err[-4000:]
        stopped, resume_at = int(hint.group(1)), int(hint.group(3))
        assert resume_at % 3 == 0 and 9 <= resume_at <= stopped < 2000
        assert "Traceback" not in err and "Broken pipe" not in err
        names = _checkpoints(run)
        assert len(names) == 2 and names[-1] == f"checkpoint_{resume_at:07d}", names  # no partial left behind
        deadline = time.monotonic() + 10
        while _ray_processes(str(ray_tmp)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _ray_processes(str(ray_tmp)), "Ray processes outlived the interrupted driver"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    summary = run_train(cluster, storage, "interrupted", f"train.max_steps={resume_at + 2}", "train.log_every=1",
                        "train.eval_every=0", "train.sample_every=0")
    assert summary["resumed_from"] == resume_at and summary["steps"] == resume_at + 2
    assert [r["step"] for r in records(run, "resume")][-1] == resume_at


def test_corrupt_shard_fails_at_once_naming_it(cluster, storage, tmp_path):
    """Damaged pixel data in one training shard: the run fails on the first attempt (not retried
    scale.max_failures times), exit 1, naming the shard."""
    from dbgen.data import resolve_split

    split = tmp_path / "train"
    shutil.copytree(resolve_split("builtin:photos32", "train"), split)
    shard = sorted(split.glob("*.parquet"))[0]
    _flip(shard, n=64)
    start, workers_before = time.monotonic(), len(train_worker_actors(cluster))
    out = subprocess.run(train_cmd(storage, "corrupt-shard", f"data.train={split}", "data.eval=null",
                                   "train.max_steps=30", "scale.max_failures=3", "train.sample_every=0"),
                         env=driver_env(cluster), cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "error: training failed:" in out.stderr and shard.name in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert len(train_worker_actors(cluster)) - workers_before == 2, "a corrupt shard was retried"
    assert time.monotonic() - start < 300
