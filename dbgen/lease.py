"""One driver per run directory: an exclusive lease the training driver holds for the run's whole life.

Two drivers on one run (a ``ray job submit`` sent again while the first job still runs) would both train into
the same directory, interleave checkpoints and delete each other's. So before the driver writes anything it takes
the run's lease, ``<run>/.lease``:

* an ``flock`` on that file (exclusive, not blocking), which the kernel (or the NFS server) releases when the
  process ends, however it ends;
* in the file, the holder: host, PID, process start time, start of the lease, the Ray job id once connected,
  and a heartbeat refreshed every :data:`HEARTBEAT_S` by a thread of the holder.

A second driver finds the ``flock`` held and exits 2 with :class:`RunInUse` (who holds it, since when, where the
lock file is, how to go on). Worker restarts (``scale.max_failures``) happen inside the holder and need no new
lease; ``evaluate``, ``sample`` and ``export`` only read a run and take none.

Stale leases are taken over with one log line:

* the ``flock`` is free (the holder died; on a local file system that is the only case): the file names a
  process that is no longer running (or the file is from an older run), so the new driver takes it;
* the ``flock`` is held, or the file system has no ``flock`` at all, but the holder is on another host and its
  heartbeat is older than :data:`STALE_S` (a dead node on a shared file system whose lock outlives it);
* ``--takeover``: the user knows the holder is gone (refused when the holder is a running process on this host).

An object store has neither ``flock`` nor atomic create-if-absent everywhere; its lease will be this file's
content as an object (holder + heartbeat), taken with a conditional put (``If-None-Match: *`` on S3, a generation
precondition on GCS) and refreshed with a compare-and-swap on its ETag or generation; the heartbeat rule above
then decides staleness.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from .ray_watchdog import process_start

__all__ = ["LEASE_FILE", "RunInUse", "RunLease"]

log = logging.getLogger(__name__)

LEASE_FILE = ".lease"
HEARTBEAT_S = 30.0
STALE_S = 300.0  # a heartbeat this old on another host: its holder is gone (10 missed heartbeats)


class RunInUse(RuntimeError):
    """Another live driver holds the run's lease; the message names it and says how to go on."""


def _running_here(holder: dict) -> bool:
    """Whether the holder is a process on this host that still runs (the same PID and the same start time)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    start = process_start(holder["pid"])
    return start is not None and start == holder.get("pid_start", start)


class RunLease:
    """The exclusive lease on ``run_dir`` (a context manager; :meth:`release` ends it)."""

    def __init__(self, run_dir: str | Path, *, takeover: bool = False):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LEASE_FILE
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        try:
            self._acquire(takeover)
        except BaseException:
            os.close(self._fd)
            raise
        pid = os.getpid()
        self.holder = {
            "host": socket.gethostname(),
            "pid": pid,
            "pid_start": process_start(pid),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "ray_job_id": None,
            "heartbeat": time.time(),
        }
        self._write()
        self._thread = threading.Thread(target=self._beat, name="dbgen-lease-heartbeat", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ taking
    def _read(self) -> dict:
        try:
            holder = json.loads(os.pread(self._fd, 1 << 16, 0) or b"{}")
        except ValueError:  # written by a process that died mid-write, or not ours
            return {}
        return holder if isinstance(holder, dict) else {}

    def _acquire(self, takeover: bool) -> None:
        holder = self._read()
        if holder.get("released"):  # the last driver ended and let go: nothing to take over
            holder = {}
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if holder:  # free, yet never released: its driver died
                self._taken_over(holder, "it is no longer running")
            return
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                held = True
            elif e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # no flock here: the heartbeat decides
                held = bool(holder) and (_running_here(holder) or not self._expired(holder))
            else:
                raise
        if not held:
            if holder:
                self._taken_over(holder, "its heartbeat stopped")
            return
        if _running_here(holder):
            raise RunInUse(self._in_use(holder))
        if holder.get("host") not in (None, socket.gethostname()) and self._expired(holder):
            self._taken_over(holder, f"its heartbeat is {time.time() - holder['heartbeat']:.0f} s old")
            return
        if takeover:
            self._taken_over(holder, "--takeover")
            return
        raise RunInUse(self._in_use(holder))

    @staticmethod
    def _expired(holder: dict) -> bool:
        beat = holder.get("heartbeat")
        return not isinstance(beat, int | float) or time.time() - beat > STALE_S

    def _in_use(self, holder: dict) -> str:
        who = f"PID {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}" + (
            f", Ray job {holder['ray_job_id']}" if holder.get("ray_job_id") else ""
        )
        return (
            f"run {self.run_dir.name} is in use by {who} ({self.path}); wait for that run to end, use another "
            f"--name, or pass --takeover once that process is known to be gone"
        )

    def _taken_over(self, holder: dict, why: str) -> None:
        log.warning(
            "run %s: taking over the lease of PID %s on %s (since %s): %s",
            self.run_dir.name,
            holder.get("pid", "?"),
            holder.get("host", "?"),
            holder.get("since", "?"),
            why,
        )

    # ------------------------------------------------------------------------------------------ holding
    def _write(self) -> None:
        """The holder record, rewritten in place (not renamed: the ``flock`` is on this file's inode)."""
        data = (json.dumps(self.holder) + "\n").encode()
        with self._lock:
            os.pwrite(self._fd, data, 0)
            os.ftruncate(self._fd, len(data))
            os.fsync(self._fd)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.holder["heartbeat"] = time.time()
            try:
                self._write()
            except OSError as e:  # a full disk must not end the run from here; the next beat tries again
                log.warning("run %s: lease heartbeat not written: %s", self.run_dir.name, e)

    def set_ray_job(self, job_id: str) -> None:
        """Record the Ray job of this driver in the lease (shown to a second driver)."""
        self.holder["ray_job_id"] = job_id
        self._write()

    def release(self) -> None:
        """End the lease: the heartbeat stops, the record says released and the lock is released. The file stays
        (the next driver reads who held the run last, and that it let go)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self.holder["released"] = time.time()
        try:
            self._write()
        finally:
            os.close(self._fd)  # releases the flock

    def __enter__(self) -> RunLease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
