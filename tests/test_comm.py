"""dbgen.sync's communication: byte accounting, 1-bit messages, the flat binary layout, per-rank partitions (fast,
one process);
and, in spawned gloo process groups (slow): the counted bytes of every collective and of a whole training step
in every comm mode equal what the kernel saw this process write to its sockets (``/proc/self/io`` wchar)."""

from pathlib import Path

import pytest
import torch
from bounds import gamma
from gloo_group import spawn

from dbgen.nn import pack_signs
from dbgen.sync import accounting
from dbgen.sync.accounting import CommCounter, bytes_sent, comm_kind, current_kind
from dbgen.sync.collectives import all_gather_flat, start_slice_sum
from dbgen.sync.layout import ALIGN, BinaryLayout, load_partitions, save_partition, slice_size
from dbgen.sync.onebit import ONEBIT_CHUNK, OneBitExchange, onebit_compress, onebit_decompress

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "rvae_binary_tiny.yaml"


# ------------------------------------------------------------------------------------------------ formulas
def test_bytes_sent_per_algorithm():
    n = 1200
    assert bytes_sent("all_reduce", n, 2, 0) == 1200  # ring: 2 (W-1)/W n
    assert bytes_sent("all_reduce", n, 3, 1) == 1600
    assert bytes_sent("reduce_scatter", n, 3, 0, "gloo") == 1600  # gloo runs an all-reduce
    assert bytes_sent("reduce_scatter", n, 3, 0, "nccl") == 800
    assert bytes_sent("all_to_all", n, 3, 2) == 800  # the two thirds that leave
    assert bytes_sent("all_gather", n, 3, 0) == 2400  # (W-1) n: n is this rank's input
    assert bytes_sent("broadcast", n, 3, 0, root=0) == 2400 and bytes_sent("broadcast", n, 3, 1, root=0) == 0
    assert bytes_sent("all_reduce", n, 1, 0) == 0
    with pytest.raises(ValueError, match="unknown op"):
        bytes_sent("allreduce", n, 2, 0)


def test_counter_takes_per_kind_and_kinds_nest():
    c = CommCounter()
    c.add("grad", 10, "all_reduce")
    c.add("weight", 3, "all_gather")
    assert c.take() == {"grad": 10, "weight": 3, "other": 0}
    assert c.take() == {"grad": 0, "weight": 0, "other": 0}
    assert c.total == {"grad": 10, "weight": 3, "other": 0}
    assert current_kind() == "other"
    with comm_kind("grad"):
        with comm_kind("weight"):
            assert current_kind() == "weight"
        assert current_kind() == "grad"
    with pytest.raises(ValueError, match="comm kind 'grads'"):
        c.add("grads", 1)
    with pytest.raises(ValueError, match="expected one of"), comm_kind("bytes"):
        pass


# -------------------------------------------------------------------------------------------- 1-bit messages
def test_onebit_message_is_sign_times_mean_abs_per_chunk():
    torch.manual_seed(0)
    x = torch.randn(3 * ONEBIT_CHUNK)
    bits, scales = onebit_compress(x)
    assert bits.dtype == torch.uint8 and bits.numel() == x.numel() // 8 and scales.numel() == 3
    assert torch.equal(scales, x.view(3, -1).abs().mean(1))  # the same reduction on the same values: identical
    y = onebit_decompress(bits, scales)
    assert torch.equal(torch.sign(y), torch.where(x >= 0, 1.0, -1.0))
    assert torch.equal(y.abs(), scales.repeat_interleave(ONEBIT_CHUNK))  # +-1 * scale is exact
    # +-s inputs pass exactly
    z = torch.where(torch.rand(ONEBIT_CHUNK) > 0.5, 0.25, -0.25)
    assert torch.equal(onebit_decompress(*onebit_compress(z)), z)


