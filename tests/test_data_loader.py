"""Loaders (pyarrow backend, in-process): exactly-once epochs, determinism, shuffle bounds, exact resume."""

import itertools

import numpy as np
import pytest
import torch
from test_data_convert import id_split, ids_of

from dbgen.data import DataError, EvalLoader, TrainLoader, open_split
from dbgen.data.loader import Layout, epoch_stream, rank_plan

N = 1000  # rows; shards of 150 rows, row groups of 64: 7 shards, 21 read units of unequal length


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    return id_split(tmp_path_factory.mktemp("ids"), N)


def loaders(split_dir, world_size, **kw):
    kw.setdefault("batch_size", 16)
    return [TrainLoader(split_dir, rank=r, world_size=world_size, backend="arrow", **kw) for r in range(world_size)]


def take(loader, n):
    return [ids_of(x) for x in itertools.islice(iter(loader), n)]


def epoch_ids(ranks, epochs=1):
    """Per epoch, the concatenated ids of all ranks (each rank reads len(loader) batches per epoch)."""
    out = []
    iters = [iter(lo) for lo in ranks]
    for _ in range(epochs):
        out.append(
            [np.concatenate([ids_of(next(it)) for _ in range(len(lo))]) for lo, it in zip(ranks, iters, strict=True)]
        )
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_exactly_once_per_epoch_drop_last(split_dir, world_size):
    ranks = loaders(split_dir, world_size, shuffle_buffer=100, seed=3)
    global_batch = 16 * world_size
    for per_rank in epoch_ids(ranks, epochs=3):
        assert {len(lo) for lo in ranks} == {N // global_batch}
        ids = np.concatenate(per_rank)
        assert len(ids) == N // global_batch * global_batch  # only the last partial global batch dropped
        assert len(np.unique(ids)) == len(ids) and ids.min() >= 0 and ids.max() < N


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_exactly_once_per_epoch_no_drop(split_dir, world_size):
    ranks = loaders(split_dir, world_size, shuffle_buffer=100, seed=3, drop_last=False)
    for per_rank in epoch_ids(ranks, epochs=2):
        ids = np.concatenate(per_rank)
        assert sorted(ids.tolist()) == list(range(N))
        assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1


def test_batches_are_uint8_nchw(split_dir):
    x = next(iter(loaders(split_dir, 1)[0]))
    assert x.dtype == torch.uint8 and x.shape == (16, 3, 8, 8) and x.is_contiguous()
    assert not x.is_pinned()  # no CUDA here; pin_memory=None pins only when CUDA is available


def test_pixels_match_storage(split_dir):
    """A batch's pixels are the stored HWC rows, transposed to CHW."""
    from dbgen.data import read_rows

    rows = read_rows(split_dir)
    x = next(iter(loaders(split_dir, 1, seed=5)[0]))
    np.testing.assert_array_equal(x.permute(0, 2, 3, 1).numpy(), rows["image"][ids_of(x)])


def test_order_is_deterministic_and_changes_with_epoch_and_seed(split_dir):
    a = take(loaders(split_dir, 2, seed=1)[1], 2 * len(loaders(split_dir, 2)[1]))
    b = take(loaders(split_dir, 2, seed=1)[1], len(a))
    c = take(loaders(split_dir, 2, seed=2)[1], len(a))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    half = len(a) // 2
    assert not np.array_equal(np.concatenate(a[:half]), np.concatenate(a[half:]))  # epoch 0 vs epoch 1
    assert not np.array_equal(np.concatenate(a), np.concatenate(c))


def test_shuffle_is_bounded_by_the_buffer(split_dir):
    """Every output row comes from the current window of ``shuffle_buffer`` rows of the rank's read stream."""
    split = open_split(split_dir)
    layout = Layout(world_size=2, batch_size=16, shuffle_buffer=100, drop_last=True)
    stream = epoch_stream(split, seed=4, epoch=0)
    assert sorted(stream.tolist()) == list(range(N))
    # The read stream is made of whole read units (row groups) in permuted order.
    units = [(first, first + n) for _, _, first, n in split.units()]
    pos = 0
    while pos < N:
        unit = next(u for u in units if u[0] == stream[pos])
        assert stream[pos : pos + unit[1] - unit[0]].tolist() == list(range(*unit))
        pos += unit[1] - unit[0]
    plan = rank_plan(stream, layout, rank=1, seed=4, epoch=0)
    out_pos = plan.order
    window = np.arange(len(out_pos)) // 100
    assert np.array_equal(out_pos // 100, window)  # never leaves its window
    assert not np.array_equal(out_pos, np.arange(len(out_pos)))  # but does shuffle
    ids = np.concatenate(take(loaders(split_dir, 2, seed=4, shuffle_buffer=100)[1], len(plan.rows) // 16))
    np.testing.assert_array_equal(ids, plan.rows[plan.order])


def test_no_shuffle_buffer_reads_in_stream_order(split_dir):
    lo = loaders(split_dir, 1, seed=0, shuffle_buffer=0)[0]
    ids = np.concatenate(take(lo, len(lo)))
    np.testing.assert_array_equal(ids, epoch_stream(open_split(split_dir), 0, 0)[: len(ids)])


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_resume_mid_epoch_is_exact(split_dir, world_size):
    """k batches, state_dict, new loaders, load_state_dict: the same batches as an uninterrupted run."""
    per_epoch = len(loaders(split_dir, world_size)[0])
    total, k = 2 * per_epoch + 5, per_epoch + 7  # interrupt in the middle of the second epoch
    for rank in range(world_size):
        ref = take(loaders(split_dir, world_size, seed=9)[rank], total)
        first = loaders(split_dir, world_size, seed=9)[rank]
        got = take(first, k)
        state = first.state_dict()
        assert state["epoch"] == 1 and state["batch"] == 7
        resumed = loaders(split_dir, world_size, seed=9)[rank]
        resumed.load_state_dict(state)
        got += take(resumed, total - k)
        assert all(np.array_equal(a, b) for a, b in zip(ref, got, strict=True))


def test_state_is_identical_across_ranks(split_dir):
    ranks = loaders(split_dir, 3, seed=2)
    for lo in ranks:
        take(lo, 5)
    assert ranks[0].state_dict() == ranks[1].state_dict() == ranks[2].state_dict()


@pytest.mark.parametrize("old,new", [(2, 3), (3, 1), (1, 2)])
def test_resume_with_other_world_size_neither_repeats_nor_skips(split_dir, old, new):
    """Same global batch (48), other world size: the interrupted epoch finishes on the unconsumed rows."""
    olds = loaders(split_dir, old, batch_size=48 // old, seed=6)
    consumed = [np.concatenate(take(lo, 9)) for lo in olds]
    state = olds[0].state_dict()
    rest, next_epoch = [], []
    for lo in loaders(split_dir, new, batch_size=48 // new, seed=6):
        lo.load_state_dict(state)
        it, mine = iter(lo), []
        while lo.epoch == 0:
            mine.append(ids_of(next(it)))
        rest.append(np.concatenate(mine[:-1]))
        next_epoch.append(mine[-1])  # the first batch of epoch 1
    ids = np.concatenate(consumed + rest)
    assert len(np.unique(ids)) == len(ids)  # nothing repeated
    assert len(ids) == N // 48 * 48  # nothing skipped beyond the documented drop_last tail
    # Epoch 1 follows the plain plan of the new world size.
    for rank, lo in enumerate(loaders(split_dir, new, batch_size=48 // new, seed=6)):
        np.testing.assert_array_equal(take(lo, len(lo) + 1)[-1], next_epoch[rank])


def test_load_state_rejects_other_split_or_seed(split_dir, tmp_path):
    state = loaders(split_dir, 1, seed=1)[0].state_dict()
    with pytest.raises(DataError, match="seed 1, this loader 2"):
        loaders(split_dir, 1, seed=2)[0].load_state_dict(state)
    other = id_split(tmp_path, 500)
    with pytest.raises(DataError, match="loader state is for another split"):
        TrainLoader(other, batch_size=16, backend="arrow").load_state_dict(state)


def test_too_few_rows_for_a_global_batch(split_dir):
    with pytest.raises(DataError, match="1000 rows, fewer than one global batch"):
        TrainLoader(split_dir, batch_size=400, rank=0, world_size=3, backend="arrow")


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_loader_each_row_once_in_order(split_dir, world_size):
    parts = [
        EvalLoader(split_dir, batch_size=64, rank=r, world_size=world_size, backend="arrow") for r in range(world_size)
    ]
    assert len({len(p) for p in parts}) == 1  # same number of batches on every rank
    batches = [[ids_of(x) for x in p] for p in parts]
    assert all(len(b) == len(p) for b, p in zip(batches, parts, strict=True))
    assert all(0 < len(x) <= 64 for b in batches for x in b)
    ids = np.concatenate([np.concatenate(b) for b in batches])
    np.testing.assert_array_equal(ids, np.arange(N))  # no shuffle, nothing dropped, rank parts contiguous
    again = np.concatenate([ids_of(x) for x in parts[-1]])  # re-iterable
    np.testing.assert_array_equal(again, np.concatenate(batches[-1]))
