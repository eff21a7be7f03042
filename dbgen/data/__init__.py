"""Data: Parquet image splits, their converters, the built-in default data, and the training/eval loaders.

On disk a *split* is a directory of Parquet shards plus ``manifest.json`` (written last, atomically)::

    shard-00000.parquet ...   image: fixed_size_binary[R*R*3] (uint8, HWC), label: int32, source: string;
                              a CRC32 per page
    manifest.json             format_version, resolution, channels, num_rows, rows_per_shard, row_group_rows,
                              class_names, shards [{file, rows, bytes, sha256}], page_checksums, source,
                              skipped, color_conversions

Integrity: the loaders check every shard's sha256 once per process, when built; ``verify_split`` also checks
the page CRCs (why not the loaders: :mod:`dbgen.data.split`).

The image column is ``fixed_size_binary``, not ``fixed_size_list<uint8>``: Parquet stores a uint8 list as
INT32 values with per-value levels (4x the bytes, read at 18-27k rows/s), a fixed-size binary as the raw bytes
(read at ~600k rows/s); see :func:`dbgen.data.split.arrow_schema`.

Build one with ``python -m dbgen.data.convert --format {cifar10,imagenet-batches,image-folder,image-tar}
--src PATH --out DIR`` (formats: :mod:`dbgen.data.converters`) or get the built-in one with
``builtin("photos32")``.

Modules, each depending only on those before it: :mod:`~dbgen.data.split` (the on-disk format: open, verify,
read), :mod:`~dbgen.data.writer` (write a split from records), :mod:`~dbgen.data.converters` (input formats)
and :mod:`~dbgen.data.builtin` (the built-in data set), :mod:`~dbgen.data.resolve` (a data spec such as
``builtin:photos32`` -> a split directory), :mod:`~dbgen.data.loader` (the training and eval loaders).

Row order (the decision the exact-resume test depends on)
---------------------------------------------------------
Ray Train's default ingest (``streaming_split``) hands blocks to whichever worker asks first, so which rows a
rank sees depends on timing, and an interrupted run cannot be replayed. We therefore do NOT let Ray decide the
assignment. Every epoch's order is a pure function of ``(seed, epoch, rank, world_size, batch_size,
shuffle_buffer, drop_last)`` and the manifest, computed identically on every rank from row counts alone:

1. the split's read units (Parquet row groups, ``row_group_rows`` = 1024 rows by default) are permuted with a
   generator seeded by ``(seed, epoch)`` ("shard order");
2. the concatenated stream is cut into ``world_size`` contiguous, equal segments, rank ``r`` taking segment
   ``r`` (``drop_last=True``: every rank gets ``floor(N / (world_size * batch_size)) * batch_size`` rows, the
   rest of the stream - different rows every epoch - is dropped; ``drop_last=False``: the epoch's final,
   partial global batch is split evenly over the ranks, so when it has fewer rows than ranks some ranks get
   one batch fewer - use ``drop_last=True`` with more than one worker);
3. each rank shuffles its segment in windows of ``shuffle_buffer`` rows (a bounded shuffle buffer), seeded by
   ``(seed, epoch, rank)``, and yields consecutive batches of ``batch_size`` rows.

Both backends read exactly the rows this plan names, in this order: ``backend="ray"`` (the default,
``data.loader: ray``) runs the reads as a Ray Data pipeline inside each Train worker (``from_items(read units)
.map_batches(read)`` with ``preserve_order``, so reading, prefetch and the object store are Ray Data's while the
order stays ours); ``backend="arrow"`` reads the same units with pyarrow in-process. The two backends yield
identical batches. Every rank reads only its own segment (plus at most two shared boundary row groups).

Ray Train integration: pass ``ray_datasets(train_dir, eval_dir)`` as ``TorchTrainer(datasets=...)`` and
``ray_data_config()`` as ``TorchTrainer(dataset_config=...)``. The datasets are the splits' *read-unit
indexes* (one row per Parquet row group), given unsplit to every worker; inside a worker
``TrainLoader(batch_size=...)`` takes ``ray.train.get_dataset_shard("train")`` and rank / world size from the
Train context.

Resume: ``TrainLoader.state_dict()`` (identical on every rank, so rank 0's is enough) records the epoch and the
number of batches yielded in it. Restoring with the same world size and batch size continues with exactly the
batches an uninterrupted run would have produced. Restoring with a different world size (or per-rank batch
size) finishes the interrupted epoch on the rows that no old rank had consumed yet - no row repeated or
skipped, but a different order than either uninterrupted run - and later epochs follow the plan for the new
world size.
"""

from .builtin import BUILTINS, builtin
from .converters import FORMATS, convert
from .loader import EvalLoader, TrainLoader, ray_data_config, ray_datasets
from .resolve import resolve_split
from .split import DataError, Split, open_split, read_rows, verify_split

__all__ = [
    "BUILTINS",
    "DataError",
    "EvalLoader",
    "FORMATS",
    "Split",
    "TrainLoader",
    "builtin",
    "convert",
    "open_split",
    "ray_data_config",
    "ray_datasets",
    "read_rows",
    "resolve_split",
    "verify_split",
]
