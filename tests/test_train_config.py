"""Fast checks of the training configuration: DeepSpeed config derivation, LR schedule, config validation,
the client optimizer's skip/clip/clamp, EMA, sample grids, and the driver's errors before any worker starts."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bounds import assert_within, gamma

from dbgen.config import ConfigError, load_config, schema_markdown
from dbgen.config import check_config as check_train_config  # load_config runs the same checks
from dbgen.inspect import inspect_config
from dbgen.step import EMA, ClientAdam, build_optimizer, lr_at
from dbgen.trainer import deepspeed_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "rvae_binary_tiny.yaml"


def cfg(*overrides):
    return load_config(TINY, list(overrides))


# ---------------------------------------------------------------------------------------- DeepSpeed config
def test_deepspeed_config_is_derived_from_ours():
    c = cfg("train.batch_size=48", "train.grad_accum=3", "scale.num_workers=2", "scale.zero_stage=2")
    ds = deepspeed_config(c, world_size=2)
    assert ds["train_batch_size"] == 48
    assert ds["train_micro_batch_size_per_gpu"] == 8  # 48 / (2 workers * 3 micro-batches)
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"] == {"stage": 2}
    assert ds["gradient_clipping"] == 0.0  # ours, on the agreed norm
    assert "fp16" not in ds and "bf16" not in ds and "optimizer" not in ds  # fp32 engine, client optimizer
    # DeepSpeed's own parser accepts the derived dict (it checks batch = micro * accumulation * world size;
    # without a process group it assumes world size 1)
    from deepspeed.runtime.config import DeepSpeedConfig

    parsed = DeepSpeedConfig(deepspeed_config(c, world_size=1))
    assert (
        parsed.train_batch_size,
        parsed.train_micro_batch_size_per_gpu,
        parsed.gradient_accumulation_steps,
        parsed.zero_optimization_stage,
        parsed.gradient_clipping,
    ) == (48, 16, 3, 2, 0.0)


def test_batch_must_split_over_workers_and_accumulation():
    with pytest.raises(ConfigError, match=r"'train.batch_size' = 30: expected a positive multiple of .* = 4"):
        deepspeed_config(cfg("train.batch_size=30", "train.grad_accum=2"), world_size=2)
    with pytest.raises(ConfigError, match="train.batch_size"):
        check_train_config(cfg("train.batch_size=33"))  # 2 workers in the tiny preset


def test_lr_schedule_decay_floor_and_warmup():
    # Python float arithmetic on both sides: pytest.approx's default (1e-6 relative) is plenty.
    c = cfg("optimizer.lr=2e-3", "schedule.decay=0.5", "schedule.min_lr=3e-4", "schedule.warmup_steps=0")
    assert lr_at(c, 0) == pytest.approx(2e-3)
    assert lr_at(c, 1) == pytest.approx(1e-3)
    assert lr_at(c, 2) == pytest.approx(5e-4)
    assert lr_at(c, 3) == pytest.approx(3e-4)  # floor
    assert lr_at(c, 100) == pytest.approx(3e-4)
    w = cfg("optimizer.lr=1e-3", "schedule.decay=1.0", "schedule.min_lr=0", "schedule.warmup_steps=4")
    assert [lr_at(w, s) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    paper = cfg()  # 2e-3 * 0.999995**step, floor 5e-4
    assert lr_at(paper, 100_000) == pytest.approx(2e-3 * 0.999995**100_000)
    assert lr_at(paper, 10**6) == pytest.approx(5e-4)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.grad_clip=0", "train.grad_clip"),
        ("train.skip_threshold=-1", "train.skip_threshold"),
        ("train.ema_decay=1.5", "train.ema_decay"),
        ("train.log_every=0", "train.log_every"),
        ("scale.num_workers=0", "scale.num_workers"),
        ("scale.cpus_per_worker=0", "scale.cpus_per_worker"),
        ("train.eval_batches=0", "train.eval_batches"),
        ("train.max_steps=-1", "train.max_steps"),
    ],
)
def test_invalid_training_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_train_config(cfg(override))


# ------------------------------------------------------------------------------------------ client optimizer
def _model_and_grads():
    from dbgen.models import build
    from dbgen.nn import binary_latents

    torch.manual_seed(0)
    model = build(cfg().model)
    with torch.no_grad():
        for v in binary_latents(model):
            v.copy_(0.8 * torch.randn_like(v).sign())  # near the clamp, so one step at lr 0.5 crosses it
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


def test_optimizer_groups_binary_latents_by_layer_type():
    from dbgen.nn import binary_latents

    model = _model_and_grads()
    opt = build_optimizer(cfg(), model)
    binary = [g for g in opt.param_groups if g["binary"]]
    assert len(binary) == 1
    assert {id(p) for p in binary[0]["params"]} == {id(p) for p in binary_latents(model)}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_client_adam_skip_clip_and_clamp():
    model = _model_and_grads()
    ref = _model_and_grads()
    opt, ref_opt = build_optimizer(cfg("optimizer.lr=0.5"), model), build_optimizer(cfg("optimizer.lr=0.5"), ref)
    before = [p.detach().clone() for p in model.parameters()]

    opt.step(skip=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not opt.state  # no moments either
    with opt.deciding(0.25, True):  # DeepSpeed's way: a decision for the block, step() without arguments
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)) and not opt.state

    # clip: gradients scaled by clip_coef, then a plain Adam step (compared against torch.optim.Adam)
    opt.step(clip_coef=0.25, skip=False)
    plain = torch.optim.Adam(ref.parameters(), lr=0.5)
    for p in ref.parameters():
        p.grad.mul_(0.25)
    plain.step()
    binary_ids = {id(p) for g in ref_opt.param_groups if g["binary"] for p in g["params"]}
    # The same first Adam step, fused vs torch's default implementation (grads / 4 = grads * 0.25 exactly): the
    # update lr * m/(sqrt(v) + eps) has |m| / sqrt(v) <= 1 at step 1 and <= 10 roundings per side in some
    # order, then p - update rounds once (the clamp is exact): 2 gamma_12 (|p| + lr) covers both sides.
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        expected = q.detach().clamp(-1, 1) if id(q) in binary_ids else q.detach()
        assert_within(p.detach(), expected, 2 * gamma(12, torch.float32) * (expected.abs().double() + 0.5), n)
    latents = [p for g in opt.param_groups if g["binary"] for p in g["params"]]
    assert max(p.abs().max().item() for p in latents) == 1.0  # lr 0.5 pushed some past 1: clamped
    others = [p for g in opt.param_groups if not g["binary"] for p in g["params"]]
    assert max(p.abs().max().item() for p in others) > 1.0  # gains and biases are not clamped


def test_adamw_is_decoupled_weight_decay():
    model = _model_and_grads()
    opt = build_optimizer(cfg("optimizer.name=adamw", "optimizer.weight_decay=0.1"), model)
    assert all(g["decoupled_weight_decay"] for g in opt.param_groups)
    assert isinstance(opt, ClientAdam)


def test_ema_update_and_swap():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    # ema + 0.1 * ((start + 1) - ema) in fp32 (0.1 = 1 - decay rounded) vs start + 0.1: a few roundings of
    # values of size |start| + 1 on either side, gamma_6 (|start| + 1).
    bound = gamma(6, torch.float32) * (start.abs().double() + 1)
    assert_within(ema.params["weight"], start + 0.1, bound)
    with ema.applied(model):
        assert_within(model.weight.detach(), start + 0.1, bound)
    assert torch.equal(model.weight.detach(), start + 1.0)  # restored: the same fp32 add as the model's add_
    state = ema.state_dict(model)
    assert set(state) == set(model.state_dict())
    assert_within(state["weight"], start + 0.1, bound)


def test_sample_grid_layout(tmp_path):
    from PIL import Image

    from dbgen.images import image_grid, save_grid

    images = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 3, 4, 4).contiguous() * 50
    grid = image_grid(images, pad=2)
    assert grid.shape == (2 * 6 - 2, 3 * 6 - 2, 3)  # 5 images -> 3 columns, 2 rows
    assert (grid[0:4, 6:10] == 50).all() and (grid[6:10, 6:10] == 200).all() and (grid[6:10, 12:16] == 255).all()
    out = save_grid(images, tmp_path / "g.png")
    assert (Image.open(out).size, Image.open(out).mode) == ((16, 10), "RGB")


# ----------------------------------------------------------------------------- driver errors before workers
def _main(args, capsys):
    import ray

    from dbgen.train import main

    rc = main(args)
    assert not ray.is_initialized(), "no Ray (and so no worker) may start on a bad config"
    return rc, capsys.readouterr().err


def test_unknown_key_is_a_clear_error(tmp_path, capsys):
    rc, err = _main(["--config", str(TINY), "train.max_stepz=3", "--storage", str(tmp_path)], capsys)
    assert rc == 2 and "unknown key 'train.max_stepz'" in err


@pytest.mark.parametrize("where", ["first", "between flags", "last"])
def test_overrides_are_taken_anywhere_on_the_line(tmp_path, capsys, where):
    """key=value overrides before, between and after the flags (argparse's intermixed parsing): each position
    reaches the config, so the invalid one is named instead of argparse's "unrecognized arguments"."""
    flags = ["--config", str(TINY), "--name", "r", "--storage", str(tmp_path)]
    at = {"first": 0, "between flags": 4, "last": len(flags)}[where]
    args = flags[:at] + ["train.batch_size=33"] + flags[at:]
    rc, err = _main(["train.max_steps=3", *args, "model.width=16"] if where == "between flags" else args, capsys)
    assert rc == 2 and "'train.batch_size' = 33" in err and "unrecognized" not in err


def test_inspect_and_bench_take_overrides_anywhere(capsys):
    from dbgen.bench.__main__ import main as bench_main
    from dbgen.inspect import main as inspect_main

    assert inspect_main(["model.width=8", "--config", str(TINY), "--json", "model.num_proc_layers=1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == inspect_config(TINY, ["model.width=8", "model.num_proc_layers=1"]) != inspect_config(TINY)
    rc = bench_main(["comm", "--config", str(TINY), "train.max_stepz=1", "--steps", "1", "model.width=8"])
    assert rc == 2 and "unknown key 'train.max_stepz'" in capsys.readouterr().err


def test_missing_config_file(tmp_path, capsys):
    rc, err = _main(["--config", str(tmp_path / "nope.yaml"), "--storage", str(tmp_path)], capsys)
    assert rc == 2 and "config file not found" in err and "nope.yaml" in err


def test_missing_data_path(tmp_path, capsys):
    missing = tmp_path / "no-such-data"
    rc, err = _main(["--config", str(TINY), f"data.train={missing}", "--storage", str(tmp_path)], capsys)
    assert rc == 2 and "data.train" in err and str(missing) in err


def test_indivisible_batch(tmp_path, capsys):
    rc, err = _main(["--config", str(TINY), "train.batch_size=33", "--storage", str(tmp_path)], capsys)
    assert rc == 2 and "'train.batch_size' = 33" in err


def test_resuming_a_run_of_another_model_is_refused(tmp_path, capsys):
    import json

    ck = tmp_path / "r" / "checkpoint_0000010"
    ck.mkdir(parents=True)
    other = cfg("model.width=8").to_dict()
    (ck / "meta.json").write_text(json.dumps({"step": 10, "world_size": 2, "zero_stage": 0, "config": other}))
    rc, err = _main(["--config", str(TINY), "--name", "r", "--storage", str(tmp_path)], capsys)
    assert rc == 2 and "another model" in err and "--name" in err


def test_resuming_zero1_with_another_worker_count_is_refused(tmp_path, capsys):
    import json

    ck = tmp_path / "r" / "checkpoint_0000010"
    ck.mkdir(parents=True)
    meta = {"step": 10, "world_size": 2, "zero_stage": 1, "config": cfg("scale.zero_stage=1").to_dict()}
    (ck / "meta.json").write_text(json.dumps(meta))
    rc, err = _main(
        [
            "--config",
            str(TINY),
            "scale.zero_stage=1",
            "scale.num_workers=1",
            "train.batch_size=32",
            "--name",
            "r",
            "--storage",
            str(tmp_path),
        ],
        capsys,
    )
    assert rc == 2 and "scale.num_workers=2 scale.zero_stage=1" in err


def test_cli_exits_2_without_starting_ray(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "dbgen.train", "--config", str(TINY), "scale.zero_stage=3", "--storage", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "'scale.zero_stage' = 3: expected one of 0, 1, 2" in out.stderr
    assert "Started a local Ray" not in out.stdout + out.stderr


# ------------------------------------------------------------------------------------------- docs/config.md
def test_config_reference_table_is_current():
    """docs/config.md's table is generated: `python -m dbgen.train --print-config-table` prints it."""
    assert schema_markdown() in (ROOT / "docs" / "config.md").read_text(), (
        "docs/config.md's table is stale: replace it with the output of python -m dbgen.train --print-config-table"
    )


# ------------------------------------------------------------------------------------------- progress bar
_BAR_SCRIPT = """
import json, sys, time
from pathlib import Path
from dbgen.console import MetricsFollower, setup_logging
setup_logging(verbose=False)
run = Path(sys.argv[1])
follower = MetricsFollower(run, 4, poll_s=0.1)
print("bar" if follower._bar is not None else "no bar", file=sys.stderr, flush=True)
with follower:
    for step in range(1, 5):
        with open(run / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"kind": "train", "step": step, "bpd": 8.0 - step, "images_per_s": 10.0,
                                "grad_norm": 1.0, "lr": 1e-3, "skipped": 0, "eta_s": 4.0 - step}) + chr(10))
        time.sleep(0.3)
"""


def test_progress_bar_only_on_a_terminal(tmp_path):
    import fcntl
    import os
    import pty
    import struct
    import termios

    (tmp_path / "metrics.jsonl").write_text("")
    cmd = [sys.executable, "-c", _BAR_SCRIPT, str(tmp_path)]
    piped = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert piped.returncode == 0 and piped.stderr.startswith("no bar"), piped.stderr
    assert "step 4/4 | bpd 4.0000" in piped.stderr and "%|" not in piped.stderr  # the lines, without a bar

    (tmp_path / "metrics.jsonl").write_text("")
    main_fd, sub_fd = pty.openpty()
    fcntl.ioctl(sub_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    proc = subprocess.Popen(cmd, stderr=sub_fd, stdout=subprocess.DEVNULL)
    os.close(sub_fd)
    out = b""
    while True:
        try:
            chunk = os.read(main_fd, 4096)
        except OSError:  # the terminal closed: the process exited
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=60)
    os.close(main_fd)
    text = out.decode(errors="replace")
    assert re.search(r"bar\r?\n", text) and "no bar" not in text and "4/4" in text and "bpd=4.000" in text, text[-500:]
    assert "step 4/4 | bpd 4.0000" in text  # the lines still print above the bar
