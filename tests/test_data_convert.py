"""Converters: every input format in its documented layout, pixel-exact; every bad input; atomic writes.

The helpers at the top build inputs and are shared with the other test_data_* modules.
"""

import hashlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dbgen.data import DataError, convert, open_split, read_rows, resolve_split, verify_split

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ----------------------------------------------------------------------------------------------- helpers
def planar(images_hwc: np.ndarray) -> np.ndarray:
    """(N, R, R, 3) -> (N, 3*R*R) planar R, G, B rows, the CIFAR / downsampled-ImageNet layout."""
    return images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), -1).copy()


def write_cifar_dir(root: Path, n: int = 6, seed: int = 0, bad_label_at=None) -> dict:
    """``root/cifar-10-batches-py`` as the official python version lays it out (py2 pickles: bytes keys)."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    meta = {b"num_cases_per_batch": n, b"label_names": [s.encode() for s in CIFAR_NAMES], b"num_vis": 3072}
    (d / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    expected = {"train": ([], [], []), "test": ([], [], [])}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        imgs = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        if bad_label_at is not None and name == bad_label_at[0]:
            labels[bad_label_at[1]] = 10
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": planar(imgs),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))
        imgs_, labels_, sources = expected["test" if name == "test_batch" else "train"]
        imgs_.append(imgs)
        labels_.extend(labels)
        sources.extend(f"{name}:{i}" for i in range(n))
    return {k: (np.concatenate(v[0]), np.array(v[1]), v[2]) for k, v in expected.items()}


def tar_dir(src: Path, out: Path, mode: str = "w") -> Path:
    with tarfile.open(out, mode) as tar:
        for p in sorted(src.rglob("*")):
            tar.add(p, arcname=p.relative_to(src).as_posix(), recursive=False)
    return out


def write_imagenet(
    root: Path, files: dict, res: int = 32, fmt: str = "npz", seed: int = 0, ids_from: int | None = None
) -> dict:
    """Downsampled-ImageNet batch files ``{name: rows}``: ``data`` N x 3*R*R planar, ``labels`` 1..1000.

    ``ids_from``: write row ids (counting from it) into the first 4 bytes of each HWC image, so loaders'
    output can be traced back to rows.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, n in files.items():
        imgs = rng.integers(0, 256, (n, res, res, 3), dtype=np.uint8)
        if ids_from is not None:
            ids = np.arange(ids_from, ids_from + n, dtype="<u4")
            imgs.reshape(n, -1)[:, :4] = ids.view(np.uint8).reshape(n, 4)
            ids_from += n
        labels = rng.integers(1, 1001, n)
        d = {"data": planar(imgs), "labels": labels.tolist(), "mean": np.zeros(3 * res * res)}
        if fmt == "npz":
            np.savez(root / f"{name}.npz", data=d["data"], labels=labels, mean=d["mean"])
        else:
            (root / name).write_bytes(pickle.dumps(d))
        out[name] = (imgs, labels)
    return out


def ids_of(batch) -> np.ndarray:
    """Row ids written by ``write_imagenet(ids_from=...)`` from a (B, C, H, W) uint8 batch."""
    hwc = batch.permute(0, 2, 3, 1).reshape(len(batch), -1)[:, :4].contiguous().numpy()
    return hwc.copy().view("<u4").reshape(-1).astype(np.int64)


def id_split(root: Path, n: int, rows_per_shard: int = 150, row_group_rows: int = 64, res: int = 8) -> Path:
    """A split of ``n`` rows whose images carry their row id (several shards and row groups per shard)."""
    write_imagenet(root / "src", {"train_data_batch_1": n}, res=res, ids_from=0)
    return convert(
        "imagenet-batches",
        root / "src",
        root / "split",
        resolution=res,
        rows_per_shard=rows_per_shard,
        row_group_rows=row_group_rows,
    )


def write_image_folder(root: Path, res: int = 32, per_class: int = 3, seed: int = 0) -> dict:
    """``root/<class>/<n>.png|jpg``; returns {relative path: (expected HWC pixels, class name)}."""
    rng = np.random.default_rng(seed)
    out = {}
    for c in ["cat", "dog", "zebra"]:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            img = Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8))
            ext = "png" if i % 2 == 0 else "jpg"
            path = root / c / f"{i:03d}.{ext}"
            img.save(path, quality=90) if ext == "jpg" else img.save(path)
            with Image.open(path) as im:  # what PIL decodes (JPEG is lossy)
                out[f"{c}/{path.name}"] = (np.asarray(im.convert("RGB")), c)
    return out


