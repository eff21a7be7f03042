"""The run lease (dbgen.lease): one driver per run directory. Real flocks on a real file system; the drivers
themselves on a real local Ray are in tests/test_train_integrity.py."""

import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from dbgen.lease import LEASE_FILE, STALE_S, RunInUse, RunLease


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_lease_on_a_held_run_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "r"
    with RunLease(run) as lease:
        lease.set_ray_job("02000000")
        with pytest.raises(RunInUse) as info:
            RunLease(run)
        message = str(info.value)
        assert f"run r is in use by PID {os.getpid()} on {socket.gethostname()} since " in message
        assert "Ray job 02000000" in message and str(run / LEASE_FILE) in message
        assert "--name" in message and "--takeover" in message
        with pytest.raises(RunInUse):  # the holder runs on this host: --takeover does not break a live lease
            RunLease(run, takeover=True)
    record = json.loads((run / LEASE_FILE).read_text())
    assert record["pid"] == os.getpid() and record["released"] >= record["heartbeat"]


def test_a_released_lease_is_taken_silently_and_a_dead_holders_with_one_line(tmp_path, caplog):
    run = tmp_path / "r"
    caplog.set_level(logging.WARNING, logger="dbgen.lease")
    RunLease(run).release()
    RunLease(run).release()
    assert not caplog.records  # an orderly handover is not a takeover
    dead = _dead_pid()
    (run / LEASE_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead, "since": "then"}))
    RunLease(run).release()  # the flock is free: the driver that wrote the record died without releasing
    assert [r.getMessage() for r in caplog.records] == [
        f"run r: taking over the lease of PID {dead} on {socket.gethostname()} (since then): it is no longer running"
    ]


def test_a_lock_held_for_a_node_whose_heartbeat_stopped_is_taken_over(tmp_path, caplog):
    """A shared file system keeps a dead node's lock: its heartbeat decides (fresh: refused; old: taken)."""
    run = tmp_path / "r"
    run.mkdir()
    path = run / LEASE_FILE
    other = {"host": "another-node", "pid": 4242, "since": "then", "heartbeat": time.time()}
    path.write_text(json.dumps(other))
    fd = os.open(path, os.O_RDWR)  # the other node's lock, as the file server still holds it
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(RunInUse, match="PID 4242 on another-node"):
            RunLease(run)
        path.write_text(json.dumps({**other, "heartbeat": time.time() - STALE_S - 1}))
        caplog.set_level(logging.WARNING, logger="dbgen.lease")
        lease = RunLease(run)
        assert "heartbeat is" in caplog.records[-1].getMessage()
        lease.release()
        path.write_text(json.dumps(other))  # fresh heartbeat again: only --takeover takes it
        RunLease(run, takeover=True).release()
        assert caplog.records[-1].getMessage().endswith("--takeover")
    finally:
        os.close(fd)
