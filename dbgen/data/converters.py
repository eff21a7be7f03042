"""Converters from image data sets to Parquet splits (CLI: ``python -m dbgen.data.convert``).

::

    python -m dbgen.data.convert --format FORMAT --src PATH --out DIR [--split train|test] [--resolution 32|64]
        [--rows-per-shard N] [--row-group-rows N] [--skip-bad] [--resize] [--overwrite]
    python -m dbgen.data.convert --format builtin --src photos32 --out DIR     # writes DIR/train, DIR/test

Formats (``--src``):

* ``cifar10``: the python-pickle batches (``data_batch_1..5`` / ``test_batch`` + ``batches.meta``), as a
  directory (or its ``cifar-10-batches-py`` parent) or the ``cifar-10-python.tar.gz``. ``data`` N x 3072
  uint8 planar RGB, ``labels`` 0..9, class names from ``batches.meta``.
* ``imagenet-batches``: downsampled ImageNet (Chrabaszcz et al. 2017): a directory of ``train_data_batch_K``
  (train) or ``val_data`` (test) files, pickle or ``.npz``; ``data`` N x (3*R*R) uint8 planar RGB, ``labels``
  1..1000, stored 0-based (label - 1).
* ``image-folder``: ``SRC/<class>/<image>`` JPEG/PNG files; ``image-tar``: the same inside a tar (any
  compression), members in archive order. The class is the image's parent folder name (classes sorted by
  name give the label). Files of other types are ignored (counted in the manifest). Decoded with PIL,
  converted to RGB; images stored in another mode (grayscale, palette, with alpha, ...) are counted per mode
  in the manifest's ``color_conversions`` with what the conversion did (alpha is dropped, not composited).

Pickles are read with an unpickler that only admits plain containers and numpy arrays (no code runs).

Images whose size differs from ``--resolution`` are an error unless ``--resize``: then the image is
center-cropped to a square and resampled with PIL's BOX filter (the area average used to make downsampled
ImageNet). Bad images (undecodable, wrong size, label out of range) are errors naming the file / member /
``batch_file:row``; with ``--skip-bad`` they are skipped, counted and listed in the manifest. A broken
container (truncated tar, unreadable batch file) is always an error.

Each format is a reader that yields records; :func:`dbgen.data.writer.write_split` writes them (atomically,
manifest last; re-running a conversion into an unfinished split removes its leftovers and starts clean;
``overwrite`` writes the new split beside a complete one and swaps it in only when complete).
Memory stays bounded: the reader holds at most one input batch file or image at a time, the writer one row
group.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from .split import DataError
from .writer import DEFAULT_ROWS_PER_SHARD, ROW_GROUP_ROWS, Bad, Chunk, Source, write_split

__all__ = ["FORMATS", "convert"]

FORMATS = ("cifar10", "imagenet-batches", "image-folder", "image-tar")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


# ------------------------------------------------------------------------------------------ helpers
class _SafeUnpickler(pickle.Unpickler):
    """Admits only what data-set pickles hold: containers, numbers, strings and numpy arrays."""

    ALLOWED = {
        (mod, name)
        for mod in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric")
        for name in ("_reconstruct", "scalar", "_frombuffer")
    } | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are allowed)")
        return super().find_class(module, name)


def _load_batch(data: bytes, where: str) -> dict:
    """A pickled or npz batch -> dict with str keys."""
    try:
        if data[:4] == b"PK\x03\x04":  # zip = npz
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                d = {k: z[k] for k in z.files}
        else:
            d = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # any unpickling / zip failure means a broken file; say which
        raise DataError(f"{where}: unreadable batch file ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise DataError(f"{where}: expected a dict of arrays, got {type(d).__name__}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


# What PIL's Image.convert("RGB") does to each mode (recorded in the manifest; other modes: COLOR_DEFAULT).
COLOR_NOTES = {
    "L": "grayscale: the gray value copied to R, G and B",
    "1": "black and white: 0 or 255 copied to R, G and B",
    "LA": "grayscale with alpha: the gray value copied to R, G and B; alpha dropped, not composited",
    "P": "palette: each index replaced by its palette color; palette transparency dropped",
    "PA": "palette with alpha: each index replaced by its palette color; alpha dropped, not composited",
    "RGBA": "alpha channel dropped, not composited: the stored R, G, B kept",
}
COLOR_DEFAULT = "converted with PIL Image.convert('RGB')"


def _image_record(source: Source, name: str, data: bytes, label: int, resolution: int, resize: bool):
    """One image file -> a one-row Chunk (its color conversion counted in ``source``) or a Bad."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode, x = img.mode, _fit(img, resolution, resize)
    except (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError) as e:
        return Bad(name, f"cannot decode image ({type(e).__name__}: {e})")
    if isinstance(x, str):
        return Bad(name, x)
    if mode != "RGB":
        c = source.color_conversions.setdefault(mode, {"images": 0, "how": COLOR_NOTES.get(mode, COLOR_DEFAULT)})
        c["images"] += 1
    return Chunk(x[None], np.array([label]), [name])


