"""A small 64x64 split made from real photographs: the first rows of the shared CIFAR-10 JPEG tar, converted by
``python -m dbgen.data.convert --format image-tar --resolution 64 --resize`` (upsampled 32 -> 64).

Built once per pytest session into ``$DBGEN_CACHE`` (tests/conftest.py points it at the session folder, or at
``DBGEN_TEST_CACHE`` between sessions), so every test that trains a 64x64 preset reads the same split.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

CIFAR_JPEG_TAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg" / "train.tar"
ROWS = 256  # first members of the tar (enough for init, a few steps and one eval batch)

__all__ = ["CIFAR_JPEG_TAR", "jpeg64_split"]


def jpeg64_split() -> Path:
    """The converted 64x64 split directory (skips the test when the shared tar is absent)."""
    if not CIFAR_JPEG_TAR.is_file():
        pytest.skip(f"{CIFAR_JPEG_TAR} absent (shared CIFAR-10 JPEG tar)")
    root = Path(os.environ["DBGEN_CACHE"]) / f"test-jpeg64-{ROWS}"
    if (root / "train" / "manifest.json").is_file():
        return root / "train"
    root.mkdir(parents=True, exist_ok=True)
    slice_tar = root / "slice.tar"
    with tarfile.open(CIFAR_JPEG_TAR) as src, tarfile.open(slice_tar, "w") as out:
        taken = 0
        for member in src:
            if member.isfile() and member.name.endswith(".jpg"):
                out.addfile(member, src.extractfile(member))
                taken += 1
                if taken == ROWS:
                    break
    subprocess.run(
        [
            sys.executable,
            "-m",
            "dbgen.data.convert",
            "--format",
            "image-tar",
            "--src",
            str(slice_tar),
            "--out",
            str(root),
            "--resolution",
            "64",
            "--resize",
            "--rows-per-shard",
            "128",
            "--row-group-rows",
            "32",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    slice_tar.unlink()
    return root / "train"
