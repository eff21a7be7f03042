"""The memory planner (``python -m dbgen.inspect --memory``) against measured peaks of real training steps.

Measured: 2 gloo ranks each build the real :class:`dbgen.trainer.Trainer` (model, data-dependent init, DeepSpeed
engine, gradient sync, loader) and take 2 optimizer steps (the first allocates Adam's state, the second runs a
forward/backward with it). Per rank, the peak is the process's resident high-water mark (``VmHWM``, reset with
``/proc/self/clear_refs`` just before the trainer is built) minus its resident size at that moment (Python,
torch, DeepSpeed: the framework, not the plan). glibc's mmap threshold is pinned so freed tensors go back to the
system between cases (otherwise the heap keeps them and later peaks read low).
"""

import ctypes
import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gloo_group import spawn

from dbgen.memory import plan_memory, proc_status_bytes, reset_peak_rss

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.15

# (config, overrides, global batch, modes): the tiny configs at a batch where the step (not the loader)
# dominates, and the paper RVAE's layers (width 256, 5x5 and 3x3 binary convs at 16x16) at batch 8, where the
# reduce phase is the peak; 3 stochastic layers instead of 12 (14M parameters, not 56M): the depth repeats the
# same layers and proves nothing more, at four times the cost.
CASES = [
    ("rvae_binary_tiny.yaml", [], 512, ("dp", "packed")),
    ("flowpp_binary_tiny.yaml", [], 64, ("dp", "packed")),
    ("rvae_cifar10_binary.yaml", ["model.num_stochastic=3"], 8, ("dp", "packed-floats", "packed")),
]
MODE_OVERRIDES = {
    "dp": [],
    "packed-floats": ["comm.binary_weights=packed", "comm.resident_bits=false"],
    "packed": ["comm.binary_weights=packed"],  # resident bits (the default)
}
RESIDENT_TOLERANCE = 0.05  # the resident packed mode (issue 34's bound)


def _measure(rank, world, out_dir, train_dir):
    from dbgen.config import load_config
    from dbgen.trainer import Trainer

    torch.set_num_threads(1)
    libc = ctypes.CDLL("libc.so.6")
    # A first trainer, not measured: what the first one loads once per process (DeepSpeed's comm op, the
    # loader's libraries, gloo's buffers) is framework, not plan.
    warm = load_config(ROOT / "configs" / "rvae_binary_tiny.yaml", ["train.init_batch_size=2", "train.max_steps=1"])
    (Path(out_dir) / "warm-up").mkdir(exist_ok=True)
    tr = Trainer(warm, Path(out_dir) / "warm-up", train_dir, None, rank=rank, world_size=world)
    tr.train_step(iter(tr.loader))
    del tr
    res = {}
    for config, extra, batch, modes in CASES:
        for mode in modes:
            overrides = [
                *extra,
                f"train.batch_size={batch}",
                "train.init_batch_size=2",
                "data.shuffle_buffer=64",
                "train.max_steps=2",
                "scale.num_workers=2",
                *MODE_OVERRIDES[mode],
            ]
            cfg = load_config(ROOT / "configs" / config, overrides)
            run_dir = Path(out_dir) / f"{config}-{mode}"
            run_dir.mkdir(exist_ok=True)
            gc.collect()
            libc.malloc_trim(0)
            base = reset_peak_rss()
            tr = Trainer(cfg, run_dir, train_dir, None, rank=rank, world_size=world)
            data = iter(tr.loader)
            for _ in range(2):
                tr.train_step(data)
            res[f"{config}-{mode}"] = proc_status_bytes("VmHWM") - base
            del tr, data
    (Path(out_dir) / f"peaks{rank}.json").write_text(json.dumps(res))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_planner_total_within_15_percent_of_measured_peak_and_5_resident(tmp_path, monkeypatch):
    """The plan is the worst worker's. In the packed modes the worker owning a bucket's chunks receives W copies
    of them while the other receives none, so the ranks' peaks differ (by 6-10% on the paper RVAE): their plans
    are checked against the larger peak (the resident mode within 5%), dp's against every rank."""
    from dbgen.data import resolve_split

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    spawn(_measure, 2, str(tmp_path), str(resolve_split("builtin:photos32", "train")))
    peaks = [json.loads((tmp_path / f"peaks{r}.json").read_text()) for r in range(2)]
    rows = []
    for config, extra, batch, modes in CASES:
        plan = {m.mode: m for m in plan_memory(ROOT / "configs" / config, extra, workers=2, batch=batch).modes}
        for mode in modes:
            planned = plan[mode].total
            for r in range(2):
                measured = peaks[r][f"{config}-{mode}"]
                rows.append((config, mode, r, planned, measured, planned / measured - 1))
            worst = max(peaks[r][f"{config}-{mode}"] for r in range(2))
            rows.append((config, mode, "max", planned, worst, planned / worst - 1))
    table = "\n".join(
        f"{c:28s} {m:13s} rank {r}: planned {p / 2**20:8.1f} MiB measured {q / 2**20:8.1f} MiB ({e:+.1%})"
        for c, m, r, p, q, e in rows
    )
    print(table)
    assert all(abs(e) <= TOLERANCE for _, m, r, _, _, e in rows if m == "dp" or r == "max"), table
    resident = [e for _, m, r, *_, e in rows if m == "packed" and r == "max"]
    assert len(resident) == 3 and all(abs(e) <= RESIDENT_TOLERANCE for e in resident), table


