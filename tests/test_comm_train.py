"""The packed and 1-bit modes inside real Ray Train workers (TorchTrainer, gloo, DeepSpeed engines), CPU.

One throwaway Ray cluster (tests/ray_cluster.py) for the module. Tests:

* ``packed`` without compression == plain data parallelism with the same seed, 2 workers: the same signs at
  every step and the same losses and gradient norms (fp32 tolerance), through clipping and a NaN on one rank
  that both modes skip; per-step bytes by kind are the formulas'; ``packed_onebit`` trains to within 1% of
  uncompressed ``packed`` on the tiny RVAE (mean loss of the last 20 of 80 steps, 15 warm-up steps).
* ``packed_onebit``: a worker SIGKILLed mid-run; Ray Train restarts the group from the last checkpoint, which
  holds every rank's latent slice, Adam moments and error buffer, and the run ends bit-identical to an
  uninterrupted one. The same checkpoint resumed by ONE worker reassembles exactly the same binary state.
"""

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ray_cluster import RayHead  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "rvae_binary_tiny.yaml"
QUIET = [
    "train.eval_every=0",
    "train.sample_every=0",
    "train.num_samples=0",
    "train.eval_batches=1",
    "train.log_every=5",
]
ONEBIT = ["comm.binary_weights=packed", "comm.binary_grads=onebit"]
FIT = [*ONEBIT, "comm.onebit_warmup_steps=3", "train.max_steps=10", "train.checkpoint_every=5", *QUIET]


@pytest.fixture(scope="module")
def cluster():
    import ray
    import ray.cloudpickle

    saved = os.environ.get("RAY_AUTH_MODE")
    head = RayHead(num_cpus=2, auth="disabled")
    head.start()
    os.environ["RAY_AUTH_MODE"] = "disabled"  # this private cluster goes without token auth
    try:
        ray.init(address=head.address, log_to_driver=False)
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the loops below, by value
        yield head
    finally:
        ray.shutdown()
        head.stop()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


@pytest.fixture(scope="module")
def splits():
    from dbgen.data import resolve_split

    return str(resolve_split("builtin:photos32", "train")), str(resolve_split("builtin:photos32", "test"))


def _fit(loop, config: dict, storage: Path, name: str, workers: int, max_failures: int = 0) -> None:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    TorchTrainer(
        loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(
            name=name, storage_path=str(storage), failure_config=FailureConfig(max_failures=max_failures)
        ),
    ).fit()


# ------------------------------------------------------------------------------------- worker-side helpers
def _signs_hash(model) -> str:
    import hashlib

    from dbgen.nn import binary_layers, pack_signs

    signs = torch.cat([pack_signs(m.signs()) for _, m in binary_layers(model)])
    return hashlib.sha256(signs.numpy().tobytes()).hexdigest()


def _trainer(overrides, config, run_dir, checkpoint_dir=None):
    import ray.train

    from dbgen.config import load_config
    from dbgen.trainer import Trainer

    ctx = ray.train.get_context()
    cfg = load_config(CONFIG, [f"scale.num_workers={ctx.get_world_size()}", *overrides])
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return Trainer(
        cfg,
        Path(run_dir),
        config["train"],
        config["eval"],
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        checkpoint_dir=checkpoint_dir,
        submission=config.get("submission", "test"),
    )


def _steps(tr, n: int, poison_step: int | None = None) -> list[dict]:
    """``n`` training steps; with ``poison_step`` the loss of rank 1 is NaN at that step (1-based)."""
    from dbgen.step import resolve_stats

    calls = {"n": 0}
    if poison_step is not None:

        def poison(module, args, loss):
            calls["n"] += 1
            return loss * float("nan") if tr.rank == 1 and calls["n"] == poison_step else loss

        handle = tr.model.register_forward_hook(poison)
    data = iter(tr.loader)
    rows = []
    for _ in range(n):
        (st,) = resolve_stats([tr.train_step(data)])
        tr.sync.weights_ready()  # packed, overlapped: the signs are written as the next forward needs them
        rows.append(
            {
                "loss": st["loss"],
                "norm": st["grad_norm"],
                "skipped": st["skipped"],
                "signs": _signs_hash(tr.model),
                "bytes": st["comm_bytes"],
            }
        )
    if poison_step is not None:
        handle.remove()
    return rows