def run_cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


def assert_split_equals(out: Path, images: np.ndarray, labels, sources) -> None:
    rows = read_rows(out)
    np.testing.assert_array_equal(rows["image"], images)
    np.testing.assert_array_equal(rows["label"], np.asarray(labels))
    assert rows["source"] == list(sources)


# ----------------------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("as_tar", [False, True], ids=["dir", "tar.gz"])
def test_cifar10_pixel_exact(tmp_path, as_tar):
    expected = write_cifar_dir(tmp_path / "in", n=6)
    src = tar_dir(tmp_path / "in", tmp_path / "cifar-10-python.tar.gz", "w:gz") if as_tar else tmp_path / "in"
    for split in ["train", "test"]:
        out = convert("cifar10", src, tmp_path / split, split=split, rows_per_shard=7, row_group_rows=3)
        assert_split_equals(out, *expected[split])
        m = json.loads((out / "manifest.json").read_text())
        assert m["class_names"] == CIFAR_NAMES and m["num_rows"] == (30 if split == "train" else 6)
        assert [s["rows"] for s in m["shards"]] == ([7, 7, 7, 7, 2] if split == "train" else [6])
        verify_split(out)


@pytest.mark.parametrize("fmt", ["npz", "pickle"])
def test_imagenet_batches_pixel_exact(tmp_path, fmt):
    # Numeric order of batch files: 1, 2, 10 (not 1, 10, 2).
    files = write_imagenet(
        tmp_path / "in",
        {"train_data_batch_10": 4, "train_data_batch_2": 3, "train_data_batch_1": 5, "val_data": 4},
        fmt=fmt,
    )
    out = convert("imagenet-batches", tmp_path / "in", tmp_path / "train", rows_per_shard=4)
    order = ["train_data_batch_1", "train_data_batch_2", "train_data_batch_10"]
    suffix = ".npz" if fmt == "npz" else ""
    assert_split_equals(
        out,
        np.concatenate([files[k][0] for k in order]),
        np.concatenate([files[k][1] for k in order]) - 1,  # stored 0-based
        [f"{k}{suffix}:{i}" for k in order for i in range(len(files[k][1]))],
    )
    test = convert("imagenet-batches", tmp_path / "in", tmp_path / "test", split="test")
    assert_split_equals(
        test, files["val_data"][0], files["val_data"][1] - 1, [f"val_data{suffix}:{i}" for i in range(4)]
    )
    assert open_split(test).num_classes == 1000


def test_imagenet64(tmp_path):
    files = write_imagenet(tmp_path / "in", {"train_data_batch_1": 3}, res=64)
    out = convert("imagenet-batches", tmp_path / "in", tmp_path / "out", resolution=64)
    assert_split_equals(
        out,
        files["train_data_batch_1"][0],
        files["train_data_batch_1"][1] - 1,
        [f"train_data_batch_1.npz:{i}" for i in range(3)],
    )


@pytest.mark.parametrize("kind", ["folder", "tar", "tar.gz"])
def test_image_files_pixel_exact(tmp_path, kind):
    expected = write_image_folder(tmp_path / "in")
    (tmp_path / "in" / "cat" / "notes.txt").write_text("not an image")
    if kind == "folder":
        src, fmt = tmp_path / "in", "image-folder"
    else:
        src = tar_dir(tmp_path / "in", tmp_path / f"in.{kind}", "w" if kind == "tar" else "w:gz")
        fmt = "image-tar"
    out = convert(fmt, src, tmp_path / "out", rows_per_shard=4)
    names = sorted(expected)  # the folder is walked sorted; tar_dir adds members sorted
    classes = ["cat", "dog", "zebra"]
    assert_split_equals(
        out, np.stack([expected[k][0] for k in names]), [classes.index(expected[k][1]) for k in names], names
    )
    m = json.loads((out / "manifest.json").read_text())
    assert m["class_names"] == classes and m["ignored_files"] == 1


def test_shard_schema_and_row_groups(tmp_path):
    out = id_split(tmp_path, 400, rows_per_shard=150, row_group_rows=64)
    f = pq.ParquetFile(out / "shard-00000.parquet")
    assert (
        str(f.schema_arrow) == "image: fixed_size_binary[192] not null\nlabel: int32 not null\nsource: string not null"
    )
    assert [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)] == [64, 64, 22]
    assert [s.rows for s in open_split(out).shards] == [150, 150, 100]


