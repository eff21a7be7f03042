"""The large presets (wide Flow++, wide-and-deep binary RVAE, ImageNet64 models): each header states the
parameter count the model really has; the 64x64 RVAE has its extra stride-2 stage; the 64x64 tiny variants
train end to end (DeepSpeed engine, loaders, eval, checkpoint) on a real 64x64 split."""

import json
import re
from pathlib import Path

import pytest
import torch
from gloo_group import spawn
from jpeg64 import jpeg64_split

from dbgen.config import ConfigError, load_config
from dbgen.models import build
from dbgen.nn import binary_layers

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml") if "wide" in p.name or "imagenet64" in p.name)
TINY64 = ["rvae_imagenet64_binary_tiny.yaml", "flowpp_imagenet64_binary_tiny.yaml"]


def counts(cfg):
    with torch.device("meta"):  # shapes only: the 0.75B model would need 3 GB of fp32 parameters
        model = build(cfg.model)
    return sum(p.numel() for p in model.parameters()), sum(m.weight.numel() for _, m in binary_layers(model))


def test_every_large_preset_is_here():
    assert len(PRESETS) == 11 and set(TINY64) <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_header_states_the_parameter_count(name):
    cfg = load_config(ROOT / "configs" / name)
    params, binary = counts(cfg)
    header = (ROOT / "configs" / name).read_text()
    m = re.search(r"# PARAMS: ([\d,]+) parameters, ([\d,]+) binary", header)
    assert m, f"{name}: no '# PARAMS: N parameters, B binary' header line"
    assert (int(m[1].replace(",", "")), int(m[2].replace(",", ""))) == (params, binary)
    assert (binary > 0) == cfg.model.binary_weights
    if "wide" in name and cfg.model.name == "flowpp":
        assert cfg.model.hdim == 180
    if "imagenet64" in name:
        assert cfg.model.image_size == 64


def test_wide_rvae_is_half_to_one_billion_parameters_and_mostly_binary():
    params, binary = counts(load_config(ROOT / "configs" / "rvae_cifar10_wide_binary.yaml"))
    assert 0.5e9 <= params <= 1e9 and binary / params > 0.98


def test_rvae_64x64_latent_grid_and_shapes():
    """stride2_stages 2 at 64x64: the latents sit on the 16x16 grid of the 32x32 model; the output is 64x64."""
    cfg = load_config(ROOT / "configs" / "rvae_imagenet64_binary_tiny.yaml")
    model = build(cfg.model)
    assert model.latent_size == 16 and len(model.down_convs) == len(model.up_convs) == 1
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    q = model._up(x.float() / 127.5 - 1)
    assert all(t.shape[-2:] == (16, 16) for t in q)
    loc, _ = model._down(2, q)
    assert loc.shape == (2, 3, 64, 64)
    with pytest.raises(ConfigError, match="'model.stride2_stages' = 3: expected an int >= 1 with image_size"):
        load_config(ROOT / "configs" / "rvae_binary_tiny.yaml", ["model.image_size=36", "model.stride2_stages=3"])


def _train_tiny64(rank, world, out_dir, split):
    from dbgen.trainer import Trainer

    torch.set_num_threads(1)
    for name in TINY64:
        overrides = [
            "train.max_steps=3",
            "train.batch_size=8",
            "train.init_batch_size=16",
            "train.log_every=1",
            "train.eval_batches=1",
            "train.eval_batch_size=8",
            "train.num_samples=2",
            "data.shuffle_buffer=64",
        ]
        cfg = load_config(ROOT / "configs" / name, overrides)
        run_dir = Path(out_dir) / name
        run_dir.mkdir()
        summary = Trainer(cfg, run_dir, split, split, rank=rank, world_size=world).fit()
        (run_dir / "out.json").write_text(json.dumps(summary))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tiny_64x64_presets_train_on_a_real_64x64_split(tmp_path):
    split = jpeg64_split()
    assert json.loads((split / "manifest.json").read_text())["resolution"] == 64
    spawn(_train_tiny64, 1, str(tmp_path), str(split))
    for name in TINY64:
        summary = json.loads((tmp_path / name / "out.json").read_text())
        assert summary["steps"] == 3 and summary["skipped_steps"] == 0
        # 8 bits/dim is a uniform model; a trained (even 3-step) model on photographs is finite and below 9
        assert 0 < summary["final_train_bpd"] < 9 and 0 < summary["final_eval_bpd"] < 9, summary
        assert summary["samples"] and Path(summary["samples"]).is_file()
