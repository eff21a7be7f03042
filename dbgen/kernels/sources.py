"""What the CUDA and the CPU kernels share: where their shipped sources are, where built libraries are cached,
and the error raised when a kernel cannot be had.

The sources live in the repository's top-level ``kernels/`` folder, installed inside the package as
``dbgen._kernels_src`` (so a wheel or ``pip install .`` can build them); ``$DBGEN_KERNELS_SRC`` (a folder or a
file) points elsewhere. Built libraries are cached under ``$DBGEN_KERNEL_CACHE`` (default
``~/.cache/dbgen/kernels``), keyed by a hash of what built them.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
import subprocess
import tempfile
from pathlib import Path

__all__ = ["SOURCE_PACKAGE", "KernelUnavailable", "build_shared_library", "cache_dir", "kernel_source"]

log = logging.getLogger(__name__)

SOURCE_PACKAGE = "dbgen._kernels_src"  # the top-level kernels/ folder, installed inside the package


class KernelUnavailable(RuntimeError):
    """A kernel library cannot be used here; the message says what is missing and how to fall back."""


def _installed_source_dir() -> Path:
    """The folder of the sources shipped in the package (``kernels/`` installed as ``dbgen._kernels_src``).

    A checkout run without an install (the repository on ``PYTHONPATH``, as on a bare GPU machine) has no
    such package: there the sources are the checkout's own ``kernels/`` folder, the one that package maps.
    """
    try:
        return Path(importlib.resources.files(SOURCE_PACKAGE))  # a regular package on disk: a Path already
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "kernels"


def kernel_source(name: str) -> Path:
    """Path of the kernel source file ``name``: in ``$DBGEN_KERNELS_SRC`` (a folder, or the file itself), else
    the copy installed with dbgen. Raises :class:`KernelUnavailable` naming where it looked."""
    env = os.environ.get("DBGEN_KERNELS_SRC")
    path = Path(env) if env else _installed_source_dir() / name
    if path.is_dir():
        path = path / name
    elif path.name != name:  # $DBGEN_KERNELS_SRC names another kernel's file: the sources are its siblings
        path = path.parent / name
    if not path.is_file():
        raise KernelUnavailable(
            f"kernel source not found at {path} (reinstall dbgen, whose package ships {SOURCE_PACKAGE}/{name}; "
            f"or set DBGEN_KERNELS_SRC to the kernels/ folder of the dbgen repository; or use "
            f"DBGEN_KERNELS=reference)"
        )
    return path


def cache_dir() -> Path:
    """Where built kernel libraries are kept: ``$DBGEN_KERNEL_CACHE``, default ``~/.cache/dbgen/kernels``."""
    return Path(os.environ.get("DBGEN_KERNEL_CACHE", Path.home() / ".cache" / "dbgen" / "kernels"))


def build_shared_library(
    compiler: str, flags: list[str], src: Path, name: str, folder: str, out_dir: Path | None = None
) -> tuple[Path, str | None]:
    """``src`` compiled by ``compiler flags -o LIB src`` into ``LIB = <out_dir>/<name>``, by default
    ``cache_dir()/<folder>-<key>`` with ``key`` a hash of the source, the compiler's ``--version`` and the flags.
    Returns ``(LIB, the compiler's stderr)``, the stderr None when LIB was built before. The build writes a
    temporary name and renames it: concurrent processes at worst build twice, and never load half a library.
    Raises :class:`KernelUnavailable` with the compiler's error."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(src.read_bytes() + version.encode() + " ".join(flags).encode()).hexdigest()[:16]
    out_dir = Path(out_dir) if out_dir is not None else cache_dir() / f"{folder}-{key}"
    lib_path = out_dir / name
    if lib_path.is_file():
        return lib_path, None
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [compiler, *flags, "-o", tmp, str(src)]
    log.info("building %s: %s", name, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise KernelUnavailable(f"{compiler} failed building {src} (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    os.replace(tmp, lib_path)
    return lib_path, proc.stderr