def test_resize_center_crop_box(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "in" / "a").mkdir(parents=True)
    src = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)  # H 40, W 60 -> crop x 10..50
    Image.fromarray(src).save(tmp_path / "in" / "a" / "wide.png")
    with pytest.raises(DataError, match=r"a/wide.png: image is 60x40, expected 32x32"):
        convert("image-folder", tmp_path / "in", tmp_path / "out")
    out = convert("image-folder", tmp_path / "in", tmp_path / "out", resize=True)
    want = np.asarray(Image.fromarray(src[:, 10:50]).resize((32, 32), Image.Resampling.BOX))
    np.testing.assert_array_equal(read_rows(out)["image"][0], want)
    assert "BOX" in json.loads((out / "manifest.json").read_text())["resize"]


def test_cli_convert_and_verify(tmp_path):
    # --out is the data set root: each split lands in OUT/<split>, where the presets' data.train/eval point
    write_imagenet(tmp_path / "in", {"train_data_batch_1": 5, "val_data": 3})
    for split, rows, shards in [("train", 5, 3), ("test", 3, 2)]:
        r = run_cli(
            "dbgen.data.convert",
            "--format",
            "imagenet-batches",
            "--src",
            str(tmp_path / "in"),
            "--out",
            str(tmp_path / "out"),
            "--split",
            split,
            "--rows-per-shard",
            "2",
        )
        assert r.returncode == 0, r.stderr
        assert f"{tmp_path / 'out' / split}: {rows} rows in {shards} shards, 0 skipped" in r.stdout
        r = run_cli("dbgen.data.verify", str(tmp_path / "out" / split))
        assert r.returncode == 0 and f"ok, {rows} rows in {shards} shards" in r.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["test", "train"]
    assert resolve_split(tmp_path / "out", "test") == (tmp_path / "out" / "test").resolve()
    # the default split is train; a split directory given as --out is refused, not nested
    r = run_cli(
        "dbgen.data.convert",
        "--format",
        "imagenet-batches",
        "--src",
        str(tmp_path / "in"),
        "--out",
        str(tmp_path / "out2"),
    )
    assert r.returncode == 0 and (tmp_path / "out2" / "train" / "manifest.json").exists(), r.stderr
    r = run_cli(
        "dbgen.data.convert",
        "--format",
        "imagenet-batches",
        "--src",
        str(tmp_path / "in"),
        "--out",
        str(tmp_path / "out" / "train"),
        "--split",
        "test",
    )
    assert r.returncode == 1 and "is itself a converted split; --out takes the data set root" in r.stderr
    assert not (tmp_path / "out" / "train" / "test").exists()


def test_resolve_split(tmp_path):
    write_imagenet(tmp_path / "in", {"train_data_batch_1": 3, "val_data": 2})
    convert("imagenet-batches", tmp_path / "in", tmp_path / "ds" / "train")
    convert("imagenet-batches", tmp_path / "in", tmp_path / "ds" / "test", split="test")
    assert resolve_split(tmp_path / "ds", "test") == (tmp_path / "ds" / "test").resolve()
    assert resolve_split(str(tmp_path / "ds" / "train"), "test") == (tmp_path / "ds" / "train").resolve()
    with pytest.raises(DataError, match=r"nope: not a directory"):
        resolve_split(tmp_path / "nope")
    with pytest.raises(DataError, match=r"split 'val'"):
        resolve_split(tmp_path / "ds", "val")


# -------------------------------------------------------------------------------------------- bad input
def _cli_fails(tmp_path, fmt, src, *extra, match):
    r = run_cli("dbgen.data.convert", "--format", fmt, "--src", str(src), "--out", str(tmp_path / "out"), *extra)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert match in r.stderr, r.stderr
    assert not (tmp_path / "out" / "train" / "manifest.json").exists()
    return r


def _corrupt_jpeg(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:200] + b"\x00" * 50)  # header survives, scan data does not


def test_bad_corrupt_jpeg_in_folder(tmp_path):
    write_image_folder(tmp_path / "in")
    _corrupt_jpeg(tmp_path / "in" / "dog" / "001.jpg")
    _cli_fails(tmp_path, "image-folder", tmp_path / "in", match="dog/001.jpg: cannot decode image")


def test_bad_corrupt_jpeg_in_tar(tmp_path):
    write_image_folder(tmp_path / "in")
    _corrupt_jpeg(tmp_path / "in" / "zebra" / "001.jpg")
    tar = tar_dir(tmp_path / "in", tmp_path / "in.tar")
    _cli_fails(tmp_path, "image-tar", tar, match="in.tar: zebra/001.jpg: cannot decode image")


