"""Connecting to Ray: the cluster in ``RAY_ADDRESS`` (set by ``ray job submit``), else a local one on loopback."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from . import ray_watchdog

__all__ = ["connect_ray", "init_ray"]


def init_ray(**kwargs) -> str:
    """Join ``RAY_ADDRESS`` if set, else start a single-node Ray whose processes all bind to 127.0.0.1.

    Ray resolves 127.0.0.1 to the host's primary interface address unless its multi-node mode is off
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``); a local Ray started here is single-node, so it is switched off
    before Ray starts and every process it spawns inherits that. Returns a description for the log.
    """
    import ray  # here: importing Ray takes seconds; callers decide when they need it

    if ray.is_initialized():
        return "already connected"
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(**kwargs)
        return f"connected to {address}"
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    before = _own_descendants()
    ctx = ray.init(address="local", **kwargs)
    _start_watchdog(sorted(set(_own_descendants()) - set(before)))
    return f"started a local Ray on 127.0.0.1 (dashboard {ctx.dashboard_url or 'off'})"


# Write ends of the watchdogs' pipes: held, never written, until this process exits (however it ends).
_watchdog_pipes: list[int] = []


def _own_descendants() -> dict[int, int]:
    if not sys.platform.startswith("linux"):
        return {}
    me = os.getpid()
    return {pid: start for pid, start in ray_watchdog.descendants(ray_watchdog.alive_roots([me])).items() if pid != me}


def _start_watchdog(roots: list[int]) -> None:
    """Start :mod:`dbgen.ray_watchdog` over the head processes ``roots`` that ``ray.init`` just started: when
    this process ends, even by SIGKILL, the watchdog kills every process of that Ray session."""
    if not roots:
        return
    read_end, write_end = os.pipe()  # not inheritable: only this process holds the write end
    try:
        subprocess.Popen(
            [sys.executable, str(Path(ray_watchdog.__file__)), *map(str, roots)],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # outside the driver's process group: a Ctrl-C to it must not stop this
        )
    finally:
        os.close(read_end)
    _watchdog_pipes.append(write_end)


def connect_ray(verbose: bool = False) -> str:
    """What the CLIs call (the training driver, ``evaluate --workers``): :func:`init_ray` with the dashboard on
    127.0.0.1. Returns a description.

    Unless ``verbose``, the workers' output (DeepSpeed, Ray Train's per-rank reports, Ray Data's progress bars)
    stays in Ray's log files instead of streaming to this console, and Ray's driver-side logger shows errors
    only (not, e.g., its notice that token auth is on)."""
    return init_ray(
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.ERROR,
    )
