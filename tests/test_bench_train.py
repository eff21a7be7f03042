"""``python -m dbgen.bench train``: it times the trainer's step (dbgen.step.run_step), counts the convolution FLOPs
a hand count from the conv shapes gives, runs several variants in one process and needs no DeepSpeed or Ray."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dbgen.bench.__main__ import main as bench_main
from dbgen.bench.train import bench, bf16_peak, format_table, parse_variant, reference_for
from dbgen.config import load_config
from dbgen.models import build
from dbgen.nn import BinaryConvTranspose2d, WeightNormLayer, WNConvTranspose2d, data_dependent_init
from dbgen.step import EMA, PhaseClock, build_optimizer, lr_at, prepare_model, resolve_stats, run_step
from dbgen.sync import LocalSync

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hand_conv_flops(cfg, batch: int) -> int:
    """Convolution FLOPs of one forward + backward pass, from each conv layer's shapes (forward hooks).

    Forward: 2 per multiply-add, ``2 * out_numel * (in_channels/groups * kh * kw)`` (a transposed conv:
    ``2 * in_numel * out_channels * kh * kw``). Backward: the weight gradient costs as much again, and so does
    the input gradient when the layer's input needs one (not for the first conv, whose input is the data)."""
    torch.manual_seed(0)
    model = build(cfg)
    x = torch.randint(
        0, 256, (batch, cfg.model.channels, cfg.model.image_size, cfg.model.image_size), dtype=torch.uint8
    )
    data_dependent_init(model, x)
    total = 0

    def hook(module, args, out):
        nonlocal total
        inp, w = args[0], module.weight  # conv (out, in/g, kh, kw); transposed (in, out, kh, kw)
        per_pass = (
            2
            * (inp.numel() if isinstance(module, BinaryConvTranspose2d | WNConvTranspose2d) else out.numel())
            * math.prod(w.shape[1:])
        )
        total += per_pass * (3 if inp.requires_grad else 2)

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, WeightNormLayer) and m.weight.dim() == 4
    ]
    model(x).backward()
    for h in handles:
        h.remove()
    assert len(handles) > 5
    return total


def test_two_variants_in_one_call(tmp_path, capsys):
    """Two variants of the tiny binary RVAE: sane numbers, conv FLOPs equal to the hand count, JSON and table."""
    out = tmp_path / "train.json"
    rc = bench_main(
        [
            "train",
            "--config",
            str(CONFIGS / "rvae_binary_tiny.yaml"),
            "--batch",
            "4",
            "--steps",
            "2",
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--variant",
            "fp32:train.precision=fp32,train.channels_last=false",
            "--variant",
            "bf16_nhwc:train.precision=bf16,train.channels_last=true",
            "--json-out",
            str(out),
        ]
    )
    assert rc == 0
    results = json.loads(out.read_text())
    assert [r["variant"] for r in results] == ["fp32", "bf16_nhwc"]
    fp32, bf16 = results
    assert (fp32["precision"], fp32["channels_last"]) == ("fp32", False)
    assert (bf16["precision"], bf16["channels_last"]) == ("bfloat16", True)
    expected = hand_conv_flops(load_config(CONFIGS / "rvae_binary_tiny.yaml"), 4)
    for r in results:
        assert r["config"] == "rvae_binary_tiny" and r["batch"] == 4 and r["steps"] == 2
        assert len(r["step_ms_windows"]) == 2 and r["step_ms"] == pytest.approx(sum(r["step_ms_windows"]) / 2)
        assert r["step_ms"] > 0 and r["images_per_s"] == pytest.approx(4e3 / r["step_ms"])
        assert 1.0 < r["final_loss_bpd"] < 16.0 and math.isfinite(r["final_grad_norm"])
        assert r["skipped_steps"] == 0 and r["peak_mem_mb"] > 0
        assert r["conv_flops"] == expected
        assert r["total_flops"] >= r["conv_flops"]
        assert r["conv_tflops"] == pytest.approx(r["conv_flops"] / (r["step_ms"] / 1e3) / 1e12)
        assert r["frac_bf16_peak"] is None and r["bf16_peak_tflops"] is None  # CPU: no peak to compare with
        assert "original_images_per_s" not in r  # a tiny model is not the paper's
    table = capsys.readouterr().out
    assert "bf16_nhwc" in table and "fp32" in table and "no bf16 peak known" in table