@pytest.mark.parametrize("cut", ["member_data", "end_marker"])
def test_bad_truncated_tar(tmp_path, cut):
    write_image_folder(tmp_path / "in")
    tar = tar_dir(tmp_path / "in", tmp_path / "in.tar")
    with tarfile.open(tar) as t:
        last = t.getmembers()[-1]
    size = last.offset_data + 100 if cut == "member_data" else last.offset_data + 512 * (-(-last.size // 512))
    data = tar.read_bytes()[:size]
    tar.write_bytes(data)
    _cli_fails(
        tmp_path,
        "image-tar",
        tar,
        match=f"in.tar: truncated tar: archive ends inside or right after member '{last.name}'",
    )


def test_bad_truncated_tar_gz(tmp_path):
    write_image_folder(tmp_path / "in")
    tar = tar_dir(tmp_path / "in", tmp_path / "in.tar.gz", "w:gz")
    tar.write_bytes(tar.read_bytes()[:-300])
    _cli_fails(
        tmp_path,
        "image-tar",
        tar,
        match="in.tar.gz: truncated tar: archive ends inside or right after member 'zebra/002.png'",
    )


def _split_for_shard_tests(tmp_path) -> Path:
    return id_split(tmp_path, 300, rows_per_shard=100)


def test_bad_truncated_parquet_shard(tmp_path):
    out = _split_for_shard_tests(tmp_path)
    shard = out / "shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-1000])
    r = run_cli("dbgen.data.verify", str(out))
    assert r.returncode == 1 and f"{shard}: " in r.stderr and "truncated or replaced shard" in r.stderr
    with pytest.raises(DataError, match="shard-00001.parquet: .* bytes, manifest says"):
        resolve_split(out)


def test_bad_checksum_mismatch_parquet_shard(tmp_path):
    out = _split_for_shard_tests(tmp_path)
    shard = out / "shard-00002.parquet"
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0xFF  # a pixel byte: same size, still valid Parquet, wrong content
    shard.write_bytes(bytes(data))
    open_split(out)  # the cheap check (sizes) passes
    r = run_cli("dbgen.data.verify", str(out))
    assert r.returncode == 1 and f"{shard}: sha256" in r.stderr and "corrupted shard" in r.stderr
    with pytest.raises(DataError, match="shard-00002.parquet: sha256"):
        resolve_split(out, verify=True)


def test_bad_manifest_names_missing_shard(tmp_path):
    out = _split_for_shard_tests(tmp_path)
    (out / "shard-00001.parquet").unlink()
    r = run_cli("dbgen.data.verify", str(out))
    assert r.returncode == 1 and f"{out / 'shard-00001.parquet'}: shard named in" in r.stderr
    assert "is missing" in r.stderr


def test_bad_manifest_json(tmp_path):
    out = _split_for_shard_tests(tmp_path)
    m = json.loads((out / "manifest.json").read_text())
    m["num_rows"] = "many"
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"manifest.json: 'num_rows' = 'many', expected int"):
        open_split(out)
    (out / "manifest.json").write_text("{")
    with pytest.raises(DataError, match=r"manifest.json: invalid JSON"):
        open_split(out)


def test_bad_wrong_shape_batches(tmp_path):
    write_imagenet(tmp_path / "in", {"train_data_batch_1": 3}, res=64)
    _cli_fails(
        tmp_path,
        "imagenet-batches",
        tmp_path / "in",
        match="train_data_batch_1.npz: images are 64x64 (12288 values per row), expected 32x32 (3072)",
    )


def test_wrong_shape_batches_resize(tmp_path):
    files = write_imagenet(tmp_path / "in", {"train_data_batch_1": 2}, res=64)
    out = convert("imagenet-batches", tmp_path / "in", tmp_path / "out", resize=True)
    want = np.stack(
        [np.asarray(Image.fromarray(x).resize((32, 32), Image.Resampling.BOX)) for x in files["train_data_batch_1"][0]]
    )
    np.testing.assert_array_equal(read_rows(out)["image"], want)


def test_bad_wrong_shape_image_file(tmp_path):
    write_image_folder(tmp_path / "in")
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(tmp_path / "in" / "dog" / "small.png")
    _cli_fails(tmp_path, "image-folder", tmp_path / "in", match="dog/small.png: image is 28x28, expected 32x32")


def test_bad_label_out_of_range_cifar(tmp_path):
    write_cifar_dir(tmp_path / "in", bad_label_at=("data_batch_3", 4))
    _cli_fails(tmp_path, "cifar10", tmp_path / "in", match="data_batch_3:4: label 10, expected 0..9")


def test_bad_label_out_of_range_imagenet(tmp_path):
    write_imagenet(tmp_path / "in", {"train_data_batch_1": 4}, fmt="pickle")
    d = pickle.loads((tmp_path / "in" / "train_data_batch_1").read_bytes())
    d["labels"][2] = 0  # 1-based: 0 is out of range
    (tmp_path / "in" / "train_data_batch_1").write_bytes(pickle.dumps(d))
    _cli_fails(tmp_path, "imagenet-batches", tmp_path / "in", match="train_data_batch_1:2: label 0, expected 1..1000")


def test_bad_pickle_with_code_is_refused(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "train_data_batch_1").write_bytes(pickle.dumps({"data": os.system}))
    _cli_fails(tmp_path, "imagenet-batches", tmp_path / "in", match="refusing to load posix.system")


@pytest.mark.parametrize("fmt", ["image-folder", "image-tar", "imagenet-batches"])
def test_bad_empty_input(tmp_path, fmt):
    (tmp_path / "in" / "cat").mkdir(parents=True)
    src = tar_dir(tmp_path / "in", tmp_path / "in.tar") if fmt == "image-tar" else tmp_path / "in"
    match = "no train batch files" if fmt == "imagenet-batches" else "no images found"
    _cli_fails(tmp_path, fmt, src, match=match)


def test_bad_image_outside_class_folder(tmp_path):
    write_image_folder(tmp_path / "in")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "in" / "loose.png")
    _cli_fails(tmp_path, "image-folder", tmp_path / "in", match="'loose.png' is not in a class folder")


