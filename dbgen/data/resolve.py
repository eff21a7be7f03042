"""Where a data spec's rows live: ``builtin:NAME``, a data set root or a split directory -> a validated split.

One level above the split format (:mod:`dbgen.data.split`) and the built-in data set (:mod:`dbgen.data.builtin`,
which writes splits): the split reader never builds data, and resolving a spec may.
"""

from __future__ import annotations

from pathlib import Path

from .builtin import builtin
from .split import MANIFEST, SPLITS, DataError, open_split

__all__ = ["resolve_split"]


def resolve_split(spec: str | Path, split: str = "train", verify: bool = False) -> Path:
    """Where the rows of ``spec`` live: a validated split directory.

    ``spec`` is a converted split directory (it holds ``manifest.json``), a directory holding one per split
    (``spec/train``, ``spec/test``), or ``builtin:NAME`` (e.g. ``builtin:photos32``), which is built into the
    cache (``$DBGEN_CACHE`` or ``~/.cache/dbgen``) on first use. ``split`` is ``"train"`` or ``"test"``; it
    picks the subdirectory or the built-in split and is ignored for a split directory given directly.
    Raises :class:`DataError` naming the path when the split is missing, incomplete or inconsistent.
    """
    if split not in SPLITS:
        raise DataError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    spec = str(spec)
    if spec.startswith("builtin:"):
        path = builtin(spec.removeprefix("builtin:"))[split]
    else:
        path = Path(spec).expanduser()
        if not (path / MANIFEST).exists() and (path / split).is_dir():
            path = path / split
    return open_split(path, verify=verify).path