def _full_state(tr) -> dict:
    """The whole binary state (gathered; every rank calls it) plus the module's signs."""
    state = {k: v.cpu() for k, v in tr.sync.full_state().items()}  # waits for the signs in flight too
    state["signs"] = _signs_hash(tr.model)
    return state


def _fit_with_records(tr, kill: dict | None = None) -> list:
    """``tr.fit()`` recording each step's loss. ``kill``: rank 1 SIGKILLs itself after step ``kill["at"]``
    unless ``kill["marker"]`` exists (first attempt only); the checkpoint before it is committed by then (every
    rank waits for the commit)."""
    losses = []
    on_step = tr.reporter.on_step

    def record(stats):
        on_step(stats)
        losses.append((stats["step"], float(stats["loss"])))
        if kill and tr.rank == 1 and stats["step"] == kill["at"] and not Path(kill["marker"]).exists():
            assert (Path(tr.run_dir) / kill["committed"]).is_dir()
            Path(kill["marker"]).touch()
            os.kill(os.getpid(), signal.SIGKILL)

    tr.reporter.on_step = record
    tr.fit()
    return losses


def _compare_loop(config):
    import ray.train

    torch.set_num_threads(1)
    rank = ray.train.get_context().get_world_rank()
    out, run = {}, Path(config["run"])
    clip = ["train.grad_clip=0.5"]  # active on most steps
    for name, overrides in (("dp", clip), ("packed", [*clip, "comm.binary_weights=packed"])):
        tr = _trainer(overrides + QUIET, config, run / name)
        out[name] = {"rows": _steps(tr, 6, poison_step=4), "sizes": _sizes(tr)}
    for name, overrides in (
        ("conv_packed", ["comm.binary_weights=packed"]),
        ("conv_onebit", [*ONEBIT, "comm.onebit_warmup_steps=15"]),
    ):
        tr = _trainer(overrides + QUIET, config, run / name)
        out[name] = {"rows": _steps(tr, 80)}
    # the uninterrupted reference of the kill test
    tr = _trainer(FIT, config, run / "reference")
    out["reference"] = {"losses": _fit_with_records(tr), "state": _full_state(tr)}
    if rank == 0:
        torch.save(out, Path(config["out"]) / "compare.pt")


def _sizes(tr) -> dict:
    from dbgen.nn import size_report

    return {k: v for k, v in size_report(tr.model).items() if k in ("params", "binary_params")}


def _resume_loop(config):
    from dbgen.rundir import choose_checkpoint

    torch.set_num_threads(1)
    found = choose_checkpoint(config["run"])  # what dbgen.trainer.train_worker chooses: newest intact
    tr = _trainer(FIT, config, config["run"], checkpoint_dir=found[0] if found else None)
    losses = _fit_with_records(tr, config["kill"])
    state = _full_state(tr)
    if tr.rank == 0:
        torch.save({"losses": losses, "state": state}, Path(config["out"]) / "killed.pt")


def _reshard_loop(config):
    torch.set_num_threads(1)
    tr = _trainer(FIT, config, config["run"], checkpoint_dir=Path(config["checkpoint"]))
    state = _full_state(tr)
    rows = _steps(tr, 2)
    torch.save({"state": state, "step": tr.step, "rows": rows}, Path(config["out"]) / "reshard.pt")


# ------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def compare(cluster, splits, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    config = {"train": splits[0], "eval": splits[1], "run": str(tmp / "runs"), "out": str(tmp)}
    _fit(_compare_loop, config, tmp / "ray", "compare", workers=2)
    return torch.load(tmp / "compare.pt", weights_only=False)


