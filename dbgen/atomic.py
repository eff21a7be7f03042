"""Atomic file writes: the one way dbgen writes a whole file (run and checkpoint metadata, summaries, metrics
rewrites, packed artifacts, sample grids, data-set manifests, benchmark results).

A reader sees the old file or the new one, never a part: the bytes go to a temporary file in the same
directory (``.<name>.<random>.tmp``), are flushed to disk, and the temporary file is renamed over the target;
the directory is synced so the rename itself survives a crash. :func:`sha256_file` is the one file checksum
(data shards, checkpoints, caches). Standard library only: the data converters use it and import no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

__all__ = ["TMP_SUFFIX", "fsync_dir", "sha256_file", "write_atomic", "write_json_atomic"]

TMP_SUFFIX = ".tmp"  # a leftover ``.<name>.<random>.tmp`` is an interrupted write


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` (str: UTF-8) to ``path`` atomically, creating missing parent directories; mode 0644."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_json_atomic(path: str | Path, obj) -> Path:
    """``obj`` as indented JSON with a final newline, written with :func:`write_atomic`."""
    return write_atomic(path, json.dumps(obj, indent=2) + "\n")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | Path, sync: bool = False) -> str:
    """The file's sha256 (hex). ``sync``: also flush the file to disk, for a checksum recorded as proof of what
    was written (a checksum of bytes not yet on disk proves little)."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        if sync:
            os.fsync(f.fileno())
    return digest
