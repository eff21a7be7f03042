"""What the host must give a run, and the error when it does not: a free metrics port, disk space.

A taken port or a full disk fails the same way on every retry, so :class:`HostResourceError` is fatal
(:data:`dbgen.failures.FATAL_ERRORS`): the run stops at once with one line naming the key or path, what was
wanted and how the run goes on, instead of a traceback retried ``scale.max_failures`` times.
"""

from __future__ import annotations

import errno
import shutil
import socket
from pathlib import Path

__all__ = ["DISK_FULL", "HostResourceError", "disk_full_error", "free_bytes", "port_taken_error"]

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class HostResourceError(RuntimeError):
    """The host lacks what the run needs (a free port, disk space); the message says which and how to go on."""


def port_taken_error(port: int, rank: int, base_port: int) -> HostResourceError:
    return HostResourceError(
        f"train.metrics_port={base_port}: port {port} (train.metrics_port + rank {rank}) on 127.0.0.1 of host "
        f"{socket.gethostname()} is already in use; rank r serves on train.metrics_port + r, so choose a "
        f"train.metrics_port with {rank + 1} or more free ports from it, or stop what holds port {port}"
    )


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent); None if unknown."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def disk_full_error(path: str | Path, what: str, resume: str) -> HostResourceError:
    """The one-line error for ENOSPC/EDQUOT while writing ``what`` at ``path``; ``resume`` says where the run
    resumes from once there is space."""
    free = free_bytes(path)
    left = "unknown" if free is None else f"{free / 2**20:.1f} MiB"
    return HostResourceError(f"disk full at {path} while writing {what} ({left} free); {resume} once there is space")