def test_skip_bad(tmp_path):
    expected = write_image_folder(tmp_path / "in")
    _corrupt_jpeg(tmp_path / "in" / "dog" / "001.jpg")
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(tmp_path / "in" / "cat" / "small.png")
    tar = tar_dir(tmp_path / "in", tmp_path / "in.tar")
    r = run_cli(
        "dbgen.data.convert", "--format", "image-tar", "--src", str(tar), "--out", str(tmp_path / "out"), "--skip-bad"
    )
    assert r.returncode == 0, r.stderr
    assert "8 rows in 1 shards, 2 skipped" in r.stdout
    m = json.loads((tmp_path / "out" / "train" / "manifest.json").read_text())
    assert m["num_skipped"] == 2
    assert {s["source"] for s in m["skipped"]} == {"dog/001.jpg", "cat/small.png"}
    assert any("28x28" in s["reason"] for s in m["skipped"])
    good = sorted(k for k in expected if k != "dog/001.jpg")
    rows = read_rows(tmp_path / "out" / "train")
    assert rows["source"] == good
    np.testing.assert_array_equal(rows["image"], np.stack([expected[k][0] for k in good]))


def test_skip_bad_labels(tmp_path):
    expected = write_cifar_dir(tmp_path / "in", n=5, bad_label_at=("data_batch_2", 1))
    out = convert("cifar10", tmp_path / "in", tmp_path / "out", skip_bad=True)
    keep = [i for i, s in enumerate(expected["train"][2]) if s != "data_batch_2:1"]
    images, labels, sources = expected["train"]
    assert_split_equals(out, images[keep], labels[keep], [sources[i] for i in keep])
    assert json.loads((out / "manifest.json").read_text())["skipped"] == [
        {"source": "data_batch_2:1", "reason": "label 10, expected 0..9"}
    ]


# -------------------------------------------------------------------------------------------- atomicity
def test_failed_conversion_leaves_no_split_and_rerun_starts_clean(tmp_path):
    write_image_folder(tmp_path / "in", per_class=6)
    _corrupt_jpeg(tmp_path / "in" / "zebra" / "003.jpg")  # late in the walk: earlier shards are written
    with pytest.raises(DataError, match="zebra/003.jpg"):
        convert("image-folder", tmp_path / "in", tmp_path / "out", rows_per_shard=2)
    assert sorted(p.name for p in (tmp_path / "out").iterdir())[:2] == ["shard-00000.parquet", "shard-00001.parquet"]
    assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(DataError, match="manifest.json: missing .*conversion did not finish"):
        resolve_split(tmp_path / "out")
    out = convert("image-folder", tmp_path / "in", tmp_path / "out", rows_per_shard=2, skip_bad=True)
    split = verify_split(out)
    assert split.num_rows == 17
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"] + [f"shard-{i:05d}.parquet" for i in range(9)]


