"""A converted split on disk: ``manifest.json`` + Parquet shards. Opening, validating, verifying, reading.

Opening a split checks the manifest (schema, types, shard files present with the recorded byte sizes and row
counts adding up); ``verify=True`` / :func:`verify_split` also re-hashes every shard against its sha256,
checks each shard's Parquet schema and row groups and reads every page. Every error is a :class:`DataError`
naming the path.

Integrity on read: shards carry a CRC32 per Parquet page (``write_page_checksum``; manifest
``page_checksums: true``; splits written before have none). :func:`verify_split` checks them, but the loaders
do not: checking every page on every read cost about 20% of the arrow loader's CPU (``python -m dbgen.bench
data --page-checksums compare``, ``benchmarks/RESULTS.md``), every epoch. Instead the loaders (and
:func:`read_rows`) check each shard's sha256 against the manifest once per process, when built
(:func:`check_shards`): one pass over the split at about the CRC's speed, then nothing per epoch; it also
covers splits written before page checksums, and fails a corrupt shard before the first step, not when the
epoch reaches it. Ray Data's read tasks (other processes) rely on the check of the loader that plans them.
What it does not catch is a shard that changes on disk after that check; reading a damaged footer or page
header then still fails to parse: a :class:`DataError` naming the shard.

Which directory a data spec (``builtin:NAME``, a data set root) names is :mod:`dbgen.data.resolve`'s.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import sha256_file

FORMAT_VERSION = 1  # page checksums (manifest 'page_checksums') came later as an optional key: still 1
MANIFEST = "manifest.json"
SPLITS = ("train", "test")


class DataError(ValueError):
    """Bad input data or a bad split directory; the message names the file (and row/member) and what was expected."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message  # as raised (Ray Data appends retry notes to the args of a read task's error)


