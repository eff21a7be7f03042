"""The training step with real DeepSpeed engines in 2 processes (gloo, CPU), without Ray.

Two spawned ranks run :class:`dbgen.trainer.Trainer` on the tiny binary RVAE and the built-in data and check:
ZeRO 1 and 2 give the parameters of ZeRO 0 (same skip/clip/clamp decisions, applied to the partitions);
gradient accumulation over two micro-batches equals one step on their mean; a NaN loss on ONE rank makes both
ranks skip the step with parameters and optimizer state untouched, and training continues; ``fit`` counts it;
a 2-worker checkpoint resumes on 1 worker (ZeRO 0: the optimizer state is whole).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gloo_group import spawn

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "rvae_binary_tiny.yaml"


def _params(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _worker(rank: int, world: int, tmp: str, train_dir: str):
    from dbgen.config import load_config
    from dbgen.step import resolve_stats
    from dbgen.trainer import Trainer

    torch.set_num_threads(1)
    tmp = Path(tmp)
    out = {}

    def trainer(name, *overrides):
        cfg = load_config(CONFIG, ["train.grad_clip=0.05", "optimizer.lr=0.01", *overrides])
        run_dir = tmp / name
        run_dir.mkdir(exist_ok=True)
        return Trainer(cfg, run_dir, train_dir, None, rank=rank, world_size=world)

    # 1. ZeRO 0 / 1 / 2: three steps on the same data; clipping (grad_clip 0.05) is active on every step.
    for stage in (0, 1, 2):
        tr = trainer(f"zero{stage}", f"scale.zero_stage={stage}")
        data = iter(tr.loader)
        stats = resolve_stats([tr.train_step(data) for _ in range(3)])
        out[f"zero{stage}"] = {
            "params": _params(tr.model),
            "norms": [s["grad_norm"] for s in stats],
            "skipped": [s["skipped"] for s in stats],
        }

    # 2. Accumulation: micro-batches x, x (2 x 8 rows) == one micro-batch x (8 rows). Every forward pass
    # reseeds the RNG so both see the same latent noise.
    x = next(iter(trainer("rows").loader))[:8]

    def reseed(module, args):
        torch.manual_seed(1234)

    for name, overrides, batches in (
        ("accum1", ["train.batch_size=16"], [x]),
        ("accum2", ["train.batch_size=32", "train.grad_accum=2"], [x, x]),
        ("accum2_zero2", ["train.batch_size=32", "train.grad_accum=2", "scale.zero_stage=2"], [x, x]),
    ):
        tr = trainer(name, *overrides)
        tr.model.register_forward_pre_hook(reseed)
        tr.train_step(iter(batches))
        out[name] = _params(tr.model)

    # 3. NaN loss on rank 1 only, at the second step.
    tr = trainer("nan")
    data = iter(tr.loader)
    calls = {"n": 0}

    def poison(module, args, loss):
        calls["n"] += 1
        return loss * float("nan") if rank == 1 and calls["n"] == 2 else loss

    tr.model.register_forward_hook(poison)
    tr.train_step(data)
    before = _params(tr.model)
    adam = {k: v.clone() for k, v in tr.optimizer.state[next(iter(tr.model.parameters()))].items()}
    (nan_step,) = resolve_stats([tr.train_step(data)])
    after_skip = _params(tr.model)
    adam_after = tr.optimizer.state[next(iter(tr.model.parameters()))]
    adam_unchanged = all(torch.equal(adam[k], adam_after[k]) for k in adam)
    (next_step,) = resolve_stats([tr.train_step(data)])
    out["nan"] = {
        "skipped": nan_step["skipped"],
        "norm": nan_step["grad_norm"],
        "next_skipped": next_step["skipped"],
        "unchanged": all(torch.equal(before[n], after_skip[n]) for n in before),
        "adam_unchanged": adam_unchanged,
        "changed_after": any(not torch.equal(after_skip[n], p) for n, p in _params(tr.model).items()),
        "next_loss_finite": math.isfinite(next_step["loss"]),
    }

    # 4. fit() counts the skipped step and finishes the run (and commits its checkpoint).
    tr = trainer(
        "fit",
        "train.max_steps=5",
        "train.log_every=2",
        "train.checkpoint_every=0",
        "train.eval_every=0",
        "train.sample_every=0",
        "train.num_samples=4",
    )
    calls["n"] = 0
    tr.model.register_forward_hook(poison)
    tr.fit()

    torch.save(out, tmp / f"rank{rank}.pt")


def _resume_on_one_worker(rank: int, world: int, tmp: str, train_dir: str):
    from dbgen.config import load_config
    from dbgen.trainer import Trainer

    tmp = Path(tmp)
    cfg = load_config(
        CONFIG,
        [
            "train.grad_clip=0.05",
            "optimizer.lr=0.01",
            "train.max_steps=8",
            "train.log_every=2",
            "train.checkpoint_every=0",
            "train.eval_every=0",
            "train.sample_every=0",
            "train.num_samples=4",
            "scale.num_workers=1",
        ],
    )
    (tmp / "fit1").mkdir()
    Trainer(cfg, tmp / "fit1", train_dir, None, checkpoint_dir=tmp / "fit" / "checkpoint_0000005").fit()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_zero_stages_accumulation_and_nan_skip(tmp_path):
    from dbgen.data import resolve_split

    train_dir = str(resolve_split("builtin:photos32", "train"))
    spawn(_worker, 2, str(tmp_path), train_dir)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))

    # ZeRO 1/2 == ZeRO 0 (reduce-scatter vs all-reduce may round differently in the last bit)
    z0 = r0["zero0"]
    assert z0["skipped"] == [False, False, False], z0["norms"]
    assert all(n > 0.05 for n in z0["norms"]), "clipping must be active in this test"
    for stage in ("zero1", "zero2"):
        for r in (r0, r1):
            assert r[stage]["norms"] == pytest.approx(z0["norms"], rel=1e-5)
            for n, p in z0["params"].items():
                torch.testing.assert_close(r[stage]["params"][n], p, rtol=1e-5, atol=1e-6, msg=f"{stage} {n}")
    # every rank holds the same parameters
    for n, p in z0["params"].items():
        assert torch.equal(r1["zero0"]["params"][n], p), n
    # binary latents stay in [-1, 1]
    from dbgen.config import load_config
    from dbgen.models import build
    from dbgen.nn import binary_layers

    model = build(load_config(CONFIG).model)
    latents = [f"{name}.weight" for name, _ in binary_layers(model)]
    assert latents and all(z0["params"][k].abs().max() <= 1.0 for k in latents)

    # accumulation (ZeRO 2 reduces each micro-batch into its partition)
    for name in ("accum2", "accum2_zero2"):
        for n, p in r0["accum1"].items():
            torch.testing.assert_close(r0[name][n], p, rtol=1e-5, atol=1e-6, msg=f"{name} {n}")

    # NaN on rank 1 -> both ranks skip, nothing changes, training continues
    for r in (r0, r1):
        nan = r["nan"]
        assert nan["skipped"] and nan["norm"] == float("inf")
        assert nan["unchanged"] and nan["adam_unchanged"]
        assert not nan["next_skipped"] and nan["changed_after"] and nan["next_loss_finite"]

    summary = json.loads((tmp_path / "fit" / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["skipped_steps"] == 1
    assert summary["final_train_bpd"] is not None and summary["final_train_bpd"] < 20
    train_recs = [json.loads(line) for line in (tmp_path / "fit" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in train_recs if r["kind"] == "train"] == [1, 1, 1]  # steps 2, 4, 5
    assert (tmp_path / "fit" / "checkpoint_0000005" / "meta.json").exists()

    # the 2-worker checkpoint resumes on 1 worker: same global batch, the loader finishes the epoch's rows
    spawn(_resume_on_one_worker, 1, str(tmp_path), train_dir)
    resumed = json.loads((tmp_path / "fit1" / "summary.json").read_text())
    assert resumed["resumed_from"] == 5 and resumed["steps"] == 8 and resumed["world_size"] == 1
    assert resumed["images_seen"] == 8 * 32 and resumed["micro_batch_size"] == 32 and resumed["skipped_steps"] == 1


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_stale_deepspeed_build_lock_does_not_hang_the_next_start():
    """A ``lock`` file left in DeepSpeed's op build directory by a process killed while it held torch's
    FileBaton used to make every later DeepSpeed start on the host wait forever (seen in the suite under load).
    dbgen.trainer.load_deepspeed_cpu_comm_op removes it under an flock and loads the op."""
    import fcntl

    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    name = get_accelerator().create_op_builder("ShareMemCommBuilder").NAME
    build_dir = Path(_get_build_directory(name, verbose=False))
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / ".dbgen.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # no dbgen process is building or loading the op while it is planted
        (build_dir / "lock").write_bytes(b"")
    load = "import logging; logging.basicConfig(); from dbgen.trainer import load_deepspeed_cpu_comm_op as f; f()"
    out = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=480)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not (build_dir / "lock").exists()  # removed (here, or by another dbgen process that got there first)