def test_error_feedback_makes_the_mean_of_messages_converge():
    """Sending ``g`` every step: with error feedback the mean of the decoded messages converges to ``g`` (the
    residual error grows only like sqrt(t)); without it the mean stays the compressor's biased ``C(g)``."""
    torch.manual_seed(0)
    g = torch.randn(ONEBIT_CHUNK) * torch.linspace(0.01, 2.0, ONEBIT_CHUNK)  # very unequal magnitudes
    err, sent = torch.zeros_like(g), torch.zeros_like(g)
    rel = {}
    for t in range(1, 801):
        x = g + err
        q = onebit_decompress(*onebit_compress(x))
        err = x - q
        sent += q
        rel[t] = ((sent / t - g).norm() / g.norm()).item()
    plain = ((onebit_decompress(*onebit_compress(g)) - g).norm() / g.norm()).item()
    assert plain > 0.4  # one scale per chunk cannot carry magnitudes from 0.01 to 2
    # Modelling, not rounding: the residual grows like sqrt(t), so the mean's error falls like 1/sqrt(t)
    # (0.16, 0.09, 0.043 at t = 50, 200, 800 for this seed; 0.06 leaves ~40% at 800).
    assert rel[800] < 0.06 and rel[800] < rel[200] < rel[50] < plain


# ---------------------------------------------------------------------------------------------- the layout
def _params(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in sizes]


SIZES = [(3, 5, 3), (7,), (2, 11, 5, 5), (1,), (13, 3)]  # 45 + 7 + 550 + 1 + 39 = 642, offsets not byte-aligned


def test_layout_slices_flat_split_and_signs():
    params = _params(SIZES)
    lay = BinaryLayout(params, world=3, rank=1)
    assert lay.numel == 642 and lay.slice == ALIGN and lay.padded == 3 * ALIGN
    assert (lay.start, lay.valid) == (ALIGN, 0)  # 642 elements fit in rank 0's slice
    assert BinaryLayout(params, 1, 0).valid == 642
    assert slice_size(10 * ALIGN + 1, 2) == 6 * ALIGN
    flat = lay.flat([p.detach() for p in params])
    assert flat.shape == (3 * ALIGN,) and torch.equal(flat[642:], torch.zeros(3 * ALIGN - 642))
    for p, v in zip(params, lay.split(flat), strict=True):
        assert torch.equal(p.detach(), v)
    assert torch.equal(lay.flat([None, *params[1:]])[:45], torch.zeros(45))
    # signs written from the packed flat vector, tensor by tensor at bit offsets 45, 52, 602, 603
    expected = [torch.where(p.detach() >= 0, 1.0, -1.0) for p in params]
    lay.write_signs(pack_signs(flat))
    for p, e in zip(params, expected, strict=True):
        assert torch.equal(p.detach(), e)