def _fit(img: Image.Image, resolution: int, resize: bool) -> np.ndarray | str:
    """PIL image -> (R, R, 3) uint8, or the reason it is bad (with ``resize``: writer.RESIZE_METHOD)."""
    img = img.convert("RGB")
    if img.size != (resolution, resolution):
        if not resize:
            return f"image is {img.width}x{img.height}, expected {resolution}x{resolution} (--resize resamples)"
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
        img = img.resize((resolution, resolution), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8)


def _planar_rows(d: dict, where: str, resolution: int, resize: bool, label_lo: int, label_hi: int) -> Iterator:
    """A batch dict with planar ``data`` and ``labels`` -> Chunks/Bads (labels shifted to 0-based)."""
    data, labels = d.get("data"), d.get("labels")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.dtype != np.uint8:
        raise DataError(
            f"{where}: 'data' must be an N x (3*R*R) uint8 array, got "
            f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}"
        )
    labels = np.asarray(labels)
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{where}: 'labels' must be {len(data)} integers, got shape {labels.shape} dtype {labels.dtype}"
        )
    side = int(round((data.shape[1] / 3) ** 0.5))
    if 3 * side * side != data.shape[1]:
        raise DataError(f"{where}: rows of {data.shape[1]} values are not 3 square planes")
    images = data.reshape(len(data), 3, side, side).transpose(0, 2, 3, 1)  # planar -> (N, H, W, 3)
    if side != resolution and not resize:
        raise DataError(
            f"{where}: images are {side}x{side} ({data.shape[1]} values per row), expected "
            f"{resolution}x{resolution} ({3 * resolution * resolution}); --resize resamples"
        )
    name = Path(where).name
    ok = (labels >= label_lo) & (labels <= label_hi)
    for i in np.flatnonzero(~ok):
        yield Bad(f"{name}:{i}", f"label {labels[i]}, expected {label_lo}..{label_hi}")
    step = 4096
    for a in range(0, len(data), step):
        idx = np.flatnonzero(ok[a : a + step]) + a
        if len(idx) == 0:
            continue
        imgs = images[idx]
        if side != resolution:
            imgs = np.stack([_fit(Image.fromarray(x), resolution, True) for x in imgs])
        yield Chunk(
            np.ascontiguousarray(imgs), labels[idx].astype(np.int64) - label_lo, [f"{name}:{i}" for i in idx.tolist()]
        )