def test_killed_conversion_never_looks_complete(tmp_path):
    write_imagenet(tmp_path / "in", {f"train_data_batch_{i}": 4000 for i in range(1, 4)}, res=32)
    out = tmp_path / "out" / "train"  # the CLI writes the split to <--out>/<--split>
    cmd = [
        PY,
        "-m",
        "dbgen.data.convert",
        "--format",
        "imagenet-batches",
        "--src",
        str(tmp_path / "in"),
        "--out",
        str(tmp_path / "out"),
        "--rows-per-shard",
        "64",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (out / "shard-00003.parquet").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "conversion finished before it could be interrupted"
    assert (out / "shard-00003.parquet").exists() and not (out / "manifest.json").exists()
    with pytest.raises(DataError, match="manifest.json: missing"):
        open_split(out)
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    split = verify_split(out)
    assert split.num_rows == 12000 and not list(out.glob("*.tmp"))


def test_existing_split_needs_overwrite_and_foreign_files_are_kept(tmp_path):
    write_imagenet(tmp_path / "in", {"train_data_batch_1": 3})
    out = convert("imagenet-batches", tmp_path / "in", tmp_path / "out")
    with pytest.raises(DataError, match="already holds a converted split"):
        convert("imagenet-batches", tmp_path / "in", out)
    convert("imagenet-batches", tmp_path / "in", out, overwrite=True, rows_per_shard=1)
    assert open_split(out).num_rows == 3 and len(open_split(out).shards) == 3
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="contains 'keep.txt', which the converter did not write"):
        convert("imagenet-batches", tmp_path / "in", tmp_path / "mine")
    assert (tmp_path / "mine" / "keep.txt").exists()


def test_interrupted_conversion_leftovers_are_removed(tmp_path):
    write_imagenet(tmp_path / "in", {"train_data_batch_1": 3})
    out = tmp_path / "out"
    out.mkdir()
    leftovers = ["shard-00000.parquet.tmp", ".manifest.json.k2j4x1.tmp", "manifest.json.tmp"]  # the last: older
    for name in leftovers:
        (out / name).write_text("partial")
    convert("imagenet-batches", tmp_path / "in", out)
    assert open_split(out, verify=True).num_rows == 3
    assert not [p.name for p in out.iterdir() if p.name in leftovers or p.name.endswith(".tmp")]


def _file_hashes(d: Path) -> dict:
    return {
        p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def test_failed_overwrite_keeps_the_old_split(tmp_path):
    # --overwrite with a bad source: the good split stays byte-identical, nothing is left beside it
    write_image_folder(tmp_path / "in")
    good = tar_dir(tmp_path / "in", tmp_path / "good.tar")
    _corrupt_jpeg(tmp_path / "in" / "zebra" / "001.jpg")
    corrupt = tar_dir(tmp_path / "in", tmp_path / "corrupt.tar")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    empty = tar_dir(tmp_path / "empty", tmp_path / "empty.tar")
    root = tmp_path / "out"
    r = run_cli(
        "dbgen.data.convert", "--format", "image-tar", "--src", str(good), "--out", str(root), "--rows-per-shard", "2"
    )
    assert r.returncode == 0, r.stderr
    before = _file_hashes(root)
    assert "train/manifest.json" in before and len(before) == 6
    for src, match in [(corrupt, "zebra/001.jpg: cannot decode image"), (empty, "no images found")]:
        r = run_cli("dbgen.data.convert", "--format", "image-tar", "--src", str(src), "--out", str(root), "--overwrite")
        assert r.returncode == 1 and match in r.stderr, r.stderr
        assert "leftover" not in r.stderr
        assert _file_hashes(root) == before  # every file, byte for byte; no temporary sibling left
        assert [p.name for p in root.iterdir()] == ["train"]
    verify_split(root / "train")
    # a good --overwrite replaces it (and leaves nothing beside it)
    r = run_cli(
        "dbgen.data.convert",
        "--format",
        "image-tar",
        "--src",
        str(good),
        "--out",
        str(root),
        "--overwrite",
        "--rows-per-shard",
        "3",
    )
    assert r.returncode == 0 and "9 rows in 3 shards" in r.stdout, r.stderr
    assert [p.name for p in root.iterdir()] == ["train"]
    assert open_split(root / "train", verify=True).num_rows == 9


def test_overwrite_swap_order_and_failed_swap(tmp_path, monkeypatch):
    from dbgen.data import writer

    write_imagenet(tmp_path / "in", {"train_data_batch_1": 3})
    out = convert("imagenet-batches", tmp_path / "in", tmp_path / "split")
    before, mode = _file_hashes(out), out.stat().st_mode
    seen, rename, fail = [], os.rename, [True]

    def checking_rename(a, b):  # before each rename, the split path is absent or holds a complete split
        seen.append((Path(a), Path(b)))
        assert not out.exists() or open_split(out, verify=True).num_rows == 3
        if fail[0] and Path(a).name.startswith(".split.new-"):
            raise OSError("rename failed")
        rename(a, b)

    monkeypatch.setattr(writer.os, "rename", checking_rename)
    with pytest.raises(OSError, match="rename failed"):
        convert("imagenet-batches", tmp_path / "in", out, overwrite=True, rows_per_shard=2)
    assert _file_hashes(out) == before  # put back, byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "split"]
    fail[0], seen[:] = False, []
    convert("imagenet-batches", tmp_path / "in", out, overwrite=True, rows_per_shard=2)
    # the old split aside first, then the complete new one into place; the old one deleted after
    assert [(a.name, b.parent.name.startswith(".split.old-")) for a, b in seen[:1]] == [("split", True)]
    assert seen[1][0].name.startswith(".split.new-") and seen[1][1] == out and len(seen) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "split"]
    assert len(open_split(out, verify=True).shards) == 2
    assert out.stat().st_mode == mode  # the replacement keeps the directory's permissions


