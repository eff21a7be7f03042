"""What the host must give a run, and the error when it does not: a free metrics port, disk space.

A taken port or a full disk fails the same way on every retry, so :class:`HostResourceError` is fatal
(:data:`dbgen.failures.FATAL_ERRORS`): the run stops at once with one line naming the key or path, what was
wanted and how the run goes on, instead of a traceback retried ``scale.max_failures`` times.
"""

from __future__ import annotations

import errno
import shutil
import socket
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "DISK_FULL",
    "HostResourceError",
    "disk_full_error",
    "disk_full_is_fatal",
    "free_bytes",
    "port_taken_error",
]

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


LOW_WATER = 1 << 20  # a write that failed with less than this free on its file system failed for lack of space


def _is_disk_full(error: BaseException, path: Path) -> bool:
    if isinstance(error, OSError) and error.errno in DISK_FULL:
        return True
    # torch.save's stream writer reports a failed write as a RuntimeError that carries no errno
    free = free_bytes(path)
    return isinstance(error, OSError | RuntimeError) and free is not None and free < LOW_WATER


@contextmanager
def disk_full_is_fatal(path: str | Path, what: str, resume: Callable[[], str]):
    """Writes of ``what`` under ``path``: a full disk (ENOSPC, EDQUOT, or a failed write with less than
    :data:`LOW_WATER` free) becomes :func:`disk_full_error` (fatal, one line); other errors pass unchanged.
    ``resume()`` says where the run resumes, e.g. "the same command resumes run r from checkpoint_0000010
    (step 10)"."""
    try:
        yield
    except HostResourceError:
        raise
    except Exception as e:
        if _is_disk_full(e, Path(path)):
            raise disk_full_error(path, what, resume()) from e
        raise