def arrow_schema(resolution: int, channels: int = 3) -> pa.Schema:
    """The shard schema: raw HWC pixels, one fixed-size binary value of R*R*C bytes per row.

    Not ``fixed_size_list<uint8>``: Parquet has no 8-bit physical type, so such a list is stored as INT32
    values with repetition/definition levels per byte - 4x the bytes (or dictionary-encoded) and decoded by
    pyarrow 26 at 18-27k rows/s for 32x32. ``fixed_size_binary`` is stored as FIXED_LEN_BYTE_ARRAY, 1 byte
    per value, and reads at ~600k rows/s; its data buffer is the (n, R*R*C) uint8 array as is.
    """
    return pa.schema(
        [
            pa.field("image", pa.binary(resolution * resolution * channels), nullable=False),
            pa.field("label", pa.int32(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
        ]
    )


@dataclass(frozen=True)
class Shard:
    path: Path
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Split:
    """A validated split directory (see :func:`open_split`)."""

    path: Path
    resolution: int
    channels: int
    num_rows: int
    row_group_rows: int  # every row group of every shard has this many rows, except each shard's last one
    class_names: tuple[str, ...] | None
    num_classes: int
    shards: tuple[Shard, ...]
    page_checksums: bool  # every page carries a CRC32 (splits written before page checksums: False)
    manifest: dict = field(compare=False, hash=False, repr=False)

    @property
    def row_bytes(self) -> int:
        return self.resolution * self.resolution * self.channels

    @property
    def fingerprint(self) -> str:
        """Identifies the split's content (hash of its shards' hashes); stored in loader states."""
        h = hashlib.sha256()
        for s in self.shards:
            h.update(s.sha256.encode())
        return h.hexdigest()[:16]

    def units(self) -> list[tuple[int, int, int, int]]:
        """Read units in storage order: ``(shard index, row group, first global row, rows)``."""
        out, first = [], 0
        for i, s in enumerate(self.shards):
            for g, lo in enumerate(range(0, s.rows, self.row_group_rows)):
                n = min(self.row_group_rows, s.rows - lo)
                out.append((i, g, first + lo, n))
            first += s.rows
        return out


def _expect(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise DataError(f"{path}: {what}")


def open_split(path: str | Path, verify: bool = False) -> Split:
    """Validate ``path/manifest.json`` and the shards it names; ``verify=True`` also re-hashes the shards."""
    path = Path(path).expanduser().resolve()
    mpath = path / MANIFEST
    if not path.is_dir():
        raise DataError(f"{path}: not a directory (expected a converted split: Parquet shards + {MANIFEST})")
    if not mpath.is_file():
        raise DataError(
            f"{mpath}: missing (not a converted split, or its conversion did not finish; "
            f"re-run python -m dbgen.data.convert)"
        )
    try:
        m = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{mpath}: invalid JSON: {e}") from None
    _expect(isinstance(m, dict), mpath, "expected a JSON object")
    _expect(
        m.get("format_version") == FORMAT_VERSION,
        mpath,
        f"format_version {m.get('format_version')!r}, expected {FORMAT_VERSION}",
    )
    for key, tp in [
        ("resolution", int),
        ("channels", int),
        ("num_rows", int),
        ("row_group_rows", int),
        ("num_classes", int),
        ("shards", list),
    ]:
        _expect(
            isinstance(m.get(key), tp) and not isinstance(m.get(key), bool),
            mpath,
            f"'{key}' = {m.get(key)!r}, expected {tp.__name__}",
        )
    _expect(
        m["resolution"] > 0 and m["channels"] in (1, 3) and m["row_group_rows"] > 0,
        mpath,
        "expected resolution > 0, channels 1 or 3, row_group_rows > 0",
    )
    _expect(
        isinstance(m.get("page_checksums", False), bool),
        mpath,
        f"'page_checksums' = {m.get('page_checksums')!r}, expected true or false",
    )
    names = m.get("class_names")
    _expect(
        names is None
        or (isinstance(names, list) and all(isinstance(n, str) for n in names) and len(names) == m["num_classes"]),
        mpath,
        "'class_names' must be null or a list of num_classes strings",
    )
    shards = []
    for i, s in enumerate(m["shards"]):
        where = f"shards[{i}]"
        _expect(
            isinstance(s, dict)
            and isinstance(s.get("file"), str)
            and isinstance(s.get("rows"), int)
            and isinstance(s.get("bytes"), int)
            and isinstance(s.get("sha256"), str),
            mpath,
            f"{where}: expected {{file: str, rows: int, bytes: int, sha256: str}}, got {s!r}",
        )
        _expect(
            "/" not in s["file"] and "\\" not in s["file"] and not s["file"].startswith("."),
            mpath,
            f"{where}: file {s['file']!r} must be a plain file name inside the split directory",
        )
        spath = path / s["file"]
        if not spath.is_file():
            raise DataError(f"{spath}: shard named in {mpath} is missing")
        size = spath.stat().st_size
        if size != s["bytes"]:
            raise DataError(f"{spath}: {size} bytes, manifest says {s['bytes']} (truncated or replaced shard)")
        shards.append(Shard(spath, s["rows"], s["bytes"], s["sha256"]))
    total = sum(s.rows for s in shards)
    _expect(total == m["num_rows"], mpath, f"shards hold {total} rows, num_rows says {m['num_rows']}")
    split = Split(
        path=path,
        resolution=m["resolution"],
        channels=m["channels"],
        num_rows=m["num_rows"],
        row_group_rows=m["row_group_rows"],
        class_names=tuple(names) if names is not None else None,
        num_classes=m["num_classes"],
        shards=tuple(shards),
        page_checksums=m.get("page_checksums", False),
        manifest=m,
    )
    if verify:
        _verify_shards(split)
    return split


def verify_split(path: str | Path) -> Split:
    """Full check: manifest, every shard's sha256, Parquet schema, row count, row-group layout, and every row
    group read (page CRCs checked where the split has them)."""
    return open_split(path, verify=True)


# Whether read_unit / read_rows check page CRCs. Off: see the module docstring (the loaders check sha256 once
# per process instead); ``python -m dbgen.bench data --page-checksums on|compare`` turns it on to measure it.
PAGE_CHECKSUM_VERIFICATION = False
_SHA256_CHECKED: set[tuple[Path, str]] = set()  # (shard, sha256) checked in this process


def _check_sha256(s: Shard) -> None:
    digest = sha256_file(s.path)
    if digest != s.sha256:
        raise DataError(
            f"{s.path}: sha256 {digest}, manifest says {s.sha256} (corrupted shard; python -m "
            f"dbgen.data.verify {s.path.parent} checks every shard)"
        )
    _SHA256_CHECKED.add((s.path, s.sha256))


def check_shards(split: Split, shards: list[Shard] | tuple[Shard, ...] | None = None) -> None:
    """Check each shard's sha256 (default: all of ``split``) against the manifest, once per process: shards
    checked before in this process are skipped. :class:`DataError` naming the first corrupted shard."""
    for s in split.shards if shards is None else shards:
        if (s.path, s.sha256) not in _SHA256_CHECKED:
            _check_sha256(s)


def _corrupt(s: Shard, what: str, e: Exception) -> DataError:
    reason = " ".join(str(e).split())  # pyarrow's multi-line messages, on one line
    return DataError(
        f"{s.path}: {what}: {reason} (corrupted shard; python -m dbgen.data.verify {s.path.parent} checks every shard)"
    )


def _open_shard(s: Shard, verify_pages: bool) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(s.path, page_checksum_verification=verify_pages)
    except (pa.ArrowException, OSError) as e:
        raise _corrupt(s, "not a readable Parquet file", e) from None


def _read_row_group(f: pq.ParquetFile, s: Shard, row_group: int, columns: list[str] | None = None) -> pa.Table:
    try:
        return f.read_row_group(row_group, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise _corrupt(s, f"cannot read row group {row_group}", e) from None


def _verify_shards(split: Split) -> None:
    schema = arrow_schema(split.resolution, split.channels)
    for s in split.shards:
        _check_sha256(s)
        f = _open_shard(s, verify_pages=True)
        meta = f.metadata
        if not meta.schema.to_arrow_schema().equals(schema):
            raise DataError(f"{s.path}: schema {meta.schema.to_arrow_schema()}, expected {schema}")
        _expect(meta.num_rows == s.rows, s.path, f"{meta.num_rows} rows, manifest says {s.rows}")
        for g in range(meta.num_row_groups):
            want = min(split.row_group_rows, s.rows - g * split.row_group_rows)
            _expect(
                meta.row_group(g).num_rows == want,
                s.path,
                f"row group {g} has {meta.row_group(g).num_rows} rows, expected {want}",
            )
            _read_row_group(f, s, g)  # decodes every page: page headers parse, CRCs match (where written)


def read_unit(split: Split, shard: int, row_group: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """Rows ``[lo, hi)`` of one row group as ``(n, R*R*C)`` uint8 (HWC per row). Errors name the file.

    Checks no sha256 (the loaders did, see :func:`check_shards`; Ray Data read tasks run in other processes)."""
    s = split.shards[shard]
    want = min(split.row_group_rows, s.rows - row_group * split.row_group_rows)
    hi = want if hi is None else hi
    table = _read_row_group(_open_shard(s, PAGE_CHECKSUM_VERIFICATION), s, row_group, columns=["image"])
    if table.num_rows != want:
        raise DataError(f"{s.path}: row group {row_group} has {table.num_rows} rows, expected {want}")
    return image_array(table.column(0), split.row_bytes, s.path)[lo:hi]  # (n, R*R*C)


def image_array(column: pa.ChunkedArray | pa.Array, row_bytes: int, where) -> np.ndarray:
    """An image column -> (n, row_bytes) uint8 numpy view of its data buffer (read-only, zero copy)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.type != pa.binary(row_bytes):
        raise DataError(f"{where}: image column is {arr.type}, expected fixed_size_binary[{row_bytes}]")
    buf = arr.buffers()[1]
    return np.frombuffer(buf, np.uint8, count=len(arr) * row_bytes, offset=arr.offset * row_bytes).reshape(
        len(arr), row_bytes
    )


def read_rows(path: str | Path | Split, start: int = 0, stop: int | None = None) -> dict:
    """Rows ``[start, stop)`` in storage order: ``image`` (n, H, W, C) uint8, ``label`` (n,) int32, ``source``.

    For small splits, tests and sample grids; training reads through the loaders. The shards read are checked
    as the loaders check them (:func:`check_shards`).
    """
    split = path if isinstance(path, Split) else open_split(path)
    stop = split.num_rows if stop is None else min(stop, split.num_rows)
    tables, first = [], 0
    for s in split.shards:
        lo, hi = max(start - first, 0), min(stop - first, s.rows)
        if lo < hi:
            check_shards(split, [s])
            f = _open_shard(s, PAGE_CHECKSUM_VERIFICATION)
            try:
                tables.append(f.read().slice(lo, hi - lo))
            except (pa.ArrowException, OSError) as e:
                raise _corrupt(s, "cannot read", e) from None
        first += s.rows
    table = pa.concat_tables(tables) if tables else arrow_schema(split.resolution, split.channels).empty_table()
    r, c = split.resolution, split.channels
    return {
        "image": image_array(table.column("image"), split.row_bytes, split.path).reshape(-1, r, r, c),
        "label": table.column("label").to_numpy(zero_copy_only=False).astype(np.int32),
        "source": table.column("source").to_pylist(),
    }