def test_overwrite_refuses_a_split_holding_foreign_files(tmp_path):
    write_imagenet(tmp_path / "in", {"train_data_batch_1": 3})
    out = convert("imagenet-batches", tmp_path / "in", tmp_path / "split")
    (out / "notes.txt").write_text("mine")
    before = _file_hashes(out)
    with pytest.raises(DataError, match="contains 'notes.txt', which the converter did not write"):
        convert("imagenet-batches", tmp_path / "in", out, overwrite=True)
    assert _file_hashes(out) == before


def test_failed_new_split_leaves_no_empty_directory(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    r = run_cli(
        "dbgen.data.convert",
        "--format",
        "image-folder",
        "--src",
        str(tmp_path / "empty"),
        "--out",
        str(tmp_path / "root"),
    )
    assert r.returncode == 1 and "no images found" in r.stderr, r.stderr
    assert not (tmp_path / "root").exists()
    (tmp_path / "ds").mkdir()  # an existing root stays; the split directory the conversion made goes
    with pytest.raises(DataError, match="no images found"):
        convert("image-folder", tmp_path / "empty", tmp_path / "ds" / "train")
    assert (tmp_path / "ds").is_dir() and not list((tmp_path / "ds").iterdir())


# ------------------------------------------------------------------------------- where the split cannot go
def _convert_main(capsys, *args) -> tuple[int, str]:
    from dbgen.data.convert import main

    code = main(list(args))
    return code, capsys.readouterr().err


def test_out_is_a_file_exit_2_naming_it(tmp_path, capsys):
    write_image_folder(tmp_path / "in", per_class=1)
    (tmp_path / "file").write_text("mine")
    for out, culprit in [(tmp_path / "file", tmp_path / "file"), (tmp_path / "file" / "deeper", tmp_path / "file")]:
        code, err = _convert_main(capsys, "--format", "image-folder", "--src", str(tmp_path / "in"), "--out", str(out))
        assert code == 2 and err == f"error: {culprit}: is a file, not a directory; cannot create {out}/train in it\n"
    assert (tmp_path / "file").read_text() == "mine"
    # the split directory itself a file: named as such
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "train").write_text("mine")
    code, err = _convert_main(
        capsys, "--format", "image-folder", "--src", str(tmp_path / "in"), "--out", str(tmp_path / "root")
    )
    assert code == 2 and err.startswith(f"error: {tmp_path / 'root' / 'train'}: exists and is not a directory")