def test_inspect_memory_cli_json_and_table():
    """The CLI prints the same plan as a table and as JSON; --gpu-memory decides which modes fit."""
    args = [
        sys.executable,
        "-m",
        "dbgen.inspect",
        "--config",
        str(ROOT / "configs" / "rvae_binary_tiny.yaml"),
        "--memory",
        "--workers",
        "2",
        "--batch",
        "32",
    ]
    out = subprocess.run([*args, "--json", "--gpu-memory", "12MiB"], capture_output=True, text=True, check=True)
    plan = json.loads(out.stdout)
    modes = {m["mode"]: m for m in plan["modes"]}
    assert list(modes) == ["dp", "zero1", "zero2", "packed-floats", "packed", "packed+onebit"]
    assert plan["workers"] == 2 and plan["micro_batch"] == 16
    for name, m in modes.items():
        parts = m["parameters"] + m["optimizer"] + m["binary_signs"]
        compute, exchange = m["materialized_weights"] + m["activations"], m["gradients"] + m["reduce_buffers"]
        # the packed modes exchange during backward (comm.overlap): both phases at once
        assert m["total"] == parts + (compute + exchange if name.startswith("packed") else max(compute, exchange))
        assert m["activations_checkpointed"] < m["activations"] and m["fits"] == (m["total"] <= 12 * 2**20)
    assert modes["packed"]["optimizer"] < modes["dp"]["optimizer"]
    binary = 4 * plan["binary_params"]
    assert modes["packed-floats"]["parameters"] - modes["packed"]["parameters"] == binary, "resident: no float copy"
    assert modes["packed"]["binary_signs"] >= binary // 32
    table = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    assert "packed+onebit" in table and f"{modes['dp']['total']:,}" in table


def test_inspect_largest_width_is_the_last_width_that_fits():
    """--largest-width: per mode, a multiple of 16 whose plan fits the budget and the next one does not (the
    same scaled estimate, recomputed here at both widths); where parameters dominate (1 row per worker), packed
    fits a wider model than dp."""
    from dbgen.memory import _activation_lines, _plan, _sized

    config, budget = ROOT / "configs" / "rvae_binary_tiny.yaml", 2**30
    args = [sys.executable, "-m", "dbgen.inspect", "--config", str(config), "--memory", "--workers", "2"]
    args += ["--batch", "2", "--gpu-memory", "1GiB", "--largest-width", "--json"]
    widths = json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout)["largest_width"]
    cfg = _sized(config, [], 2, 2)
    acts, w0 = _activation_lines(cfg), cfg.model.width

    def total(width, mode):
        r = width / w0
        scaled = {k: round(v * (r * r if k.startswith("materialized") else r)) for k, v in acts.items()}
        c = _sized(cfg, [f"model.width={width}"], 2, 2)
        return next(m.total for m in _plan(c, scaled, None).modes if m.mode == mode)

    for mode in ("dp", "packed"):
        w = widths[mode]["width"]
        assert w % 16 == 0 and total(w, mode) <= budget < total(w + 16, mode), (mode, w)
    assert widths["packed"]["width"] > widths["dp"]["width"]
    assert widths["packed"]["params"] > widths["dp"]["params"]