@pytest.mark.timeout(600)
def test_packed_equals_data_parallel_at_every_step(compare):
    dp, packed = compare["dp"]["rows"], compare["packed"]["rows"]
    assert [r["skipped"] for r in dp] == [False, False, False, True, False, False]  # NaN on rank 1 at step 4
    assert [r["skipped"] for r in packed] == [r["skipped"] for r in dp]
    assert sum(r["norm"] > 0.5 for r in dp) >= 3, "clipping should be active on several steps"
    for i, (a, b) in enumerate(zip(dp, packed, strict=True)):
        assert a["signs"] == b["signs"], f"step {i + 1}: signs differ"
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-6), i
        if not a["skipped"]:
            assert b["norm"] == pytest.approx(a["norm"], rel=1e-5), i
    assert packed[3]["signs"] == packed[2]["signs"] and packed[4]["signs"] != packed[3]["signs"]


@pytest.mark.timeout(600)
def test_bytes_per_step_by_kind(compare):
    from dbgen.sync.layout import slice_size

    sizes = compare["dp"]["sizes"]
    P, B = sizes["params"], sizes["binary_params"]
    S = slice_size(B, 2)
    for r in compare["dp"]["rows"][1:]:  # step 1 also carries the initial broadcast (other)
        assert r["bytes"] == {"grad": 4 * P, "weight": 0, "other": 4}
    for i, r in enumerate(compare["packed"]["rows"][1:], start=2):
        # full-precision all-reduce + binary all_to_all; signs all-gathered, except after the skipped step
        weight = 0 if i == 4 else S // 8
        assert r["bytes"] == {"grad": 4 * (P - B) + 4 * S, "weight": weight, "other": 4}, i
    onebit = compare["conv_onebit"]["rows"]
    msg = S // 8 + 4 * S // 2048
    assert onebit[14]["bytes"]["grad"] == 4 * (P - B) + 4 * S  # warm-up: uncompressed
    assert all(r["bytes"]["grad"] == 4 * (P - B) + msg for r in onebit[15:])


@pytest.mark.timeout(600)
def test_onebit_converges_like_uncompressed(compare):
    """Tolerance: the mean loss of the last 20 of 80 steps within 1% of uncompressed packed training."""
    full = [r["loss"] for r in compare["conv_packed"]["rows"]]
    onebit = [r["loss"] for r in compare["conv_onebit"]["rows"]]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert onebit[:15] == full[:15]  # identical warm-up
    assert mean(full[-20:]) < mean(full[:10]) - 0.5  # it learns
    assert mean(onebit[-20:]) < mean(onebit[:10]) - 0.5
    assert abs(mean(onebit[-20:]) - mean(full[-20:])) < 0.01 * mean(full[-20:]), (mean(onebit[-20:]), mean(full[-20:]))


