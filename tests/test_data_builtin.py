"""Built-in data: photos32 builds offline, deterministically, race-safely; train and test are disjoint."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dbgen.data import builtin, open_split, read_rows, resolve_split
from dbgen.data.builtin import PHOTOS, STRIDES, TEST_FRACTION

REPO = Path(__file__).resolve().parents[1]

# Runs builtin() with every network connection refused: the build must not need one.
OFFLINE_BUILD = """
import socket, sys
def refuse(*a, **k):
    raise OSError("network access attempted during the offline build")
socket.socket.connect = refuse
socket.create_connection = refuse
from dbgen.data import builtin
for split, path in builtin("photos32").items():
    print(split, path)
"""


def build_in_subprocess(cache: Path) -> subprocess.Popen:
    env = {**os.environ, "DBGEN_CACHE": str(cache)}
    return subprocess.Popen(
        [sys.executable, "-c", OFFLINE_BUILD],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Two processes race to build photos32 into one empty cache, offline."""
    cache = tmp_path_factory.mktemp("cache")
    procs = [build_in_subprocess(cache), build_in_subprocess(cache)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert outs[0][0] == outs[1][0]  # both name the same directories
    return cache


def test_race_leaves_one_complete_build(cache):
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 1 and re.fullmatch(r"photos32-[0-9a-f]{12}", entries[0]), entries
    assert sorted(p.name for p in (cache / entries[0]).iterdir()) == ["test", "train"]


def test_sizes_labels_and_manifest(cache):
    paths = builtin("photos32", cache_dir=cache)
    train, test = open_split(paths["train"], verify=True), open_split(paths["test"], verify=True)
    assert (train.num_rows, test.num_rows) == (39540, 3561)
    assert train.resolution == 32 and train.class_names == tuple(PHOTOS)
    rows = read_rows(test)
    assert set(np.unique(rows["label"])) <= set(range(len(PHOTOS)))
    desc = train.manifest["source"]
    assert desc["format"] == "builtin" and set(desc["photos"]) == set(PHOTOS)


def test_resolve_builtin_spec_uses_the_cache(cache, monkeypatch):
    monkeypatch.setenv("DBGEN_CACHE", str(cache))
    assert resolve_split("builtin:photos32", "test") == builtin("photos32")["test"]
    assert resolve_split("builtin:photos32", "test").parent.parent == cache


def test_train_and_test_come_from_disjoint_regions(cache):
    paths = builtin("photos32", cache_dir=cache)
    train, test = read_rows(paths["train"]), read_rows(paths["test"])
    pat = re.compile(r"skimage/data/(.+):(train|test):scale=(\d):y=(\d+),x=(\d+)")
    import skimage
    from PIL import Image

    heights = {}
    for name in PHOTOS:
        with Image.open(Path(skimage.__file__).parent / "data" / name) as im:
            heights[name] = im.height
    for rows, split in [(train, "train"), (test, "test")]:
        for src in rows["source"]:
            name, s, scale, y, _ = pat.fullmatch(src).groups()
            assert s == split
            cut = round(heights[name] * (1 - TEST_FRACTION))
            top = int(y) * int(scale)  # in full-resolution rows of the region
            if split == "train":
                assert top + 32 * int(scale) <= cut
            else:
                assert cut + top + 32 * int(scale) <= heights[name]
    # And no patch is repeated across the splits.
    digest = lambda images: {hashlib.sha1(x.tobytes()).hexdigest() for x in images}  # noqa: E731
    assert not digest(train["image"]) & digest(test["image"])
    assert STRIDES["train"][1] < 32  # (train patches overlap each other, by design)


def test_build_is_deterministic_and_cli_writes_a_copy(cache, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "dbgen.data.convert",
            "--format",
            "builtin",
            "--src",
            "photos32",
            "--out",
            str(tmp_path / "copy"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert f"train: {tmp_path / 'copy' / 'train'}" in r.stdout
    ref = builtin("photos32", cache_dir=cache)
    for split in ["train", "test"]:
        a = json.loads((ref[split] / "manifest.json").read_text())["shards"]
        b = json.loads((tmp_path / "copy" / split / "manifest.json").read_text())["shards"]
        assert [s["sha256"] for s in a] == [s["sha256"] for s in b]


def test_unknown_builtin(tmp_path):
    from dbgen.data import DataError

    with pytest.raises(DataError, match="builtin data 'mnist': expected one of photos32"):
        resolve_split("builtin:mnist")