@pytest.mark.parametrize("name", ["flowpp_binary_tiny", "rvae_binary_act_tiny"])
def test_conv_flops_equal_hand_count(name):
    """Flow++ (dequantization flow, gated blocks, convs whose input needs no gradient) and a 1/1 model."""
    cfg = load_config(CONFIGS / f"{name}.yaml", ["train.precision=fp32"])
    r = bench(cfg, batch=2, steps=1, warmup=0)
    assert r["conv_flops"] == hand_conv_flops(cfg, 2)
    assert r["flops_counted"] == "eager"


def test_bench_loss_is_run_steps_loss():
    """The loss the bench reports after warm-up + timed steps is what run_step gives from the same seed: the
    trainer's step with its lr schedule (a warm-up, so lr changes every step), accumulation, EMA and clamp."""
    overrides = ["schedule.warmup_steps=10", "train.grad_accum=2", "train.ema_decay=0.9", "train.precision=fp32"]
    cfg = load_config(CONFIGS / "rvae_binary_tiny.yaml", overrides)
    r = bench(cfg, batch=4, steps=1, repeats=2, warmup=1, flops=False)
    assert r["ema"] and r["grad_accum"] == 2

    # The documented setup order: seed, one CPU uint8 batch, build, init, prepare, optimizer.
    torch.manual_seed(cfg.train.seed)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    model = build(cfg)
    data_dependent_init(model, x)
    prepare_model(model, cfg, torch.device("cpu"))
    sync = LocalSync(model, build_optimizer(cfg, model), grad_accum=2)
    ema = EMA(model, 0.9)
    stats = resolve_stats(
        [
            run_step(
                model, sync, [x[:2], x[2:]], cfg.train, lr_at(cfg, i), None, PhaseClock(torch.device("cpu")), model, ema
            )
            for i in range(3)
        ]
    )
    assert r["first_loss_bpd"] == stats[1]["loss"]
    assert r["final_loss_bpd"] == stats[2]["loss"]
    assert stats[2]["loss"] != stats[0]["loss"]  # the steps did train


def test_failed_variant_is_reported_and_others_run(tmp_path):
    out = tmp_path / "r.json"
    rc = bench_main(
        [
            "train",
            "--config",
            str(CONFIGS / "rvae_fp_tiny.yaml"),
            "--batch",
            "2",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--no-flops",
            "--variant",
            "bad:train.precision=fp64",
            "--variant",
            "ok:train.precision=fp32",
            "--json-out",
            str(out),
        ]
    )
    assert rc == 1
    bad, ok = json.loads(out.read_text())
    assert "precision" in bad["error"] and "images_per_s" not in bad
    assert "error" not in ok and ok["images_per_s"] > 0 and "conv_flops" not in ok


