"""Writing a split: a stream of records (:class:`Chunk` of good rows, :class:`Bad` inputs) from a
:class:`Source` becomes Parquet shards and a ``manifest.json`` (the format of :mod:`dbgen.data.split`).

Every input format (:mod:`dbgen.data.converters`) and the built-in data set (:mod:`dbgen.data.builtin`)
write through :func:`write_split`. Writing is atomic: shards are written as ``*.tmp`` and renamed when
complete, ``manifest.json`` is written last (:func:`dbgen.atomic.write_atomic`). A directory without
``manifest.json`` is not a split; writing into it again removes the writer's leftovers and starts clean, and a
directory holding anything else is refused. An output that cannot be written (a file where a directory is
needed, a read-only file system, no permission) is refused before anything is read (:class:`OutputError`). A
failed conversion into a directory it created removes that directory again if nothing was written. Replacing a
complete split (``overwrite``) never touches it until the new one is complete: the new split is written into a
temporary sibling directory and swapped in (see :func:`_swap_in`); a failure leaves the old split as it was.
Memory stays bounded: rows stream to disk one row group (1024 rows by default) at a time. Shards carry Parquet
page checksums (CRC32 per page), checked by :func:`dbgen.data.split.verify_split`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import TMP_SUFFIX, fsync_dir, sha256_file, write_atomic
from .split import FORMAT_VERSION, MANIFEST, DataError, arrow_schema

__all__ = [
    "DEFAULT_ROWS_PER_SHARD",
    "RESIZE_METHOD",
    "ROW_GROUP_ROWS",
    "Bad",
    "Chunk",
    "OutputError",
    "ShardWriter",
    "Source",
    "write_split",
]

log = logging.getLogger(__name__)

ROW_GROUP_ROWS = 1024
DEFAULT_ROWS_PER_SHARD = 16 * ROW_GROUP_ROWS
RESIZE_METHOD = "center square crop, then PIL Image.resize(..., Image.Resampling.BOX)"  # recorded with --resize
_SHARD_RE = re.compile(r"^shard-\d{5}\.parquet(\.tmp)?$")
# An interrupted manifest write: write_atomic's temporary file (or the fixed name earlier versions used).
_MANIFEST_TMP_RE = re.compile(rf"^(\.{re.escape(MANIFEST)}\..+|{re.escape(MANIFEST)}){re.escape(TMP_SUFFIX)}$")


class OutputError(DataError):
    """The split directory cannot be written there (the CLI exits 2); the message names the path."""


# ------------------------------------------------------------------------------------------ records
@dataclass
class Chunk:
    """Good rows: ``images`` (n, R, R, 3) uint8 HWC, ``labels`` (n,), ``sources`` n strings."""

    images: np.ndarray
    labels: np.ndarray
    sources: list[str]


@dataclass
class Bad:
    source: str
    reason: str


@dataclass
class Source:
    """An input data set: ``records()`` yields Chunks and Bads; class names may be filled while iterating."""

    description: dict
    num_classes: int
    class_names: list[str] | None = None
    ignored_files: int = 0
    records: Iterator = field(default=iter(()), repr=False)
    # images stored in another PIL mode and converted to RGB: {mode: {"images": count, "how": what it did}}
    color_conversions: dict[str, dict] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ writing
def _owned(name: str) -> bool:
    """A file the writer writes: a shard, the manifest, or an interrupted write of either."""
    return bool(name == MANIFEST or _SHARD_RE.match(name) or _MANIFEST_TMP_RE.match(name))


def _prepare_out(out: Path) -> None:
    """Make ``out`` (an existing directory without a manifest) empty of our files; refuse to touch anything we
    did not write."""
    names = [p.name for p in out.iterdir()]
    foreign = [n for n in names if not _owned(n)]
    if foreign:
        raise DataError(
            f"{out}: contains '{foreign[0]}', which the converter did not write; "
            f"give an empty or converter-owned directory"
        )
    for n in names:
        (out / n).unlink()
    if names:
        log.info("%s: removed %d leftover files of an unfinished conversion", out, len(names))


def _missing_dirs(out: Path) -> list[Path]:
    """The directories ``mkdir -p out`` would create, deepest first."""
    missing = []
    p = out
    while not p.exists():
        missing.append(p)
        p = p.parent
    return missing


def _check_writable(out: Path, overwrite: bool) -> None:
    """Refuse, naming the path, an ``out`` the split cannot be written to, before any input is read."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory (expected a split directory to write)")
    missing = _missing_dirs(out)
    first = missing[-1].parent if missing else out  # the directory that must take the first write
    if not first.is_dir():
        raise OutputError(f"{first}: is a file, not a directory; cannot create {out} in it")
    replacing = overwrite and (out / MANIFEST).exists()  # the new split is built beside it, then renamed
    for d in [first] + ([out.parent] if replacing else []):
        if not os.access(d, os.W_OK | os.X_OK):
            raise OutputError(
                f"{d}: not writable (read-only file system or no permission); cannot write the split {out}"
            )


