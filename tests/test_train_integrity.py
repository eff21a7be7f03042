"""Integrity, divergence and interrupts of a real run (issue 19): ``python -m dbgen.train`` drivers against a
throwaway Ray cluster of this module's own (tests/ray_cluster.py), real DeepSpeed, CPU, the tiny binary RVAE.

* a flipped checkpoint file: evaluate on the run falls back to the checkpoint a resume takes, naming the file;
  export of that checkpoint by name refuses it; a resume falls back to the previous checkpoint and says so; a
  refused resume keeps config.yaml; a diverged run stops at once with exit 1;
* drivers with their own local Ray on one run: a second driver on a running run exits 2 naming the first;
  SIGINT: exit 130, a resume line, keep_checkpoints held, no Ray process left; the resume continues from
  exactly the step it named; SIGKILL: every process of its Ray session is gone within 15 s, and the next driver
  takes over its lease;
* a full disk: one error line (path, what, free space, resume point), no retry, nothing committed damaged;
* a damaged training shard: exit 1 on the first attempt, naming the shard.
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
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import test_train_cluster  # noqa: E402
from limits import patience  # noqa: E402
from test_train_cluster import ROOT, driver_env, records, run_train, summary_of, train_cmd, train_worker_actors  # noqa: E402

pytestmark = pytest.mark.slow

# The loader is not under test here (tests/test_data_ray.py and test_train_cluster's Ray Data runs cover it): the
# in-process Arrow loader saves each run Ray Data's start-up (about 7 CPU-seconds of a tiny run's 30).
ARROW = "data.loader=arrow"

# The same module-scoped fixtures as test_train_cluster's: this module gets a cluster (and a storage) of its own.
cluster = test_train_cluster.cluster
storage = test_train_cluster.storage


# ------------------------------------------------------------------------------ integrity, divergence, interrupts
def _flip(path: Path, n: int = 16) -> None:
    """Invert ``n`` bytes in the middle of ``path`` (same size: only a checksum can tell)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + n] = bytes(b ^ 0xFF for b in data[mid : mid + n])
    path.write_bytes(bytes(data))


def _checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith(("checkpoint_", ".checkpoint_")))