def _run_read_only(d: Path, *args) -> subprocess.CompletedProcess:
    """``python -m *args`` with directory ``d`` read-only: by its mode for a normal user; root ignores modes, so
    there a read-only bind mount of ``d`` in a private mount namespace (skipped where that is not allowed)."""
    if os.geteuid() != 0:
        d.chmod(0o555)
        try:
            return run_cli(*args)
        finally:
            d.chmod(0o755)
    mount = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" || exit 99; exec "$@"'
    try:
        r = subprocess.run(
            ["unshare", "-m", "sh", "-c", mount, str(d), PY, "-m", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
    except FileNotFoundError:
        pytest.skip("running as root (file modes do not apply) and no unshare for a read-only mount")
    if r.returncode == 99 or "unshare failed" in r.stderr:
        pytest.skip(f"running as root (file modes do not apply) and no read-only mount allowed: {r.stderr}")
    return r


def test_read_only_out_exit_2_naming_it_and_nothing_created(tmp_path):
    write_image_folder(tmp_path / "in", per_class=1)
    root = tmp_path / "ro"
    root.mkdir()
    r = _run_read_only(
        root,
        "dbgen.data.convert",
        "--format",
        "image-folder",
        "--src",
        str(tmp_path / "in"),
        "--out",
        str(root / "data"),
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"error: {root}: not writable (read-only file system or no permission)" in r.stderr
    assert not list(root.iterdir())  # no empty output directory left behind


# ------------------------------------------------------------------------------------------ color modes
def test_color_modes_converted_to_rgb_with_a_note(tmp_path):
    """Alpha, palette and grayscale images become RGB as documented, and the manifest says how many of each."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    gray = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    indices = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    pal = Image.fromarray(indices, "P")
    pal.putpalette(palette.reshape(-1).tolist())
    pal.info["transparency"] = 7
    images = {  # file -> (image, the RGB it must become: computed here, not by PIL's convert)
        "rgb.png": (Image.fromarray(rgb), rgb),
        "rgba.png": (Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), rgb),
        "rgba2.png": (Image.fromarray(np.dstack([rgb[::-1], alpha]), "RGBA"), rgb[::-1]),
        "gray.png": (Image.fromarray(gray, "L"), np.repeat(gray[..., None], 3, axis=2)),
        "gray_alpha.png": (Image.fromarray(np.dstack([gray, alpha]), "LA"), np.repeat(gray[..., None], 3, axis=2)),
        "palette.png": (pal, palette[indices]),
    }
    (tmp_path / "in" / "c").mkdir(parents=True)
    for name, (img, _) in images.items():
        img.save(tmp_path / "in" / "c" / name)
    for name, (img, _) in images.items():  # the files hold the modes under test
        with Image.open(tmp_path / "in" / "c" / name) as im:
            assert im.mode == img.mode, name
    out = convert("image-folder", tmp_path / "in", tmp_path / "out", resolution=8)
    rows = read_rows(out)
    names = sorted(images)  # the folder is walked sorted
    assert rows["source"] == [f"c/{n}" for n in names]
    for i, n in enumerate(names):
        np.testing.assert_array_equal(rows["image"][i], images[n][1], err_msg=n)
    notes = json.loads((out / "manifest.json").read_text())["color_conversions"]
    assert {mode: c["images"] for mode, c in notes.items()} == {"RGBA": 2, "L": 1, "LA": 1, "P": 1}
    assert "alpha channel dropped" in notes["RGBA"]["how"] and "alpha dropped" in notes["LA"]["how"]
    assert "palette" in notes["P"]["how"] and "transparency dropped" in notes["P"]["how"]
    assert "gray value copied to R, G and B" in notes["L"]["how"]


# ------------------------------------------------------------------------------------------- real data
CIFAR_JPEG_TAR = REPO.parent / "shared" / "data" / "cifar10-jpeg" / "train.tar"


@pytest.mark.skipif(not CIFAR_JPEG_TAR.is_file(), reason=f"{CIFAR_JPEG_TAR} absent (shared CIFAR-10 JPEG tar)")
def test_cifar10_jpeg_tar_slice(tmp_path):
    """2,000 members of the shared CIFAR-10 JPEG tar (the first 200 of each class), converted pixel-exact."""
    with tarfile.open(CIFAR_JPEG_TAR) as src:
        taken: dict[str, list] = {}
        for m in src:
            if m.isfile() and m.name.endswith(".jpg"):
                cls = Path(m.name).parent.name
                if len(taken.setdefault(cls, [])) < 200:
                    taken[cls].append((m, src.extractfile(m).read()))
    members = [x for cls in sorted(taken) for x in taken[cls]]
    assert len(members) == 2000 and sorted(taken) == CIFAR_NAMES
    slice_tar = tmp_path / "slice.tar"
    with tarfile.open(slice_tar, "w") as out:
        for m, data in members:
            out.addfile(m, io.BytesIO(data))
    split = open_split(convert("image-tar", slice_tar, tmp_path / "out", rows_per_shard=512))
    assert split.num_rows == 2000 and split.class_names == tuple(CIFAR_NAMES)
    rows = read_rows(split)
    assert rows["source"] == [m.name for m, _ in members]
    for i in range(0, 2000, 97):
        with Image.open(io.BytesIO(members[i][1])) as im:
            np.testing.assert_array_equal(rows["image"][i], np.asarray(im.convert("RGB")))
    np.testing.assert_array_equal(rows["label"], np.repeat(np.arange(10), 200))