def _swap_in(new: Path, out: Path) -> None:
    """Replace the complete split ``out`` by the complete split ``new`` (a sibling in the same directory).

    The order keeps a complete split on disk at every instant and never lets ``out`` hold a partial one:

    1. ``new`` is already complete (shards and manifest written and synced) before anything here runs;
    2. the old split is renamed aside (``.<name>.old-*``, same directory: one atomic rename, no copying);
    3. ``new`` is renamed to ``out`` (atomic), and the directory is synced so both renames are durable;
    4. only then is the old split deleted.

    Between 2 and 3 -- two back-to-back renames, no data written between them -- ``out`` is briefly absent,
    never partial; a crash exactly there leaves both complete splits beside it (the old one aside, the new
    one under ``.<name>.new-*``). A failure in 2 or 3 puts the old split back.
    """
    holder = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    aside = holder / out.name
    try:
        os.rename(out, aside)  # 2
        try:
            os.rename(new, out)  # 3
        except BaseException:
            os.rename(aside, out)  # put the old split back
            raise
    except BaseException:
        holder.rmdir()
        raise
    fsync_dir(out.parent)
    shutil.rmtree(holder)  # 4


class ShardWriter:
    """Streams rows into ``shard-NNNNN.parquet`` files of ``rows_per_shard`` rows, one row group at a time."""

    def __init__(self, out: Path, resolution: int, rows_per_shard: int, row_group_rows: int = ROW_GROUP_ROWS):
        self.out, self.resolution = out, resolution
        self.rows_per_shard = rows_per_shard
        self.row_group_rows = min(row_group_rows, rows_per_shard)
        self.schema = arrow_schema(resolution)
        self.shards: list[dict] = []
        self._writer = None
        self._shard_rows = 0
        self._pending: list[Chunk] = []
        self._pending_rows = 0

    def add(self, chunk: Chunk) -> None:
        self._pending.append(chunk)
        self._pending_rows += len(chunk.labels)
        while self._pending_rows >= self._next_group_rows():
            self._write_group(self._next_group_rows())

    def _next_group_rows(self) -> int:
        return min(self.row_group_rows, self.rows_per_shard - self._shard_rows)

    def _write_group(self, n: int) -> None:
        images = np.concatenate([c.images for c in self._pending])
        labels = np.concatenate([c.labels for c in self._pending])
        sources = [s for c in self._pending for s in c.sources]
        rest = Chunk(images[n:], labels[n:], sources[n:])
        self._pending, self._pending_rows = ([rest], len(rest.labels)) if len(rest.labels) else ([], 0)
        row_bytes = self.resolution * self.resolution * 3
        pixels = pa.py_buffer(np.ascontiguousarray(images[:n]))  # (n, R, R, 3) HWC bytes, zero copy
        table = pa.Table.from_arrays(
            [
                pa.Array.from_buffers(pa.binary(row_bytes), n, [None, pixels]),
                pa.array(labels[:n], type=pa.int32()),
                pa.array(sources[:n], type=pa.string()),
            ],
            schema=self.schema,
        )
        if self._writer is None:
            self._tmp = self.out / f"shard-{len(self.shards):05d}.parquet.tmp"
            # Raw pixels barely compress and must read fast; the source strings compress well. Page CRCs:
            # checked by verify_split (why the loaders check sha256 instead: dbgen.data.split).
            self._writer = pq.ParquetWriter(
                self._tmp,
                self.schema,
                compression={"image": "none", "label": "zstd", "source": "zstd"},
                use_dictionary=False,
                write_page_checksum=True,
            )
        self._writer.write_table(table, row_group_size=n)
        self._shard_rows += n
        if self._shard_rows == self.rows_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        self._writer.close()
        with open(self._tmp, "rb") as f:
            os.fsync(f.fileno())
        final = self._tmp.with_suffix("")  # drop .tmp
        self.shards.append(
            {
                "file": final.name,
                "rows": self._shard_rows,
                "bytes": self._tmp.stat().st_size,
                "sha256": sha256_file(self._tmp),
            }
        )
        os.replace(self._tmp, final)
        self._writer, self._shard_rows = None, 0

    def finish(self) -> int:
        if self._pending_rows:
            self._write_group(self._pending_rows)
        if self._writer is not None:
            self._close_shard()
        return sum(s["rows"] for s in self.shards)


