"""Shard integrity on read, on real CIFAR-10 JPEGs: a damaged shard fails the loaders at once with its name.

Issue 19 (6): inverting 64 bytes of pixel data in one shard trained silently; only ``dbgen.data.verify``
noticed. Now shards carry Parquet page CRCs (checked by ``verify``), and the loaders check every shard's sha256
once per process before their first read (the cost trade-off is in :mod:`dbgen.data.split`). The Ray Data
backend's read-task errors are covered in ``test_data_ray.py``.
"""

import io
import json
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_data_convert import CIFAR_JPEG_TAR, run_cli

from dbgen.atomic import sha256_file
from dbgen.data import DataError, EvalLoader, TrainLoader, convert, open_split, read_rows, verify_split
from dbgen.data.split import read_unit

pytestmark = pytest.mark.skipif(
    not CIFAR_JPEG_TAR.is_file(), reason=f"{CIFAR_JPEG_TAR} absent (shared CIFAR-10 JPEG tar)"
)

ROWS = 200  # the first 200 JPEGs of the shared tar: 2 shards of 100 rows, row groups of 50
DAMAGED = "shard-00001.parquet"


@pytest.fixture(scope="module")
def cifar_split(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    with tarfile.open(CIFAR_JPEG_TAR) as src, tarfile.open(root / "slice.tar", "w") as out:
        taken = 0
        for m in src:
            if m.isfile() and m.name.endswith(".jpg"):
                out.addfile(m, io.BytesIO(src.extractfile(m).read()))
                taken += 1
                if taken == ROWS:
                    break
    return convert("image-tar", root / "slice.tar", root / "split", rows_per_shard=100, row_group_rows=50)


def _copy(split: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(split, tmp_path / "split"))


def _invert(path: Path, offset: int, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + n] = bytes(b ^ 0xFF for b in data[offset : offset + n])
    path.write_bytes(bytes(data))


def _pixel_offset(shard: Path, row_group: int) -> int:
    """The middle of the image column's data in ``row_group`` (one data page per row group here)."""
    col = pq.ParquetFile(shard).metadata.row_group(row_group).column(0)
    return col.data_page_offset + col.total_compressed_size // 2


def _footer_offset(shard: Path) -> int:
    """The start of the Parquet footer (the FileMetaData before its 4-byte length and the PAR1 magic)."""
    data = shard.read_bytes()
    return len(data) - 8 - struct.unpack("<I", data[-8:-4])[0]


def test_damaged_pixels_fail_the_loaders_at_once_naming_the_shard(cifar_split, tmp_path):
    split = _copy(cifar_split, tmp_path)
    shard = split / DAMAGED
    before = read_rows(cifar_split)["image"]  # not the copy: that would count as checked in this process
    _invert(shard, _pixel_offset(shard, 1))
    # The defect: the damage is silent to Parquet itself (same size, decodes fine, different pixels) ...
    silent = pq.read_table(shard, columns=["image"]).column(0).combine_chunks()
    rows = np.frombuffer(silent.buffers()[1], np.uint8).reshape(100, 32, 32, 3)
    assert (rows != before[100:]).sum() == 64
    open_split(split)  # ... and to the cheap manifest checks (sizes)
    # ... but no loader reads it: each fails when built, before the first batch, naming the shard.
    match = f"{shard}: sha256 .* manifest says .*\\(corrupted shard"
    for backend in ("arrow", "ray"):  # the check runs before any read, in the loader's own process
        with pytest.raises(DataError, match=match):
            TrainLoader(split, batch_size=16, rank=0, world_size=1, backend=backend)
        with pytest.raises(DataError, match=match):
            EvalLoader(split, batch_size=16, rank=0, world_size=1, backend=backend)
    with pytest.raises(DataError, match=match):
        read_rows(split, 100, 110)  # rows of the damaged shard
    np.testing.assert_array_equal(read_rows(split, 0, 100)["image"], before[:100])  # shard 0 is intact


@pytest.mark.parametrize("where", ["header", "footer"])
def test_damaged_header_or_footer_fails_naming_the_shard(cifar_split, tmp_path, where):
    split = _copy(cifar_split, tmp_path)
    shard = split / DAMAGED
    loaded = open_split(split)
    _invert(shard, 0 if where == "header" else _footer_offset(shard))  # header: PAR1 + the first page header
    with pytest.raises(DataError, match=f"{shard}: sha256 .*\\(corrupted shard"):
        TrainLoader(split, batch_size=16, rank=0, world_size=1, backend="arrow")
    # Read without the sha256 check (as a Ray Data read task does): still a DataError naming the shard.
    what = "cannot read row group 0" if where == "header" else "not a readable Parquet file"
    with pytest.raises(DataError, match=f"{shard}: {what}: .*corrupted shard"):
        read_unit(loaded, 1, 0)


def test_shards_carry_page_checksums_which_verify_checks(cifar_split, tmp_path):
    split = _copy(cifar_split, tmp_path)
    assert open_split(split).page_checksums
    shard = split / DAMAGED
    _invert(shard, _pixel_offset(shard, 1))
    # Give the manifest the damaged shard's sha256: only the pages' own CRCs can tell now.
    m = json.loads((split / "manifest.json").read_text())
    m["shards"][1]["sha256"] = sha256_file(shard)
    (split / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=f"{shard}: cannot read row group 1: .*CRC checksum verification failed"):
        verify_split(split)
    r = run_cli("dbgen.data.verify", str(split))
    assert r.returncode == 1 and f"{shard}: cannot read row group 1" in r.stderr, r.stderr


def _without_page_checksums(split: Path) -> None:
    """Rewrite ``split`` as the writer did before page checksums (same options, no CRCs; no manifest key)."""
    m = json.loads((split / "manifest.json").read_text())
    for s in m["shards"]:
        path = split / s["file"]
        table = pq.read_table(path)
        pq.write_table(
            table,
            path,
            row_group_size=m["row_group_rows"],
            use_dictionary=False,
            compression={"image": "none", "label": "zstd", "source": "zstd"},
        )
        s["bytes"], s["sha256"] = path.stat().st_size, sha256_file(path)
    del m["page_checksums"]
    (split / "manifest.json").write_text(json.dumps(m))


def test_split_written_before_page_checksums_loads_and_is_checked(cifar_split, tmp_path):
    old = _copy(cifar_split, tmp_path)
    _without_page_checksums(old)
    assert not open_split(old).page_checksums
    assert verify_split(old).num_rows == ROWS  # sha256, schema, row groups; no CRCs to check
    want = read_rows(cifar_split)["image"]
    batch = next(iter(EvalLoader(old, batch_size=ROWS, rank=0, world_size=1, backend="arrow")))
    np.testing.assert_array_equal(batch.permute(0, 2, 3, 1).numpy(), want)
    damaged = Path(shutil.copytree(old, tmp_path / "damaged"))  # another path: not checked in this process yet
    _invert(damaged / DAMAGED, _pixel_offset(damaged / DAMAGED, 1))
    with pytest.raises(DataError, match=f"{damaged / DAMAGED}: sha256 .*\\(corrupted shard"):
        TrainLoader(damaged, batch_size=16, rank=0, world_size=1, backend="arrow")
