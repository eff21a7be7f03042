"""The watchdog of a local Ray that a dbgen driver started: nothing of it outlives the driver.

Ray starts its head processes (GCS, raylet, dashboard, monitors) as children of the driver that kill themselves
when the driver dies (``PR_SET_PDEATHSIG``), but what those start in turn (the dashboard and runtime-env agents,
the workers, and whatever the workers started) only notice later: after a ``kill -9`` of the driver, the agents
were seen holding memory and ports for 90 s and more while they retried a dead GCS.

:func:`dbgen.ray_local.init_ray` starts this file as a separate process, in a session of its own (so the
terminal's Ctrl-C or a signal to the driver's process group does not reach it), with the head processes' PIDs on
its command line and the read end of a pipe as stdin, whose write end only the driver holds. While the driver
lives it records, every :data:`POLL_S`, every descendant of those head processes (PID and start time). When the
pipe reaches end of file (the driver exited, however it died) it SIGKILLs every recorded process still running
(matched by start time, so a reused PID is never hit), and exits. It also exits when everything it records has
ended on its own (``ray.shutdown()`` in a long-lived driver).

It runs as a script by path (``python .../ray_watchdog.py``), not as ``-m dbgen.ray_watchdog``: standard library
only, so that it does not import the dbgen package, torch or Ray.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

POLL_S = 1.0
KILL_DEADLINE_S = 10.0


def _stat(pid: int) -> tuple[int, int] | None:
    """``(parent PID, start time in clock ticks)`` of ``pid``, or None when it has ended (zombies included)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[1]), int(fields[19])


def descendants(roots: dict[int, int]) -> dict[int, int]:
    """``{pid: start time}`` of the live processes in ``roots`` (``{pid: start time}``) and of all their
    descendants, read from ``/proc``."""
    children: dict[int, list[tuple[int, int]]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                children.setdefault(st[0], []).append((int(name), st[1]))
    found = alive(roots)
    stack = list(found)
    while stack:
        for pid, start in children.get(stack.pop(), ()):
            if pid not in found:
                found[pid] = start
                stack.append(pid)
    return found


def process_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, None when it is not running: with the PID, it names one
    process (a PID alone may be reused)."""
    st = _stat(pid)
    return None if st is None else st[1]


def alive_roots(pids: list[int]) -> dict[int, int]:
    """``{pid: start time}`` of those of ``pids`` that run now."""
    return {pid: st[1] for pid in pids if (st := _stat(pid)) is not None}


def alive(tracked: dict[int, int]) -> dict[int, int]:
    """The processes of ``tracked`` that still run (same PID and same start time)."""
    out = {}
    for pid, start in tracked.items():
        st = _stat(pid)
        if st is not None and st[1] == start:
            out[pid] = start
    return out


def kill_all(tracked: dict[int, int]) -> None:
    """SIGKILL every tracked process and what it started since, until none runs (bounded by a deadline)."""
    deadline = time.monotonic() + KILL_DEADLINE_S
    while True:
        left = descendants(tracked)
        if not left or time.monotonic() > deadline:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        tracked = left
        time.sleep(0.05)


def watch(roots: list[int]) -> None:
    tracked = alive_roots(roots)
    while True:
        tracked = descendants(tracked)
        readable, _, _ = select.select([sys.stdin.buffer], [], [], POLL_S)
        if readable and not os.read(sys.stdin.fileno(), 4096):  # end of file: the driver has exited
            kill_all(tracked)
            return
        if not tracked:  # the Ray session ended by itself (ray.shutdown()); nothing left to guard
            return


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the end of the driver's pipe ends this process
    watch([int(pid) for pid in sys.argv[1:]])