def write_split(
    source: Source,
    out: str | Path,
    *,
    resolution: int = 32,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    row_group_rows: int = ROW_GROUP_ROWS,
    skip_bad: bool = False,
    overwrite: bool = False,
    resize: bool = False,
) -> Path:
    """Stream ``source``'s records into the split directory ``out`` (atomic; manifest last).

    A complete split at ``out`` is refused unless ``overwrite``; then the new split is written beside it and
    swapped in only when complete (a failure leaves the old split untouched)."""
    out = Path(out).expanduser().resolve()
    if min(rows_per_shard, row_group_rows, resolution) < 1:
        raise DataError(
            f"rows_per_shard {rows_per_shard}, row_group_rows {row_group_rows}, resolution "
            f"{resolution}: expected positive"
        )
    _check_writable(out, overwrite)
    if (out / MANIFEST).exists():
        if not overwrite:
            raise DataError(f"{out}: already holds a converted split ({MANIFEST}); pass --overwrite to replace it")
        foreign = [p.name for p in out.iterdir() if not _owned(p.name)]
        if foreign:  # replacing the directory would delete them
            raise DataError(
                f"{out}: contains '{foreign[0]}', which the converter did not write; "
                f"move it away before replacing the split"
            )
        new = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
        try:
            os.chmod(new, out.stat().st_mode & 0o7777)  # mkdtemp makes it 0700; keep the split's permissions
            _write(source, new, out, resolution, rows_per_shard, row_group_rows, skip_bad, resize)
            _swap_in(new, out)
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            log.info("%s: conversion failed; the existing split is unchanged", out)
            raise
        return out
    created = _missing_dirs(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _prepare_out(out)
        _write(source, out, out, resolution, rows_per_shard, row_group_rows, skip_bad, resize)
    except BaseException:
        for d in created:  # a failed conversion leaves no empty directory behind (partial shards stay)
            try:
                d.rmdir()
            except OSError:  # not empty
                break
        raise
    return out


def _write(
    source: Source,
    out: Path,
    name: Path,
    resolution: int,
    rows_per_shard: int,
    row_group_rows: int,
    skip_bad: bool,
    resize: bool,
) -> None:
    """Write the split into the prepared directory ``out`` (``name``: the split's final path, for the log)."""
    writer, skipped = ShardWriter(out, resolution, rows_per_shard, row_group_rows), []
    for rec in source.records:
        if isinstance(rec, Bad):
            if not skip_bad:
                raise DataError(
                    f"{source.description['path']}: {rec.source}: {rec.reason} (--skip-bad skips bad images)"
                )
            log.warning("skipping %s: %s", rec.source, rec.reason)
            skipped.append({"source": rec.source, "reason": rec.reason})
        else:
            writer.add(rec)
    num_rows = writer.finish()
    if num_rows == 0:
        what = f"all {len(skipped)} images were bad" if skipped else "no images found"
        raise DataError(f"{source.description['path']}: {what} (format {source.description['format']})")
    manifest = {
        "format_version": FORMAT_VERSION,
        "resolution": resolution,
        "channels": 3,
        "num_rows": num_rows,
        "rows_per_shard": rows_per_shard,
        "row_group_rows": writer.row_group_rows,
        "num_classes": source.num_classes,
        "class_names": source.class_names,
        "layout": "image: fixed_size_binary[R*R*3] (uint8 HWC); label: int32; source: string",
        "page_checksums": True,
        "source": source.description,
        "resize": RESIZE_METHOD if resize else None,
        "num_skipped": len(skipped),
        "skipped": skipped,
        "ignored_files": source.ignored_files,
        "color_conversions": source.color_conversions,
        "shards": writer.shards,
    }
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=1))  # last: the split is complete; syncs the dir
    for mode, c in source.color_conversions.items():
        log.warning("%s: %d %s images converted to RGB: %s", name, c["images"], mode, c["how"])
    log.info("%s: %d rows in %d shards (%d skipped)", name, num_rows, len(writer.shards), len(skipped))