def test_cli_runs_without_deepspeed_and_ray(tmp_path):
    """The GPU machine has neither: the bench's import chain (dbgen.trainer included) must not need them."""
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("deepspeed", "ray"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from dbgen.bench.__main__ import main
raise SystemExit(main(["train", "--config", {str(CONFIGS / "rvae_fp_tiny.yaml")!r}, "--batch", "2",
                       "--steps", "1", "--warmup", "0", "--no-flops", "--threads", "1", "--json"]))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    (r,) = json.loads(p.stdout)
    assert r["images_per_s"] > 0 and r["threads"] == 1


def test_parse_variant():
    assert parse_variant("bf16_nhwc:train.precision=bf16,train.channels_last=true") == (
        "bf16_nhwc",
        ["train.precision=bf16", "train.channels_last=true"],
    )
    assert parse_variant("b:optimizer.betas=[0.9,0.99],train.compile=true") == (
        "b",
        ["optimizer.betas=[0.9,0.99]", "train.compile=true"],
    )
    assert parse_variant("asis:") == ("asis", [])
    for bad in ("no_colon", "bad name:train.compile=true", "x:train.compile"):
        with pytest.raises(ValueError, match="--variant"):
            parse_variant(bad)


def test_bf16_peak_by_device_name():
    assert bf16_peak("NVIDIA H100 80GB HBM3") == 989.4e12
    assert bf16_peak("NVIDIA H100 PCIe") == 756e12
    assert bf16_peak("NVIDIA H200") == 989.4e12
    assert bf16_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert bf16_peak("NVIDIA H100 NVL") is None and bf16_peak("cpu") is None


def test_reference_only_for_the_paper_configs_at_their_batch():
    rvae = load_config(CONFIGS / "rvae_cifar10_binary.yaml")
    assert reference_for(rvae, 128)[:2] == (1399, 5600)
    assert reference_for(rvae, 8) is None
    assert reference_for(load_config(CONFIGS / "flowpp_cifar10_binary.yaml"), 64)[:2] == (243, 970)
    assert reference_for(load_config(CONFIGS / "flowpp_cifar10_fp.yaml"), 64)[:2] == (184, None)
    assert reference_for(load_config(CONFIGS / "rvae_cifar10_binary_act.yaml"), 128)[:2] == (1399, None)
    assert reference_for(load_config(CONFIGS / "flowpp_cifar10_binary_act.yaml"), 64) is None
    assert reference_for(load_config(CONFIGS / "rvae_binary_tiny.yaml"), 128) is None


def test_table_marks_targets():
    row = {
        "config": "rvae_cifar10_binary",
        "variant": "bf16",
        "batch": 128,
        "step_ms": 20.0,
        "images_per_s": 6400.0,
        "conv_tflops": 400.0,
        "frac_bf16_peak": 0.404,
        "peak_mem_mb": 9000.0,
        "final_loss_bpd": 8.1,
        "vs_original": 4.57,
        "target_images_per_s": 5600,
        "target_met": True,
        "original_images_per_s": 1399,
        "device": "NVIDIA H100 80GB HBM3",
        "bf16_peak_tflops": 989.4,
    }
    table = format_table(
        [
            row,
            {**row, "variant": "fp32", "images_per_s": 1500.0, "target_met": False},
            {"config": "x", "variant": "y", "error": "OutOfMemoryError: ..."},
        ]
    )
    lines = table.splitlines()
    assert ">=5600 ok" in lines[2] and "40.4" in lines[2] and "4.57" in lines[2]
    assert ">=5600 NO" in lines[3]
    assert "ERROR OutOfMemoryError" in lines[4]


@pytest.mark.slow
def test_gpu_check_script_dry_run(tmp_path):
    """benchmarks/gpu_check.sh end to end on the CPU (DRY_RUN: tiny configs; no compile stage, to stay short):
    every stage passes, the twins run with the ladder's fastest variant, and at most 8 files land in OUT (what the
    device tool returns)."""
    out = tmp_path / "out"
    env = {
        **os.environ,
        "DRY_RUN": "1",
        "COMPILE_MODES": "",
        "STEPS": "1",
        "REPEATS": "1",
        "OUT": str(out),
        "PY": sys.executable,
        "TMPDIR": str(tmp_path),
    }
    p = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stdout[-4000:]
    files = {f.name for f in out.iterdir()}
    assert {"gpu_check.log", "summary.txt", "train_results.json", "profiles.txt", "details.tar.gz"} <= files
    assert len(files) <= 8
    results = json.loads((out / "train_results.json").read_text())
    assert all("error" not in r for r in results)
    ladder = ["plain", "bf16", "bf16_nhwc"]
    for model, twins in (
        ("rvae", ["rvae_fp_tiny", "rvae_binary_act_tiny"]),
        ("flowpp", ["flowpp_fp_tiny", "flowpp_binary_act_tiny"]),
    ):
        rows = [r for r in results if r["stage"] == f"ladder_{model}"]
        assert [r["variant"] for r in rows] == ladder and all(r["config"] == f"{model}_binary_tiny" for r in rows)
        fastest = max(rows, key=lambda r: r["images_per_s"])
        twin_rows = [r for r in results if r["stage"] == f"twins_{model}"]
        assert [r["config"] for r in twin_rows] == twins
        assert all(r["variant"] == fastest["variant"] for r in twin_rows)
    summary = (out / "summary.txt").read_text()
    for stage in ("env", "variants", "ladder_rvae", "ladder_flowpp", "twins_rvae", "twins_flowpp"):
        assert re.search(rf"^  {stage} +ok ", summary, re.M), summary
    assert len(re.findall(r"^===== ladder_", (out / "profiles.txt").read_text(), re.M)) == 6  # one per ladder run