@pytest.mark.timeout(900)
def test_killed_worker_resumes_exactly_and_reshards(compare, cluster, splits, tmp_path):
    storage = tmp_path / "ray"
    kill = {"at": 7, "marker": str(tmp_path / "killed-once"), "committed": "checkpoint_0000005"}
    config = {
        "train": splits[0],
        "eval": splits[1],
        "run": str(storage / "killed"),
        "out": str(tmp_path),
        "kill": kill,
        "submission": "s1",
    }
    _fit(_resume_loop, config, storage, "killed", workers=2, max_failures=1)
    assert Path(kill["marker"]).exists(), "rank 1 was never killed"
    got = torch.load(tmp_path / "killed.pt", weights_only=False)
    ref = compare["reference"]
    assert [s for s, _ in got["losses"]] == list(range(6, 11))
    assert got["losses"] == ref["losses"][5:]  # the same losses, bit for bit
    assert set(got["state"]) == set(ref["state"]) == {"latent", "exp_avg", "exp_avg_sq", "send_error_sum", "signs"}
    for k, v in ref["state"].items():
        assert v == got["state"][k] if k == "signs" else torch.equal(v, got["state"][k]), k
    summary = json.loads((storage / "killed" / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["recovered_from"] == [5]

    ckpt = storage / "killed" / "checkpoint_0000010"
    assert sorted(p.name for p in (ckpt / "packed").iterdir()) == ["rank_00000_of_00002.pt", "rank_00001_of_00002.pt"]
    # the same checkpoint, resumed by one worker: the same binary state, reassembled from both partitions
    one = {
        "train": splits[0],
        "eval": splits[1],
        "run": str(tmp_path / "one"),
        "out": str(tmp_path),
        "checkpoint": str(ckpt),
    }
    _fit(_reshard_loop, one, storage, "reshard", workers=1)
    re = torch.load(tmp_path / "reshard.pt", weights_only=False)
    assert re["step"] == 10
    for k in ("latent", "exp_avg", "exp_avg_sq"):
        assert torch.equal(re["state"][k], got["state"][k]), k
    assert re["state"]["signs"] == got["state"]["signs"]
    # 2 ranks' sender errors -> 1 rank's: their mean (what the ranks still owed on average is kept)
    torch.testing.assert_close(re["state"]["send_error_sum"], got["state"]["send_error_sum"] / 2)
    assert all(not r["skipped"] and r["loss"] < 12 for r in re["rows"])
    assert re["rows"][1]["signs"] != got["state"]["signs"]  # it keeps training


@pytest.mark.timeout(600)
def test_bench_comm_cli(cluster, capsys):
    """``python -m dbgen.bench comm`` (in-process, on this module's cluster; one mode to keep it short): one
    JSON object with the per-mode bytes (the other modes' counts are tested above and in test_comm.py)."""
    from dbgen.bench.__main__ import main
    from dbgen.sync.layout import slice_size
    from dbgen.sync.onebit import ONEBIT_CHUNK

    assert (
        main(["comm", "--config", str(CONFIG), "--workers", "2", "--steps", "1", "--modes", "packed_onebit", "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["workers"] == 2 and out["batch_per_worker"] == 16 and out["warmup"] == 1
    (r,) = out["modes"]
    P, B = r["params"], r["binary_params"]
    S = slice_size(B, 2)
    assert r["mode"] == "packed_onebit" and r["weight_bytes_per_step"] == S // 8 <= B / 16 + 2048
    assert r["grad_bytes_per_step"] == 4 * (P - B) + S // 8 + 4 * S // ONEBIT_CHUNK  # compressed after step 1
    assert r["total_bytes_per_step"] == sum(r[f"{k}_bytes_per_step"] for k in ("weight", "grad", "other"))
    assert r["step_s"] > 0 and "total_vs_zero1" not in r


@pytest.mark.timeout(600)
def test_bench_overlap_cli(cluster, tmp_path, capsys):
    """``python -m dbgen.bench overlap`` (smoke: this module's cluster on loopback, no link setting, one step):
    the JSON holds one row per mode with the step times and bytes, ``serial_s`` absent for DDP."""
    from dbgen.bench.__main__ import main
    from dbgen.config import load_config
    from dbgen.linkmodel import step_bytes
    from dbgen.models import build
    from dbgen.nn import size_report

    out = tmp_path / "overlap.json"
    args = ["overlap", "--config", str(CONFIG), "--steps", "1", "--warmup", "1", "--modes", "packed_onebit,ddp"]
    assert main([*args, "--json-out", str(out)]) == 0
    assert "packed_onebit" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["link"] == {"rate_mbit": None, "latency_ms": 0.0} and res["workers"] == 2
    onebit, ddp = res["rows"]
    assert onebit["mode"] == "packed_onebit" and ddp["mode"] == "ddp" and "serial_s" not in ddp
    for r in (onebit, ddp):
        assert r["compute_s"] > 0 and r["overlapped_s"] > 0 and r["final_loss"] > 0
        assert r["comm_s"] == pytest.approx(r["overlapped_s"] - r["compute_s"])
    assert onebit["serial_s"] > 0
    sizes = size_report(build(load_config(CONFIG).model))
    P, B = sizes["params"], sizes["binary_params"]
    assert onebit["bytes_per_step"] == sum(step_bytes("packed_onebit", P, B, 2).values())  # counted, compressed
    assert ddp["bytes_per_step"] == sum(step_bytes("dp", P, B, 2).values())  # DDP's: the formula
