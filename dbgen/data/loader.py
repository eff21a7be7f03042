"""Training and eval loaders over converted splits: deterministic row order, Ray Data or pyarrow reads.

The row order is planned here from row counts alone (see the :mod:`dbgen.data` docstring); the backends only
read the planned read units ("runs": a slice of one Parquet row group) in order:

* ``backend="arrow"``: pyarrow in this process.
* ``backend="ray"``: a Ray Data pipeline per epoch, ``from_items(runs).map_batches(read)`` with
  ``preserve_order``, iterated with prefetch, so the reads run as Ray tasks ahead of the training step.

Both yield identical batches: uint8 tensors ``(B, C, H, W)``, pinned when CUDA is available.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .resolve import resolve_split
from .split import DataError, Split, check_shards, open_split, read_unit

log = logging.getLogger(__name__)

STATE_VERSION = 1
RAY_READ_CPUS = 0.25  # per read task: small, so reads fit beside fractional Train workers on small machines
RAY_RUNS_PER_TASK = 8  # read units per Ray task (8 x 1024 rows of 32x32 = 24 MiB)
RAY_PREFETCH_BLOCKS = 4


# ------------------------------------------------------------------------------------------ Ray Train glue
def ray_datasets(train_dir: str | Path, eval_dir: str | Path | None = None) -> dict:
    """The ``datasets`` for ``TorchTrainer``: each split's read-unit index as a ``ray.data.Dataset``.

    One row per Parquet row group (``split_dir, shard, row_group, first_row, rows``), built on the driver from
    the validated manifest. Pass ``ray_data_config()`` with it: the index goes unsplit to every worker, whose
    :class:`TrainLoader` / :class:`EvalLoader` take their deterministic share (``streaming_split`` would
    assign rows by timing). Keys: ``"train"`` and, when ``eval_dir`` is given, ``"eval"``.
    """
    import ray.data  # Ray here and below, not at the top: the converter CLIs import this package and need no Ray

    out = {"train": ray.data.from_items(_index_rows(open_split(train_dir)))}
    if eval_dir is not None:
        out["eval"] = ray.data.from_items(_index_rows(open_split(eval_dir)))
    return out


def ray_data_config():
    """The ``ray.train.DataConfig`` to pass with :func:`ray_datasets`: no dataset is ``streaming_split``."""
    import ray.train

    return ray.train.DataConfig(datasets_to_split=[])


def _index_rows(split: Split) -> list[dict]:
    return [
        {"split_dir": str(split.path), "shard": s, "row_group": g, "first_row": first, "rows": n}
        for s, g, first, n in split.units()
    ]


def _split_from_index(iterator, name: str) -> Split:
    """Rebuild the Split from a ``get_dataset_shard`` iterator over :func:`ray_datasets` rows."""
    rows = list(iterator.iter_rows())
    dirs = {r["split_dir"] for r in rows}
    if len(dirs) != 1:
        raise DataError(f"dataset '{name}': expected the read-unit index of one split, got split dirs {dirs}")
    split = open_split(dirs.pop())
    units = sorted((r["shard"], r["row_group"], r["first_row"], r["rows"]) for r in rows)
    if units != split.units():
        raise DataError(
            f"dataset '{name}': read-unit index does not match {split.path}/manifest.json "
            f"(the split changed after ray_datasets() was called)"
        )
    return split


def _train_rank_world() -> tuple[int, int] | None:
    """(rank, world size) inside a Ray Train worker, else None."""
    try:
        import ray.train

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size()
    except (ImportError, RuntimeError, AttributeError):
        return None


def _resolve_source(source, dataset_name: str, split_name: str) -> Split:
    if isinstance(source, Split):
        return source
    if source is None:
        import ray.train

        shard = ray.train.get_dataset_shard(dataset_name)
        if shard is None:
            raise DataError(
                f"no Ray Train dataset '{dataset_name}': pass datasets=ray_datasets(...) and "
                f"dataset_config=ray_data_config() to TorchTrainer, or give the split directory"
            )
        return _split_from_index(shard, dataset_name)
    if isinstance(source, str | Path):
        return open_split(resolve_split(source, split_name))
    return _split_from_index(source, dataset_name)  # a DataIterator from get_dataset_shard


def _rank_world(rank, world_size) -> tuple[int, int]:
    if rank is None or world_size is None:
        ctx = _train_rank_world() or (0, 1)
        rank = ctx[0] if rank is None else rank
        world_size = ctx[1] if world_size is None else world_size
    if not (world_size >= 1 and 0 <= rank < world_size):
        raise ValueError(f"rank {rank}, world_size {world_size}: expected 0 <= rank < world_size")
    return rank, world_size


# ---------------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class Layout:
    """How one epoch is cut: the parts of the plan that may change between a run and its resume."""

    world_size: int
    batch_size: int  # per rank
    shuffle_buffer: int
    drop_last: bool


@dataclass
class RankPlan:
    rows: np.ndarray  # (n,) global row ids of this rank's segment, in read order
    order: np.ndarray  # (n,) output position -> index into rows (a permutation within each window)
    window: int  # rows per shuffle window
    batch_size: int

    @property
    def num_batches(self) -> int:
        return -(-len(self.rows) // self.batch_size)


def _unit_arrays(split: Split) -> tuple[np.ndarray, np.ndarray]:
    units = np.asarray(split.units(), dtype=np.int64).reshape(-1, 4)
    return units[:, 2], units[:, 3]  # first global row, rows


def epoch_stream(split: Split, seed: int, epoch: int) -> np.ndarray:
    """All global row ids of an epoch, read units permuted with a ``(seed, epoch)`` generator: (N,) int64."""
    first, rows = _unit_arrays(split)
    perm = np.random.default_rng([seed, epoch, 0]).permutation(len(first))
    lens = rows[perm]
    offsets = np.cumsum(lens) - lens  # start of each permuted unit in the stream
    return np.arange(int(lens.sum()), dtype=np.int64) - np.repeat(offsets, lens) + np.repeat(first[perm], lens)


def rank_plan(stream: np.ndarray, layout: Layout, rank: int, seed: int, epoch: int) -> RankPlan:
    """Rank ``rank``'s contiguous segment of ``stream`` and its window-shuffled output order."""
    w, b, n = layout.world_size, layout.batch_size, len(stream)
    full = n // (w * b)  # full global batches
    if layout.drop_last:
        lo, size = rank * full * b, full * b
    else:  # the final partial global batch is split evenly; the first (rest % w) ranks get one row more
        rest = n - full * w * b
        lo = rank * full * b + rank * (rest // w) + min(rank, rest % w)
        size = full * b + rest // w + (rank < rest % w)
    rows = stream[lo : lo + size]
    window = max(layout.shuffle_buffer, 1)
    rng = np.random.default_rng([seed, epoch, 1, rank])
    order = np.arange(size, dtype=np.int64)
    if window > 1:
        for start in range(0, size, window):
            stop = min(start + window, size)
            order[start:stop] = start + rng.permutation(stop - start)
    return RankPlan(rows=rows, order=order, window=window, batch_size=b)


def epoch_plan(
    split: Split, seed: int, epoch: int, layout: Layout, rank: int, history: list[tuple[Layout, int]] = ()
) -> RankPlan:
    """This rank's plan for ``epoch``; ``history`` = earlier layouts of this epoch and the batches each
    consumed before a resume changed the layout. Their rows are removed from the stream first."""
    stream = epoch_stream(split, seed, epoch)
    for old, batches in history:
        consumed = []
        for r in range(old.world_size):
            p = rank_plan(stream, old, r, seed, epoch)
            consumed.append(p.rows[p.order[: batches * old.batch_size]])
        stream = stream[~np.isin(stream, np.concatenate(consumed))]
    return rank_plan(stream, layout, rank, seed, epoch)


def _runs(split: Split, rows: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Global row ids (in read order) -> runs ``(shard, row_group, lo, hi)`` of consecutive rows of one unit."""
    if len(rows) == 0:
        return []
    units = split.units()
    first = np.asarray([u[2] for u in units], dtype=np.int64)
    u = np.searchsorted(first, rows, side="right") - 1
    breaks = np.flatnonzero((np.diff(u) != 0) | (np.diff(rows) != 1)) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(rows)]])
    out = []
    for a, z in zip(starts.tolist(), stops.tolist(), strict=True):
        shard, group, unit_first, _ = units[u[a]]
        lo = int(rows[a] - unit_first)
        out.append((shard, group, lo, lo + (z - a)))
    return out


# ----------------------------------------------------------------------------------------------- reading
@functools.lru_cache(maxsize=4)
def _cached_unit(split: Split, shard: int, group: int) -> np.ndarray:
    return read_unit(split, shard, group)


def _arrow_arrays(split: Split, runs):
    """Yields (n, R*R*C) uint8 arrays for ``runs`` in order (a unit split over two windows is read once)."""
    for shard, group, lo, hi in runs:
        yield _cached_unit(split, shard, group)[lo:hi]


def _read_runs_batch(batch: dict, split: Split) -> dict:
    """Ray Data map_batches function: the runs of a batch of index rows -> their pixels, in order."""
    parts = [
        read_unit(split, int(s), int(g), int(lo), int(hi))
        for s, g, lo, hi in zip(batch["shard"], batch["group"], batch["lo"], batch["hi"], strict=True)
    ]
    seq = np.repeat(batch["seq"], batch["hi"] - batch["lo"])  # (n,) which run each row came from
    return {"image": np.concatenate(parts), "seq": seq}  # image: (n, R*R*C)


def _ray_arrays(split: Split, runs):
    """Same as :func:`_arrow_arrays`, read by a Ray Data pipeline (order preserved, prefetched)."""
    import ray.data

    if not runs:
        return
    items = [{"seq": i, "shard": s, "group": g, "lo": lo, "hi": hi} for i, (s, g, lo, hi) in enumerate(runs)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // RAY_RUNS_PER_TASK)))
    ds = ds.map_batches(
        _read_runs_batch,
        fn_kwargs={"split": split},
        batch_size=RAY_RUNS_PER_TASK,
        batch_format="numpy",
        num_cpus=RAY_READ_CPUS,
    )
    ds.context.execution_options.preserve_order = True  # the plan's order, not completion order
    ds.context.enable_progress_bars = False  # one pipeline per epoch and rank: keep the logs quiet
    ds.context.print_on_execution_start = False
    # A read's DataError (a corrupt shard) reaches us as itself, not as Ray Data's UserCodeException, whose
    # pickled form drops the original: the trainer must see a DataError (not retryable) naming the shard.
    ds.context.raise_original_map_exception = True
    # Check what preserve_order promises: rows arrive run by run, as planned (an exact resume depends on it).
    expected = np.repeat(np.arange(len(runs)), [hi - lo for _, _, lo, hi in runs])
    done = 0
    try:
        for block in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=RAY_PREFETCH_BLOCKS):
            n = len(block["seq"])
            if not np.array_equal(block["seq"], expected[done : done + n]):
                raise DataError(f"{split.path}: Ray Data delivered read units out of the planned order")
            done += n
            yield block["image"]
    except DataError as e:  # from a read task: RayTaskError(DataError), whose message is the remote traceback
        raise DataError(getattr(e, "cause", e).message) from None


class _RowStream:
    """Takes exact row counts from an iterator of arrays of varying length."""

    def __init__(self, arrays):
        self._it = iter(arrays)
        self._buf: list[np.ndarray] = []
        self._have = 0

    def take(self, n: int) -> np.ndarray:
        while self._have < n:
            a = next(self._it, None)
            if a is None:
                raise DataError(f"reader ended {n - self._have} rows early")
            self._buf.append(a)
            self._have += len(a)
        if n == 0:
            return np.empty((0, 0), np.uint8)
        data = self._buf[0] if len(self._buf) == 1 else np.concatenate(self._buf)
        self._buf = [data[n:]] if len(data) > n else []
        self._have -= n
        return data[:n]

    def close(self) -> None:
        """Stop the reader now (a Ray Data pipeline otherwise stays open until garbage collection)."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def _to_tensor(x: np.ndarray, split: Split, pin: bool):
    import torch  # here, not at the top: the converter CLIs import this package and need no torch

    r, c = split.resolution, split.channels
    out = torch.empty((len(x), c, r, r), dtype=torch.uint8, pin_memory=pin)  # (B, C, H, W)
    # HWC -> CHW in one copy. numpy, not Tensor.copy_: torch's multi-threaded permute-copy is up to 15x
    # slower when the cores are shared with the training step.
    out.numpy()[:] = x.reshape(len(x), r, r, c).transpose(0, 3, 1, 2)
    return out


def _pin_default(pin_memory: bool | None) -> bool:
    import torch

    return torch.cuda.is_available() if pin_memory is None else pin_memory


def _check_backend(backend: str) -> None:
    if backend not in ("ray", "arrow"):
        raise ValueError(f"backend {backend!r}: expected 'ray' or 'arrow'")


# ------------------------------------------------------------------------------------------------ loaders
class TrainLoader:
    """Endless training batches for one rank: uint8 ``(batch_size, C, H, W)`` tensors, epoch after epoch.

    Args:
        source: ``None`` inside a Ray Train worker (takes ``ray.train.get_dataset_shard("train")``, the index
            from :func:`ray_datasets`), or a split directory / ``builtin:NAME`` / :class:`Split` /
            ``DataIterator`` over :func:`ray_datasets` rows.
        batch_size: rows per batch on this rank (the global batch is ``batch_size * world_size``).
        seed: the run's seed; with the epoch and rank it fixes the order (see :mod:`dbgen.data`).
        rank, world_size: default to the Ray Train context, else 0 and 1.
        shuffle_buffer: rows per shuffle window (bounded memory: one window of pixels); <= 1 disables.
        drop_last: drop the epoch's last partial global batch (every rank then yields ``len(self)`` full
            batches per epoch); with ``False`` the last batch is smaller and, with several ranks, may be
            missing on some of them.
        backend: ``"ray"`` (Ray Data reads) or ``"arrow"`` (pyarrow in-process); same batches.
        pin_memory: pin the yielded tensors; ``None`` = when CUDA is available.

    ``state_dict()`` after ``k`` batches of an epoch restores (``load_state_dict``) to yield batch ``k + 1``
    next; see the module docstring for resuming with another world size.
    """

    def __init__(
        self,
        source=None,
        *,
        batch_size: int,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle_buffer: int = 10_000,
        drop_last: bool = True,
        backend: str = "ray",
        pin_memory: bool | None = None,
    ):
        _check_backend(backend)
        if batch_size < 1 or seed < 0:
            raise ValueError(f"batch_size {batch_size}, seed {seed}: expected batch_size >= 1, seed >= 0")
        self.split = _resolve_source(source, "train", "train")
        check_shards(self.split)  # a corrupt shard fails here, before the first step (once per process)
        self.rank, world_size = _rank_world(rank, world_size)
        self.layout = Layout(world_size, batch_size, shuffle_buffer, drop_last)
        self.seed, self.backend = seed, backend
        self.pin = _pin_default(pin_memory)
        self.epoch, self.batch = 0, 0  # position: batches already yielded in this epoch
        self._history: list[tuple[Layout, int]] = []
        if len(self) == 0:
            raise DataError(
                f"{self.split.path}: {self.split.num_rows} rows, fewer than one global batch "
                f"({world_size} x {batch_size}) with drop_last"
            )

    def __len__(self) -> int:
        """Batches per epoch on this rank (for an epoch without a layout change)."""
        w, b, n = self.layout.world_size, self.layout.batch_size, self.split.num_rows
        if self.layout.drop_last:
            return n // (w * b)
        return rank_plan(np.arange(n), self.layout, self.rank, 0, 0).num_batches

    def __iter__(self):
        while True:
            plan = epoch_plan(self.split, self.seed, self.epoch, self.layout, self.rank, self._history)
            for x in self._iter_plan(plan, self.batch):
                self.batch += 1
                yield x
            self.epoch, self.batch, self._history = self.epoch + 1, 0, []

    def _iter_plan(self, plan: RankPlan, start_batch: int):
        b, n, window = plan.batch_size, len(plan.rows), plan.window
        pos = start_batch * b
        if pos >= n:
            return
        first_window = pos // window
        runs = _runs(self.split, plan.rows[first_window * window :])
        arrays = _ray_arrays(self.split, runs) if self.backend == "ray" else _arrow_arrays(self.split, runs)
        stream, carry = _RowStream(arrays), None  # carry: < b rows left over from the previous window
        for lo in range(first_window * window, n, window):
            hi = min(lo + window, n)
            data = stream.take(hi - lo)  # (hi - lo, R*R*C), read order
            if hi == n:
                stream.close()
            out = data[plan.order[lo:hi] - lo]  # shuffled within the window
            if lo < pos:
                out = out[pos - lo :]
            if carry is not None:
                out = np.concatenate([carry, out])
            full = len(out) // b * b
            for k in range(0, full, b):
                yield _to_tensor(out[k : k + b], self.split, self.pin)
            carry = out[full:] if full < len(out) else None
        if carry is not None:
            yield _to_tensor(carry, self.split, self.pin)  # the last, partial batch (drop_last=False)

    def state_dict(self) -> dict:
        """JSON-able position; the same on every rank (they advance in lockstep), so rank 0's suffices."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "fingerprint": self.split.fingerprint,
            "num_rows": self.split.num_rows,
            "layout": asdict(self.layout),
            "history": [[asdict(lay), k] for lay, k in self._history],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` left off: no row of the interrupted epoch repeated or skipped."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        if state["fingerprint"] != self.split.fingerprint or state["num_rows"] != self.split.num_rows:
            raise DataError(
                f"loader state is for another split (fingerprint {state['fingerprint']}, "
                f"{state['num_rows']} rows) than {self.split.path} ({self.split.fingerprint}, "
                f"{self.split.num_rows} rows)"
            )
        if state["seed"] != self.seed:
            raise DataError(
                f"loader state has seed {state['seed']}, this loader {self.seed}: the resumed "
                f"epoch's order would differ; construct the loader with seed={state['seed']}"
            )
        old = Layout(**state["layout"])
        history = [(Layout(**lay), k) for lay, k in state["history"]]
        self.epoch, self.batch = state["epoch"], state["batch"]
        if old != self.layout and self.batch > 0:
            log.info(
                "resuming epoch %d with layout %s (was %s after %d batches): finishing the epoch on the "
                "rows not yet consumed",
                self.epoch,
                self.layout,
                old,
                self.batch,
            )
            history.append((old, self.batch))
            self.batch = 0
        self._history = history


class EvalLoader:
    """One pass over a split for one rank: no shuffle, nothing dropped, every row on exactly one rank.

    Rank ``r`` takes the ``r``-th of ``world_size`` contiguous, near-equal parts of the split in storage order
    and yields them in ``len(self)`` batches. ``len(self)`` is the same on every rank (so a forward pass that
    communicates cannot hang): the part is cut into that many near-equal batches of at most ``batch_size``
    rows. Batches are non-empty unless the split has fewer rows than ``world_size * len(self)``.
    Arguments as :class:`TrainLoader`; ``source=None`` takes ``get_dataset_shard("eval")``.
    """

    def __init__(
        self,
        source=None,
        *,
        batch_size: int,
        rank: int | None = None,
        world_size: int | None = None,
        backend: str = "ray",
        pin_memory: bool | None = None,
    ):
        _check_backend(backend)
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size}: expected >= 1")
        self.split = _resolve_source(source, "eval", "test")
        check_shards(self.split)  # once per process
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.batch_size, self.backend = batch_size, backend
        self.pin = _pin_default(pin_memory)
        n, w = self.split.num_rows, self.world_size
        self.lo = self.rank * (n // w) + min(self.rank, n % w)
        self.num_rows = n // w + (self.rank < n % w)  # rows of this rank
        self._num_batches = -(-(n // w + (n % w > 0)) // batch_size)  # from the largest part: same everywhere

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self):
        rows = np.arange(self.lo, self.lo + self.num_rows, dtype=np.int64)
        runs = _runs(self.split, rows)
        arrays = _ray_arrays(self.split, runs) if self.backend == "ray" else _arrow_arrays(self.split, runs)
        stream = _RowStream(arrays)
        sizes = np.diff(np.linspace(0, self.num_rows, len(self) + 1).round().astype(np.int64))
        for i, size in enumerate(sizes.tolist()):
            x = stream.take(size).reshape(size, self.split.row_bytes)
            if i == len(sizes) - 1:
                stream.close()
            yield _to_tensor(x, self.split, self.pin)