# ------------------------------------------------------------------------------------------ formats
def _cifar10(src: Path, split: str, resolution: int, resize: bool) -> Source:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if src.is_dir():
        root = src / "cifar-10-batches-py" if (src / "cifar-10-batches-py").is_dir() else src

        def read(name):
            p = root / name
            if not p.is_file():
                raise DataError(
                    f"{p}: missing (expected the CIFAR-10 python batches: data_batch_1..5, test_batch, batches.meta)"
                )
            return p.read_bytes(), str(p)

        opened = None
    elif tarfile.is_tarfile(src):
        opened = _open_tar(src)
        members = {Path(m.name).name: m for m in _tar_stream(opened, src) if m.isfile()}

        def read(name):
            m = members.get(name)
            if m is None:
                raise DataError(f"{src}: no member '{name}' (expected cifar-10-batches-py/{name})")
            return _tar_read(opened, m, src), f"{src}:{m.name}"
    else:
        raise DataError(f"{src}: expected the cifar-10-batches-py directory or cifar-10-python.tar.gz")

    meta_bytes, meta_where = read("batches.meta")
    label_names = _load_batch(meta_bytes, meta_where).get("label_names")
    if not isinstance(label_names, list) or len(label_names) != 10:
        raise DataError(f"{meta_where}: expected 'label_names' with 10 class names")
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in label_names]

    def records():
        try:
            for name in names:
                data, where = read(name)
                yield from _planar_rows(_load_batch(data, where), where, resolution, resize, 0, 9)
        finally:
            if opened is not None:
                opened.close()

    return Source(
        {"format": "cifar10", "path": str(src), "split": split, "files": names}, 10, class_names, records=records()
    )


def _imagenet_batches(src: Path, split: str, resolution: int, resize: bool) -> Source:
    if not src.is_dir():
        raise DataError(f"{src}: expected a directory of train_data_batch_K / val_data files (pickle or .npz)")
    pattern = re.compile(r"^train_data_batch_(\d+)(\.npz)?$" if split == "train" else r"^val_data(\.npz)?$")
    files = [p for p in src.iterdir() if p.is_file() and pattern.match(p.name)]
    files.sort(key=lambda p: int(pattern.match(p.name).group(1)) if split == "train" else 0)
    if not files:
        want = "train_data_batch_1 ..." if split == "train" else "val_data"
        raise DataError(f"{src}: no {split} batch files (expected {want}, pickle or .npz)")

    def records():
        for p in files:
            yield from _planar_rows(_load_batch(p.read_bytes(), str(p)), str(p), resolution, resize, 1, 1000)

    return Source(
        {
            "format": "imagenet-batches",
            "path": str(src),
            "split": split,
            "files": [p.name for p in files],
            "labels": "stored 0-based (file label - 1)",
        },
        1000,
        None,
        records=records(),
    )


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES and not Path(name).name.startswith(".")


class _ClassScan:
    """Pass 1 over the image paths: the class names (parent folder names) and the counts, in bounded memory."""

    def __init__(self, where: Path):
        self.where, self.names, self.images, self.others = where, set(), 0, 0

    def add(self, path: str) -> None:
        if not _is_image(path):
            self.others += 1
            return
        parent = Path(path).parent.name
        if not parent:
            raise DataError(f"{self.where}: '{path}' is not in a class folder (expected <class>/<image>)")
        self.names.add(parent)
        self.images += 1

    def classes(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(sorted(self.names))}


def _walk(src: Path) -> Iterator[str]:
    """Relative paths of the files under ``src``, directories and files in sorted order, streamed."""
    for root, dirs, files in os.walk(src):
        dirs.sort()
        rel = Path(root).relative_to(src)
        for f in sorted(files):
            yield (rel / f).as_posix()


def _image_folder(src: Path, split: str, resolution: int, resize: bool) -> Source:
    if not src.is_dir():
        raise DataError(f"{src}: expected a directory of class folders (<class>/<image>.jpg|png)")
    scan = _ClassScan(src)
    for f in _walk(src):
        scan.add(f)
    classes = scan.classes()
    source = Source(
        {"format": "image-folder", "path": str(src), "split": split},
        len(classes),
        list(classes),
        ignored_files=scan.others,
    )

    def records():
        for f in _walk(src):
            if _is_image(f):
                yield _image_record(source, f, (src / f).read_bytes(), classes[Path(f).parent.name], resolution, resize)

    source.records = records()
    return source