def test_partitions_reshard_to_any_world_size(tmp_path):
    """Written by 2 ranks, read by 3 and by 1: every element lands where the new layout puts it; sender
    errors (one per old rank's data stream) become their mean when the world size changes."""
    sizes = [(ALIGN + 100,), (ALIGN // 2, 3)]  # 5220 elements: 2 slices of 3 * ALIGN / 2? see slice_size
    params = _params(sizes)
    numel = sum(p.numel() for p in params)
    latent = torch.arange(numel, dtype=torch.float32)
    m, v = latent * 2, latent * 3
    errors = [torch.full((numel,), 1.0), torch.full((numel,), 3.0)]
    for r in range(2):
        lay = BinaryLayout(params, 2, r)
        a = lay.start
        pad = torch.zeros(lay.padded)
        sl = slice(a, a + lay.slice)
        ranged = {k: torch.cat([t, pad])[sl] for k, t in (("latent", latent), ("exp_avg", m), ("exp_avg_sq", v))}
        save_partition(tmp_path, lay, ranged, {"send_error": errors[r]}, {"step": torch.tensor(7.0)})
    assert sorted(p.name for p in (tmp_path / "packed").iterdir()) == [
        "rank_00000_of_00002.pt",
        "rank_00001_of_00002.pt",
    ]
    for world in (1, 2, 3):
        for r in range(world):
            lay = BinaryLayout(params, world, r)
            got = load_partitions(tmp_path, lay, ["latent", "exp_avg", "exp_avg_sq"], ["send_error"])
            lo, n = lay.start, lay.valid
            assert got["world_size"] == 2 and float(got["step"]) == 7.0
            assert torch.equal(got["latent"][:n], latent[lo : lo + n]) and not got["latent"][n:].any()
            assert torch.equal(got["exp_avg"][:n], m[lo : lo + n]) and torch.equal(
                got["exp_avg_sq"][:n], v[lo : lo + n]
            )
            want = errors[r][0] if world == 2 else 2.0
            assert torch.equal(got["send_error"][:numel], torch.full((numel,), want))


def test_partitions_refuse_incomplete_or_foreign_sets(tmp_path):
    params = _params(SIZES)
    lay = BinaryLayout(params, 2, 0)
    with pytest.raises(RuntimeError, match="no per-rank partitions"):
        load_partitions(tmp_path, lay, ["latent"], [])
    save_partition(tmp_path, lay, {"latent": torch.zeros(lay.slice)}, {}, {"step": None})
    with pytest.raises(RuntimeError, match=r"incomplete partitions for 2 ranks \(missing \['rank_00001_of_00002"):
        load_partitions(tmp_path, lay, ["latent"], [])
    save_partition(tmp_path, BinaryLayout(params, 2, 1), {"latent": torch.zeros(lay.slice)}, {}, {"step": None})
    other = BinaryLayout(_params([(5,)]), 1, 0)
    with pytest.raises(RuntimeError, match="642 binary latents, this model has 5"):
        load_partitions(tmp_path, other, ["latent"], [])


# ----------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["comm.binary_weights=packed", "scale.zero_stage=1"], r"'scale.zero_stage' = 1: expected 0 with comm"),
        (["comm.binary_grads=onebit", "scale.zero_stage=2"], r"'scale.zero_stage' = 2: expected 0 with comm"),
        (
            ["comm.binary_weights=packed", "model.binary_weights=false"],
            r"'model.binary_weights' = False: expected true",
        ),
        (["comm.binary_grads=onebit", "comm.onebit_warmup_steps=-1"], r"'comm.onebit_warmup_steps' = -1"),
    ],
)
def test_comm_modes_check_their_settings(overrides, message):
    from dbgen.config import ConfigError, load_config
    from dbgen.config import check_config as check_train_config  # load_config runs the same checks
    from dbgen.sync import SYNC_MODES

    assert {("dp", "none"), ("packed", "none"), ("packed", "onebit"), ("dp", "onebit")} <= set(SYNC_MODES)
    check_train_config(load_config(CONFIG, ["comm.binary_weights=packed", "comm.binary_grads=onebit"]))
    with pytest.raises(ConfigError, match=message):
        check_train_config(load_config(CONFIG, overrides))


