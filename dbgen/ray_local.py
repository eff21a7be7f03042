"""Connecting to Ray: the cluster in ``RAY_ADDRESS`` (set by ``ray job submit``), else a local one on loopback."""

from __future__ import annotations

import logging
import os

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
    ctx = ray.init(address="local", **kwargs)
    return f"started a local Ray on 127.0.0.1 (dashboard {ctx.dashboard_url or 'off'})"


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