def test_damaged_checkpoint_refused_resume_falls_back_and_divergence_stops(cluster, storage, tmp_path):
    """A flipped checkpoint file is passed over by evaluate and refused by export, naming it; a resume falls
    back to the previous checkpoint and says so; a refused resume keeps config.yaml; a diverged run stops at
    once (no retries), exit 1, keeping the last finite checkpoint."""
    from dbgen import evaluate, export

    run = storage / "integrity"
    run_train(
        cluster,
        storage,
        "integrity",
        ARROW,
        "train.max_steps=4",
        "train.checkpoint_every=2",
        "train.eval_every=0",
        "train.sample_every=0",
    )
    assert _checkpoints(run) == ["checkpoint_0000002", "checkpoint_0000004"]
    damaged = run / "checkpoint_0000004" / "ds" / "mp_rank_00_model_states.pt"
    _flip(damaged)

    # evaluate on the run takes what a resume takes (checkpoint 2), naming the damaged file it passed over;
    # export of the damaged checkpoint by name refuses it, naming the file, and writes nothing
    ev = subprocess.run(
        [sys.executable, "-m", evaluate.__name__, "--run", str(run), "--max-batches", "1", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=patience(600),
    )
    assert ev.returncode == 0 and f"{damaged}: sha256 does not match" in ev.stderr, ev.stderr[-3000:]
    assert json.loads(ev.stdout.strip().splitlines()[-1])["step"] == 2
    ex = subprocess.run(
        [sys.executable, "-m", export.__name__, "--run", str(damaged.parents[1]), "--out", str(tmp_path / "x.dbgen")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=patience(600),
    )
    assert ex.returncode == 2 and f"{damaged}: sha256 does not match" in ex.stderr, ex.stderr[-3000:]
    assert not (tmp_path / "x.dbgen").exists()

    config_before = (run / "config.yaml").read_text()
    refused = subprocess.run(
        train_cmd(storage, "integrity", ARROW, "model.width=8"),
        env=driver_env(cluster),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=patience(600),
    )
    assert refused.returncode == 2 and "another model" in refused.stderr and "model.width: " in refused.stderr
    assert (run / "config.yaml").read_text() == config_before

    out = subprocess.run(
        train_cmd(
            storage,
            "integrity",
            ARROW,
            "train.max_steps=5",
            "train.checkpoint_every=2",
            "train.eval_every=0",
            "train.sample_every=0",
        ),
        env=driver_env(cluster),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=patience(900),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    log = out.stdout + out.stderr
    assert "passing over checkpoint_0000004" in log and "mp_rank_00_model_states.pt: sha256" in log
    assert "resuming from checkpoint_0000002, step 2" in log
    assert summary_of(run)["resumed_from"] == 2 and summary_of(run)["steps"] == 5
    assert [r["step"] for r in records(run, "resume") if not r["restart"]][-1] == 2  # what the workers restored
    assert _checkpoints(run) == ["checkpoint_0000004", "checkpoint_0000005"]  # 4 rewritten whole
    assert evaluate.main(["--run", str(run / "checkpoint_0000004"), "--max-batches", "1"]) == 0  # intact again

    start, workers_before = time.monotonic(), len(train_worker_actors(cluster))
    diverged = subprocess.run(
        train_cmd(
            storage,
            "integrity",
            ARROW,
            "train.max_steps=200",
            "train.checkpoint_every=2",
            "train.keep_checkpoints=1",
            "train.max_bad_steps=3",
            "train.log_every=1",
            "optimizer.lr=1e6",
            "schedule.min_lr=1e6",
            "scale.max_failures=3",
            "train.eval_every=0",
            "train.sample_every=0",
        ),
        env=driver_env(cluster),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=patience(900),
    )
    assert diverged.returncode == 1, diverged.stdout[-3000:] + diverged.stderr[-3000:]
    assert "the run diverged: steps" in diverged.stderr and "train.max_bad_steps=3" in diverged.stderr
    assert "Traceback" not in diverged.stderr
    assert len(train_worker_actors(cluster)) - workers_before == 2, "a diverged run was retried"
    assert time.monotonic() - start < 900  # the retries are counted above; this bounds a hang
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


def _process_tree(root: int) -> set[int]:
    """``root`` and its descendants now, from ``ps`` (independent of dbgen's own /proc walk)."""
    children: dict[int, list[int]] = {}
    for line in subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.splitlines():
        pid, ppid = map(int, line.split())
        children.setdefault(ppid, []).append(pid)
    found, stack = set(), [root]
    while stack:
        pid = stack.pop()
        found.add(pid)
        stack.extend(children.get(pid, []))
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _local_driver(storage, name: str, ray_tmp: Path, *overrides) -> subprocess.Popen:
    """``python -m dbgen.train`` starting its own local Ray (no ``RAY_ADDRESS``) under ``ray_tmp``."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(ray_tmp)
    return subprocess.Popen(
        train_cmd(storage, name, ARROW, "train.max_steps=2000", "train.log_every=1", *overrides),
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 900) -> None:
    """Until ``condition()``, while ``proc`` runs; the deadline is generous: a loaded 2-core machine (load
    average 60) is ten times slower than an idle one."""
    timeout = patience(timeout)
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the driver exited with {proc.returncode} before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.05)


def _trained_since_resume(run: Path) -> bool:
    """Whether ``metrics.jsonl`` holds a resume record followed by a training step."""
    order = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            order.append(json.loads(line)["kind"])
        except ValueError:  # a line being appended right now
            continue
    return "resume" in order and "train" in order[order.index("resume") :]


def test_interrupts_and_one_driver_per_run(cluster, storage):
    """Drivers that start their own local Ray, on one run:

    1. A trains; B on the same run exits 2 within seconds naming A (before any worker, writing nothing);
    2. SIGINT to A: the workers stop at a step boundary, A prints where the run resumes and exits 130,
       keep_checkpoints holds, nothing of A's Ray outlives it by more than a few seconds;
    3. C resumes from exactly that step; kill -9 of C: within 15 s every process of C's Ray session (head
       processes, agents, Train workers, the watchdog) is gone, checked PID by PID;
    4. D takes over C's stale lease with one log line and finishes from the same checkpoint."""
    run = storage / "interrupted"
    common = ("train.checkpoint_every=2", "train.keep_checkpoints=2", "train.eval_every=0", "train.sample_every=0")
    ray_a = Path(tempfile.mkdtemp(prefix="dbs", dir="/tmp"))  # short: Ray's socket paths live under it
    proc = _local_driver(storage, "interrupted", ray_a, *common)
    try:
        _wait_for(lambda: (run / "checkpoint_0000006").is_dir(), proc, "checkpoint 6")
        second_start = time.monotonic()
        second = subprocess.run(
            train_cmd(storage, "interrupted", ARROW, "train.max_steps=2000", *common),
            env=driver_env(cluster),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=patience(600),
        )
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"error: run interrupted is in use by PID {proc.pid} on " in second.stderr, second.stderr[-3000:]
        # refused before Ray or a worker starts: ~5 s idle; the bound leaves room for a loaded machine
        assert "--takeover" in second.stderr and time.monotonic() - second_start < 90
        assert not records(run, "resume")  # B started no worker

        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=patience(600))
    finally:
        if proc.poll() is None:
            proc.kill()
    try:
        assert proc.returncode == 130, out[-2000:] + err[-4000:]
        hint = re.search(
            r"interrupted: stopped at step (\d+); the same command resumes run interrupted from "
            r"checkpoint_(\d+) \(step (\d+)\)",
            err,
        )
        assert hint, err[-4000:]
        stopped, resume_at = int(hint.group(1)), int(hint.group(3))
        assert resume_at % 2 == 0 and 6 <= resume_at <= stopped < 2000
        assert "Traceback" not in err and "Broken pipe" not in err
        names = _checkpoints(run)
        assert len(names) == 2 and names[-1] == f"checkpoint_{resume_at:07d}", names  # no partial left behind
        deadline = time.monotonic() + 10
        while _ray_processes(str(ray_a)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _ray_processes(str(ray_a)), "Ray processes outlived the interrupted driver"
    finally:
        shutil.rmtree(ray_a, ignore_errors=True)

    ray_c = Path(tempfile.mkdtemp(prefix="dbk", dir="/tmp"))
    killed = _local_driver(storage, "interrupted", ray_c, "train.checkpoint_every=1000", *common[1:])
    try:
        _wait_for(lambda: _trained_since_resume(run), killed, "a step after resuming")
        assert [r["step"] for r in records(run, "resume")][-1] == resume_at  # what C's workers restored
        session = _process_tree(killed.pid) - {killed.pid}
        assert len(session) >= 5, session  # Ray's head processes, agents and the Train workers
        killed.kill()
        killed.wait(timeout=10)
        killed_at = time.monotonic()
        left = session
        while left and time.monotonic() - killed_at < 15:
            time.sleep(0.2)
            left = {pid for pid in left if _running(pid)}
        names = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:80] for pid in left if _running(pid)}
        assert not left, f"{len(left)} of {len(session)} processes outlived the killed driver by 15 s: {names}"
    finally:
        if killed.poll() is None:
            killed.kill()
        killed.communicate()
        shutil.rmtree(ray_c, ignore_errors=True)

    resumed = subprocess.run(
        train_cmd(storage, "interrupted", ARROW, f"train.max_steps={resume_at + 1}", "train.log_every=1", *common[2:]),
        env=driver_env(cluster),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=patience(900),
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    takeovers = [line for line in resumed.stderr.splitlines() if "taking over the lease" in line]
    assert len(takeovers) == 1 and f"PID {killed.pid} on " in takeovers[0], resumed.stderr[-3000:]
    summary = summary_of(run)
    assert summary["resumed_from"] == resume_at and summary["steps"] == resume_at + 1
    assert summary["steps_this_attempt"] == 1 and summary["images_seen"] == (resume_at + 1) * 32
    assert [r["step"] for r in records(run, "resume")][-1] == resume_at


@pytest.fixture
def small_disk():
    """A 2 MiB tmpfs made for the test and removed after it (root only): room for two checkpoints of the tiny
    RVAE (~0.8 MB each), not three."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = Path(tempfile.mkdtemp(prefix="dbd", dir="/tmp"))
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if made.returncode != 0:
        mount.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)
        mount.rmdir()


def test_a_full_disk_stops_the_run_with_one_line_keeping_what_was_committed(cluster, small_disk):
    """A run whose storage fills up: a warning at start, then one error line (path, what, free space, where the
    run resumes), exit 1 without a retry; no partial checkpoint left, every committed checkpoint verifies and
    every metrics line is whole."""
    from dbgen.rundir import checkpoint_dirs, read_meta, verify_checkpoint

    run = small_disk / "full"
    workers_before = len(train_worker_actors(cluster))
    out = subprocess.run(
        train_cmd(
            small_disk,
            "full",
            ARROW,
            "train.max_steps=40",
            "train.checkpoint_every=2",
            "train.keep_checkpoints=10",
            "train.log_every=1",
            "train.eval_every=0",
            "train.sample_every=0",
            "scale.max_failures=3",
        ),
        env=driver_env(cluster),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=patience(900),
    )
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "a checkpoint may fail for lack of space" in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    found = re.fullmatch(
        rf"error: training failed: disk full at {run}/\S+ while writing (\S+) \((\d+\.\d) MiB free\); the same "
        rf"command resumes run full from checkpoint_(\d+) \(step (\d+)\) once there is space",
        errors[0],
    )
    assert found, errors[0]
    assert len(train_worker_actors(cluster)) - workers_before == 2, "a full disk was retried"
    committed = checkpoint_dirs(run)
    assert committed and committed[0].name == f"checkpoint_{found.group(3)}"  # the newest one is the resume point
    for ckpt in committed:
        verify_checkpoint(ckpt, read_meta(ckpt))
    assert not list(run.glob(".checkpoint_*.partial"))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert lines and all(json.loads(line) for line in lines)


def test_corrupt_shard_fails_at_once_naming_it(cluster, storage, tmp_path):
    """Damaged pixel data in one training shard: the run fails on the first attempt (not retried
    scale.max_failures times), exit 1, naming the shard."""
    from dbgen.data import resolve_split

    split = tmp_path / "train"
    shutil.copytree(resolve_split("builtin:photos32", "train"), split)
    shard = sorted(split.glob("*.parquet"))[0]
    _flip(shard, n=64)
    start, workers_before = time.monotonic(), len(train_worker_actors(cluster))
    out = subprocess.run(
        train_cmd(
            storage,
            "corrupt-shard",
            ARROW,
            f"data.train={split}",
            "data.eval=null",
            "train.max_steps=30",
            "scale.max_failures=3",
            "train.sample_every=0",
        ),
        env=driver_env(cluster),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=patience(900),
    )
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "error: training failed:" in out.stderr and shard.name in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert len(train_worker_actors(cluster)) - workers_before == 2, "a corrupt shard was retried"
    assert time.monotonic() - start < 900  # the retries are counted above; this bounds a hang
