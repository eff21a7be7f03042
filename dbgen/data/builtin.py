"""Built-in data that needs no download: ``builtin("photos32")``, or on the command line
``python -m dbgen.data.convert --format builtin --src photos32 [--out DIR]``.

``photos32``: 32x32 RGB patches cut from the colour photographs that scikit-image ships inside its package
(``skimage/data``: astronaut, chelsea, coffee, hubble_deep_field, ihc, motorcycle_left, rocket). The label
is the photograph's index (class names = file names).

Held-out split by *disjoint regions*: in every photograph the top 3/4 of the rows is train, the bottom 1/4 is
test; each region is cut and downsampled on its own, so no test pixel (or pixel mixed into a downsampled test
pixel) is ever part of a train patch. Patches come at three scales (the region at full size, and
BOX-downsampled by 2 and 4) on a grid: train strides 8/6/4 px, test strides 16/8/4 px at scales 1/2/4;
patches of a single pixel value (saturated areas) are left out. That gives 39,540 train and 3,561 test
patches, fully deterministic (no random numbers), row order = photo, scale, y, x. Rows are written through
the split writer (:func:`dbgen.data.writer.write_split`).

Cache: ``$DBGEN_CACHE`` or ``~/.cache/dbgen``, directory ``photos32-<key>`` where the key hashes the recipe
version and the photographs' sha256, so another scikit-image release with other files builds anew. Two
processes may race: each builds in its own temporary directory and renames it into place; the loser
discards its copy.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import sha256_file
from .split import MANIFEST, DataError, open_split
from .writer import Chunk, Source, write_split

log = logging.getLogger(__name__)

BUILTINS = ("photos32",)
PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "rocket.jpg",
)
RECIPE_VERSION = 2
PATCH = 32
TEST_FRACTION = 0.25  # bottom rows of every photograph
STRIDES = {"train": {1: 8, 2: 6, 4: 4}, "test": {1: 16, 2: 8, 4: 4}}


def _photo_dir() -> Path:
    import skimage  # here and below: only building the data set needs scikit-image (slow to import)

    return Path(skimage.__file__).parent / "data"


def cache_root() -> Path:
    return Path(os.environ.get("DBGEN_CACHE") or Path.home() / ".cache" / "dbgen").expanduser()


def _key(name: str) -> str:
    h = hashlib.sha256(f"{name}:{RECIPE_VERSION}".encode())
    for f in PHOTOS:
        p = _photo_dir() / f
        if not p.is_file():
            raise DataError(f"{p}: missing (scikit-image should ship this photograph inside its package)")
        h.update(sha256_file(p).encode())
    return h.hexdigest()[:12]


def _patches(region: np.ndarray, stride: int) -> np.ndarray:
    """(H, W, 3) -> (n, 32, 32, 3) patches on a grid of ``stride``, row-major."""
    win = np.lib.stride_tricks.sliding_window_view(region, (PATCH, PATCH), axis=(0, 1))  # (h, w, 3, 32, 32)
    win = win[::stride, ::stride]
    return np.ascontiguousarray(win.transpose(0, 1, 3, 4, 2).reshape(-1, PATCH, PATCH, 3))


def _photos32_records(split: str):
    for label, name in enumerate(PHOTOS):
        with Image.open(_photo_dir() / name) as img:
            photo = np.asarray(img.convert("RGB"))
        cut = int(round(photo.shape[0] * (1 - TEST_FRACTION)))
        region = photo[:cut] if split == "train" else photo[cut:]
        for scale, stride in STRIDES[split].items():
            img = Image.fromarray(region)
            if scale > 1:
                img = img.resize((region.shape[1] // scale, region.shape[0] // scale), Image.Resampling.BOX)
            x = np.asarray(img)
            if min(x.shape[:2]) < PATCH:
                continue
            patches = _patches(x, stride)
            ny = (x.shape[0] - PATCH) // stride + 1
            nx = (x.shape[1] - PATCH) // stride + 1
            sources = [
                f"skimage/data/{name}:{split}:scale={scale}:y={y * stride},x={i * stride}"
                for y in range(ny)
                for i in range(nx)
            ]
            flat = patches.reshape(len(patches), -1)
            keep = np.flatnonzero(flat.max(1) != flat.min(1))  # one-value patches (saturated areas) say nothing
            yield Chunk(patches[keep], np.full(len(keep), label), [sources[i] for i in keep])


def _source(name: str, split: str) -> Source:
    if name not in BUILTINS:
        raise DataError(f"builtin data {name!r}: expected one of {', '.join(BUILTINS)}")
    import skimage

    desc = {
        "format": "builtin",
        "path": f"builtin:{name}",
        "split": split,
        "description": f"32x32 patches of scikit-image {skimage.__version__} photographs; split by "
        f"disjoint regions (top {1 - TEST_FRACTION:.0%} rows train, bottom "
        f"{TEST_FRACTION:.0%} test); scales 1/2/4, strides {STRIDES[split]}",
        "photos": {f: sha256_file(_photo_dir() / f) for f in PHOTOS},
        "recipe_version": RECIPE_VERSION,
    }
    return Source(desc, len(PHOTOS), list(PHOTOS), records=_photos32_records(split))


def build_builtin(name: str, out: Path, overwrite: bool = False) -> dict[str, Path]:
    """Write the built-in data set ``name`` to ``out/train`` and ``out/test``."""
    return {
        split: write_split(_source(name, split), out / split, resolution=PATCH, overwrite=overwrite)
        for split in ("train", "test")
    }


def builtin(name: str = "photos32", cache_dir: str | Path | None = None) -> dict[str, Path]:
    """``{"train": Path, "test": Path}`` of the built-in data set ``name``, built into the cache on first use."""
    if name not in BUILTINS:
        raise DataError(f"builtin data {name!r}: expected one of {', '.join(BUILTINS)}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    final = root / f"{name}-{_key(name)}"
    if not (final / "test" / MANIFEST).is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
        try:
            build_builtin(name, tmp)
            try:
                os.rename(tmp, final)  # atomic; fails if another process got there first
                log.info("built %s into %s", name, final)
            except OSError:
                if not (final / "test" / MANIFEST).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {split: open_split(final / split).path for split in ("train", "test")}