def _open_tar(src: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(src)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{src}: not a readable tar ({type(e).__name__}: {e})") from None


def _tar_stream(tar: tarfile.TarFile, src: Path) -> Iterator[tarfile.TarInfo]:
    """Members in archive order, then a check that the archive is complete (a tar truncated at a member
    boundary otherwise just loses its remaining members). Does not keep the members: tarfile would list
    every member it has seen, which for ImageNet-sized archives is a lot of memory."""
    last = None
    try:
        while (m := tar.next()) is not None:
            tar.members = []
            last = m
            yield m
        if last is not None:
            end = last.offset_data + (-(-last.size // 512) * 512 if last.isfile() else 0)
            tar.fileobj.seek(end)
            marker = tar.fileobj.read(1024)
            if len(marker) < 1024 or any(marker):
                raise tarfile.ReadError("no end-of-archive marker")
    except (tarfile.TarError, EOFError, OSError) as e:
        where = f"inside or right after member '{last.name}'" if last is not None else "in its first header"
        raise DataError(f"{src}: truncated tar: archive ends {where} ({type(e).__name__}: {e})") from None


def _tar_read(tar: tarfile.TarFile, m: tarfile.TarInfo, src: Path) -> bytes:
    try:
        data = tar.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{src}: member '{m.name}': truncated or corrupt tar ({type(e).__name__}: {e})") from None
    if len(data) != m.size:
        raise DataError(f"{src}: member '{m.name}': {len(data)} of {m.size} bytes (truncated tar)")
    return data


def _image_tar(src: Path, split: str, resolution: int, resize: bool) -> Source:
    if not src.is_file():
        raise DataError(f"{src}: expected a tar file of class folders (<class>/<image>.jpg|png)")
    scan = _ClassScan(src)
    with _open_tar(src) as tar:
        for m in _tar_stream(tar, src):
            if m.isfile():
                scan.add(m.name)
    classes = scan.classes()
    source = Source(
        {"format": "image-tar", "path": str(src), "split": split},
        len(classes),
        list(classes),
        ignored_files=scan.others,
    )

    def records():
        with _open_tar(src) as tar:
            for m in _tar_stream(tar, src):
                if m.isfile() and _is_image(m.name):
                    yield _image_record(
                        source, m.name, _tar_read(tar, m, src), classes[Path(m.name).parent.name], resolution, resize
                    )

    source.records = records()
    return source


_READERS = {
    "cifar10": _cifar10,
    "imagenet-batches": _imagenet_batches,
    "image-folder": _image_folder,
    "image-tar": _image_tar,
}


def convert(
    format: str,
    src: str | Path,
    out: str | Path,
    *,
    split: str = "train",
    resolution: int = 32,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    row_group_rows: int = ROW_GROUP_ROWS,
    skip_bad: bool = False,
    resize: bool = False,
    overwrite: bool = False,
) -> Path:
    """Convert ``src`` (one of :data:`FORMATS`) into the split directory ``out``; returns ``out``.

    Raises :class:`DataError` naming the file / member / row for bad input (see the module docstring).
    """
    if format not in _READERS:
        raise DataError(f"format {format!r}: expected one of {', '.join(FORMATS)}")
    if split not in ("train", "test"):
        raise DataError(f"split {split!r}: expected train or test")
    src = Path(src).expanduser()
    if not src.exists():
        raise DataError(f"{src}: does not exist")
    source = _READERS[format](src, split, resolution, resize)
    return write_split(
        source,
        out,
        resolution=resolution,
        rows_per_shard=rows_per_shard,
        row_group_rows=row_group_rows,
        skip_bad=skip_bad,
        overwrite=overwrite,
        resize=resize,
    )