def test_resuming_with_another_binary_weights_mode_is_refused(tmp_path, capsys):
    import json

    from dbgen.config import load_config
    from dbgen.train import main

    ck = tmp_path / "r" / "checkpoint_0000010"
    ck.mkdir(parents=True)
    meta = {"step": 10, "world_size": 2, "zero_stage": 0, "config": load_config(CONFIG).to_dict()}
    (ck / "meta.json").write_text(json.dumps(meta))
    rc = main(["--config", str(CONFIG), "comm.binary_weights=packed", "--name", "r", "--storage", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "written with comm.binary_weights=dp" in err and "resume it with" in err


# ------------------------------------------------------------------------------ real process groups (gloo)
def _wchar() -> int:
    """Bytes this process has passed to write()/writev() so far (gloo's TCP transport sends with writev)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io")


def _measure(fn):
    """(counted bytes by kind, bytes the kernel saw written) of ``fn()``."""
    import torch.distributed as dist

    dist.barrier()
    accounting.COUNTER.take()
    before = _wchar()
    out = fn()
    written = _wchar() - before
    return accounting.COUNTER.take(), written, out


def _collectives_worker(rank: int, world: int, out_dir: str):
    import torch.distributed as dist

    torch.set_num_threads(1)
    accounting.install()
    n = 3 * 2**17  # 384k fp32 per call, divisible by the world size
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(n, generator=g)
    res = {}

    def record(name, kind, fn):
        counted, written, out = _measure(fn)
        res[name] = {"counted": counted[kind], "all": sum(counted.values()), "written": written}
        return out

    with comm_kind("grad"):
        record("all_reduce", "grad", lambda: dist.all_reduce(x.clone()))
        record("reduce_scatter_single", "grad", lambda: dist.reduce_scatter_single(torch.empty(n // world), x))
        mine = record("slice_sum", "grad", lambda: start_slice_sum(x.clone(), [n // world] * world).wait())
    with comm_kind("weight"):
        full = record("all_gather_flat", "weight", lambda: all_gather_flat(torch.empty(n), x[: n // world]))
    record("broadcast", "other", lambda: dist.broadcast(x.clone(), src=1))
    record("reduce", "other", lambda: dist.reduce(x.clone(), dst=2))
    record("all_reduce_max", "other", lambda: dist.all_reduce(torch.ones(1), op=dist.ReduceOp.MAX))
    # the correct values, too
    total = x.clone()
    dist.all_reduce(total)
    s = n // world
    # Sums of the world's `world` fp32 values in two orders (all_to_all + local sum vs gloo's all-reduce):
    # each within gamma_world * sum_r |x_r| of the exact sum; every rank's x is regenerated from its seed.
    mags = sum(torch.randn(n, generator=torch.Generator().manual_seed(r)).abs().double() for r in range(world))
    bound = 2 * gamma(world, torch.float32) * mags[rank * s : (rank + 1) * s]
    res["reduce_scatter_exact"] = bool(
        ((mine.double() - total[rank * s : (rank + 1) * s].double()).abs() <= bound).all()
    )
    res["all_gather_exact"] = bool(torch.equal(full[rank * s : (rank + 1) * s], x[:s]))

    # 1-bit exchange (both sides) on a layout whose tail is padding
    params = [torch.nn.Parameter(torch.zeros(n - 1000))]
    lay = BinaryLayout(params, world, rank)
    ex = OneBitExchange(lay, receiver_side=True)
    with comm_kind("grad"):
        sl = record("onebit_reduce_scatter", "grad", lambda: ex.reduce_scatter(lay.flat([x[: n - 1000]])))
        avg = record("onebit_all_gather", "grad", lambda: ex.all_gather(sl))
    ex.commit()
    exact = total[: n - 1000] / world
    res["onebit_shapes"] = (tuple(sl.shape), tuple(avg.shape), lay.slice, lay.padded)
    res["onebit_padding_zero"] = bool((avg[lay.numel :] == 0).all() and (ex.send_error[lay.numel :] == 0).all())
    res["onebit_rel_err"] = ((avg[: lay.numel] - exact).norm() / exact.norm()).item()
    res["onebit_sign_agree"] = (torch.sign(avg[: lay.numel]) == torch.sign(exact)).float().mean().item()
    torch.save(res, Path(out_dir) / f"collectives{rank}.pt")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_counted_bytes_equal_socket_bytes_for_each_collective(tmp_path):
    world = 3
    spawn(_collectives_worker, world, str(tmp_path))
    n_bytes = 3 * 2**17 * 4
    s = n_bytes // world
    lay_slice = slice_size(3 * 2**17 - 1000, world)
    msg = lay_slice // 8 + 4 * lay_slice // ONEBIT_CHUNK
    expected = {
        "all_reduce": 2 * (world - 1) * n_bytes // world,
        "reduce_scatter_single": 2 * (world - 1) * n_bytes // world,  # gloo: as much as an all-reduce
        "slice_sum": (world - 1) * s,  # all_to_all + local sum: half of that
        "all_gather_flat": (world - 1) * s,
        "all_reduce_max": 2 * (world - 1) * 4 // world,
        "onebit_reduce_scatter": (world - 1) * msg,
        "onebit_all_gather": (world - 1) * msg,
    }
    for rank in range(world):
        res = torch.load(tmp_path / f"collectives{rank}.pt", weights_only=False)
        reduce = (world - 1) * n_bytes // world if rank == 2 else n_bytes  # gloo: root (W-1)/W n, others n
        for name, want in {**expected, "broadcast": 2 * n_bytes if rank == 1 else 0, "reduce": reduce}.items():
            r = res[name]
            assert r["counted"] == r["all"] == want, (rank, name, r)
            # what the kernel saw written: the payload plus gloo's small headers, never less
            assert want <= r["written"] <= want * 1.01 + 4096, (rank, name, r)
        assert res["reduce_scatter_exact"] and res["all_gather_exact"]
        sl_shape, avg_shape, lay_slice_, padded = res["onebit_shapes"]
        assert sl_shape == (lay_slice_,) and avg_shape == (padded,) and res["onebit_padding_zero"]
        # one 1-bit message of a sum of 3 Gaussians: the signs mostly right, the values roughly (compression
        # quality thresholds, not rounding)
        assert res["onebit_sign_agree"] > 0.75 and res["onebit_rel_err"] < 0.9


MODES = {  # name -> config overrides
    "dp": ["scale.zero_stage=0"],
    "zero1": ["scale.zero_stage=1"],
    "packed": ["comm.binary_weights=packed"],
    "packed_onebit": ["comm.binary_weights=packed", "comm.binary_grads=onebit", "comm.onebit_warmup_steps=1"],
    "dp_onebit": ["comm.binary_grads=onebit", "comm.onebit_warmup_steps=1"],
}


def _step_bytes_worker(rank: int, world: int, out_dir: str, train_dir: str):
    import torch.distributed as dist

    from dbgen.config import load_config
    from dbgen.nn import size_report
    from dbgen.trainer import Trainer

    torch.set_num_threads(1)
    res = {}
    for name, overrides in MODES.items():
        cfg = load_config(CONFIG, overrides)
        run_dir = Path(out_dir) / name
        run_dir.mkdir(exist_ok=True)
        tr = Trainer(cfg, run_dir, train_dir, None, rank=rank, world_size=world)
        data = iter(tr.loader)
        tr.train_step(data)  # the first step also carries the initial broadcast; 1-bit modes warm up
        steps = []
        for _ in range(2):
            dist.barrier()
            accounting.COUNTER.take()
            before = _wchar()
            stats = tr.train_step(data)  # its comm_bytes: the counter's take() at the end of the step
            tr.sync.weights_ready()  # packed, overlapped: the step's sign gather is still in flight
            steps.append({"counted": stats["comm_bytes"], "written": _wchar() - before})
        res[name] = {"steps": steps, **size_report(tr.model)}
    torch.save(res, Path(out_dir) / f"steps{rank}.pt")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_training_step_bytes_per_mode_match_formulas_and_sockets(tmp_path):
    """A real training step (DeepSpeed engine, gloo, 2 ranks) in each mode: the per-step counts the trainer
    reports are the formulas' bytes and what the kernel saw written to the sockets."""
    from dbgen.data import resolve_split

    world = 2
    spawn(_step_bytes_worker, world, str(tmp_path), str(resolve_split("builtin:photos32", "train")))
    for rank in range(world):
        res = torch.load(tmp_path / f"steps{rank}.pt", weights_only=False)
        P, B = res["dp"]["params"], res["dp"]["binary_params"]
        F = P - B
        S = slice_size(B, world)
        msg = S // 8 + 4 * S // ONEBIT_CHUNK  # a 1-bit message about one slice
        formulas = {  # bytes one rank sends per step (W = 2)
            "dp": {"grad": 4 * P, "weight": 0, "other": 4},  # one all-reduce of every gradient; the norm's max
            "packed": {"grad": 4 * F + 4 * S, "weight": S // 8, "other": 4},
            "packed_onebit": {"grad": 4 * F + msg, "weight": S // 8, "other": 4},
            "dp_onebit": {"grad": 4 * F + 2 * msg, "weight": 0, "other": 4},
        }
        for name, want in formulas.items():
            for step in res[name]["steps"]:
                assert step["counted"] == want, (rank, name, step)
        z1 = res["zero1"]["steps"][0]["counted"]
        assert z1["grad"] == 4 * P and 2 * P <= z1["weight"] <= 2 * P + 64, z1  # + its partitions' all-gather
        for name in MODES:
            for step in res[name]["steps"]:
                total = sum(step["counted"].values())
                assert total <= step["written"] <= total * 1.01 + 8192, (rank, name, step)
        # the point of it all (tiny model, so the full-precision all-reduce weighs in; see bench comm)
        assert formulas["packed"]["weight"] < B / 8 * (world - 1) / world + ALIGN
