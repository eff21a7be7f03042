"""benchmarks/precision_curve.py ("same math"): a tiny bf16 vs fp32 run on real photographs.

What makes its noise comparison meaningful: a run is a pure function of its seed (two fp32 runs of one seed give
the same curve, bit for bit), different seeds give different curves, and every run sees the same batches.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--config",
    str(ROOT / "configs/rvae_binary_tiny.yaml"),
    "--data",
    "builtin:photos32",
    "--batch",
    "8",
    "--eval-rows",
    "16",
    "train.init_batch_size=16",
    "train.eval_batch_size=16",
]


@pytest.fixture(scope="module")
def pc():
    spec = importlib.util.spec_from_file_location("precision_curve", ROOT / "benchmarks" / "precision_curve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    n = torch.get_num_threads()
    yield mod
    torch.set_num_threads(n)


def test_main_writes_curves_and_verdict(pc, tmp_path):
    out = tmp_path / "curve.json"
    result = pc.main(
        [
            *TINY,
            "--steps",
            "5",
            "--window",
            "2",
            "--eval-every",
            "2",
            "--threads",
            "1",
            "--seeds",
            "0",
            "1",
            "--bf16-seeds",
            "0",
            "--json-out",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert saved["comparison"] == json.loads(json.dumps(result["comparison"]))
    runs = {(r["precision"], r["seed"]): r for r in saved["runs"]}
    assert set(runs) == {("fp32", 0), ("fp32", 1), ("bf16", 0)}
    for r in runs.values():
        assert len(r["loss"]) == 5 and all(3.0 < v < 12.0 for v in r["loss"])  # bits/dim of 8-bit images
        assert [e["step"] for e in r["eval"]] == [0, 2, 4, 5]
    c = saved["comparison"]
    assert c["windows"] == [[0, 2], [2, 4], [4, 5]]
    f0 = runs[("fp32", 0)]["loss"]
    assert c["means"]["fp32_s0"][0] == pytest.approx((f0[0] + f0[1]) / 2)
    noise = [abs(a - b) for a, b in zip(c["means"]["fp32_s0"], c["means"]["fp32_s1"], strict=True)]
    assert c["fp32_noise"]["per_window"] == pytest.approx(noise)
    dev = c["bf16_deviation"]["s0"]
    assert dev["max"] == pytest.approx(max(dev["per_window"]))
    assert c["within_noise"] == (dev["max"] <= c["fp32_noise"]["max"] and dev["mean"] <= c["fp32_noise"]["mean"])
    init = c["init"]["s0"]
    assert init["train_diff"] == pytest.approx(abs(runs[("bf16", 0)]["loss"][0] - f0[0]))
    assert init["train_diff"] > 0  # bf16 autocast really ran (CPU autocast): not the fp32 numbers again
    assert isinstance(c["init_within_1e-3"], bool) and "rule" in c
    assert {k: v["same_seed"] for k, v in c["pairs"].items()} == {
        "fp32_s0 vs fp32_s1": False,
        "fp32_s0 vs bf16_s0": True,
        "fp32_s1 vs bf16_s0": False,
    }
    assert c["pairs"]["fp32_s0 vs fp32_s1"]["max"] == pytest.approx(c["fp32_noise"]["max"])


def test_same_seed_same_curve_other_seed_other_curve(pc):
    """Determinism given the seed (and the data order), so fp32 seed-to-seed spread is the noise, not chance."""
    args = pc.parse_args([*TINY, "--steps", "3"])
    torch.set_num_threads(1)
    cfg = pc.load_config(args.config, ["train.batch_size=8", *args.overrides, "train.precision=fp32"])
    train_dir, test_dir, _ = pc.resolve_data("builtin:photos32", pc.cache_root())
    x = pc.eval_set(test_dir, 16)
    cpu = torch.device("cpu")
    a, b, c = (pc.train_run(cfg, seed, train_dir, x, 3, cpu, 2, 2) for seed in (0, 0, 1))
    assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"] and a["eval"] == b["eval"]
    assert a["loss"] != c["loss"] and a["eval"][0] != c["eval"][0]


def test_rule_flags_a_deviation_larger_than_the_noise(pc):
    flat = [5.0] * 4
    runs = [
        {"precision": "fp32", "seed": 0, "loss": flat, "eval": [{"step": 0, "bpd": 5.0}]},
        {"precision": "fp32", "seed": 1, "loss": [5.01] * 4, "eval": [{"step": 0, "bpd": 5.0}]},
        {"precision": "bf16", "seed": 0, "loss": [5.0, 5.0, 5.1, 5.1], "eval": [{"step": 0, "bpd": 5.002}]},
    ]
    c = pc.compare(runs, 2)
    assert c["fp32_noise"]["max"] == pytest.approx(0.01)
    assert c["bf16_deviation"]["s0"]["per_window"] == pytest.approx([0.0, 0.1])
    assert not c["within_noise"] and not c["init_within_1e-3"]
    runs[2]["loss"], runs[2]["eval"][0]["bpd"] = [5.0, 5.0, 5.005, 5.005], 5.0005
    c = pc.compare(runs, 2)
    assert c["within_noise"] and c["init_within_1e-3"]
