"""The model interface, checked the same way on both models (RVAE and Flow++) and all three variants.

Which layers are binary (by module type), equal parameter counts across variants, gradients, sampling, the
importance-weighted bound, likelihood sanity on noise and on a tiny data set, and bad configs.
"""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dbgen.config import ConfigError, load_config
from dbgen.models import build
from dbgen.nn import BinaryConv2d, WeightNormLayer, binary_layers, data_dependent_init
from dbgen.step import PhaseClock, build_optimizer, lr_at, run_step
from dbgen.sync import LocalSync

ROOT = Path(__file__).parents[1]
MODELS = ["rvae", "flowpp"]
VARIANTS = ["fp", "binary", "binary_act"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config_path(model, variant):
    return ROOT / f"configs/{model}_{variant}_tiny.yaml"


def tiny(model, variant, dtype=torch.float64):
    torch.manual_seed(0)
    return build(config_path(model, variant)).to(dtype)


def noise(n, seed):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def smooth_images(n, seed):
    """A few smooth, photo-like images: random 4x4 colour fields upsampled bilinearly to 32x32."""
    coarse = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return (F.interpolate(coarse, size=32, mode="bilinear", align_corners=False) * 255).round().to(torch.uint8)


class TrainingSteps:
    """The optimizer step users run, on one process: :func:`dbgen.step.run_step` with the preset's optimizer
    (:func:`~dbgen.step.build_optimizer`: fused Adam, clip to train.grad_clip, the skip rule, latents clamped to
    [-1, 1]), :class:`~dbgen.sync.LocalSync` and the learning-rate schedule :func:`~dbgen.step.lr_at`. One batch
    per step; the optimizer state and the step count carry over from call to call."""

    def __init__(self, model, name, variant):
        self.model, self.cfg, self.step = model, load_config(config_path(name, variant)), 0
        self.sync = LocalSync(model, build_optimizer(self.cfg, model), grad_accum=1)

    def __call__(self, batches) -> float:
        """One step per batch; returns the last step's loss (bits/dim)."""
        for x in batches:
            out = run_step(
                self.model,
                self.sync,
                [x],
                self.cfg.train,
                lr_at(self.cfg, self.step),
                None,
                PhaseClock(x.device),
                self.model,
            )
            self.step += 1
        return out["loss"].item()


def expected_binary(model_name, model):
    """The layers the paper names as binary, found by module type (never by parameter names)."""
    if model_name == "rvae":
        from dbgen.models.rvae import ResidualLayer

        return {id(c) for m in model.modules() if isinstance(m, ResidualLayer) for c in (m.conv1, m.conv2)}
    from dbgen.models.flows import ConditioningNet, GatedResBlock

    # Every conv of the gated blocks of coupling conditioning nets (main and dequantization flow); the
    # dequantization context's gated blocks stay full precision (the paper's 90.1%).
    return {
        id(c)
        for net in model.modules()
        if isinstance(net, ConditioningNet)
        for block in net.modules()
        if isinstance(block, GatedResBlock)
        for c in block.modules()
        if isinstance(c, WeightNormLayer)
    }


# ------------------------------------------------------------------------------------------ structure
@pytest.mark.parametrize("name", MODELS)
def test_binary_layers_are_exactly_the_named_ones(name):
    models = {v: tiny(name, v, torch.float32) for v in VARIANTS}
    expected_ids = expected_binary(name, models["binary"])
    assert expected_ids
    for v in ("binary", "binary_act"):
        found = binary_layers(models[v])
        assert {id(m) for _, m in found} == expected_binary(name, models[v])
        assert all(type(m) is BinaryConv2d for _, m in found)
    # The fp variant has the same layers, full precision, in the same places.
    assert binary_layers(models["fp"]) == []
    fp_modules = dict(models["fp"].named_modules())
    for layer_name, _ in binary_layers(models["binary"]):
        assert isinstance(fp_modules[layer_name], WeightNormLayer) and not fp_modules[layer_name].binary
    assert {id(m) for m in fp_modules.values()} & expected_binary(name, models["fp"]) == expected_binary(
        name, models["fp"]
    )


@pytest.mark.parametrize("name", MODELS)
def test_variants_have_the_same_parameters(name):
    shapes = {v: [(n, tuple(p.shape)) for n, p in tiny(name, v, torch.float32).named_parameters()] for v in VARIANTS}
    assert shapes["fp"] == shapes["binary"] == shapes["binary_act"]
    counts = {v: sum(math.prod(s) for _, s in shapes[v]) for v in VARIANTS}
    assert 1_000 <= counts["fp"] <= 500_000  # "tiny": a few thousand to a few hundred thousand


# --------------------------------------------------------------------------------- gradients, sampling
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", MODELS)
def test_gradients_reach_every_trainable_parameter(name, variant):
    model = tiny(name, variant)
    x = smooth_images(4, seed=0)
    data_dependent_init(model, x)
    # Data-dependent init zeroes the last layer of every residual branch, which blocks the gradient of the
    # layers before it; two real steps move it off zero, as training does.
    TrainingSteps(model, name, variant)([x, x])
    model.zero_grad()
    model(x).backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{pname}: no gradient"
            assert torch.isfinite(p.grad).all(), f"{pname}: non-finite gradient"
            assert p.grad.abs().max() > 0, f"{pname}: zero gradient"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", MODELS)
def test_sampling_dtype_shape_and_determinism(name, variant):
    model = tiny(name, variant, torch.float32)
    data_dependent_init(model, smooth_images(8, seed=0))
    torch.manual_seed(7)
    a = model.sample(3)
    torch.manual_seed(7)
    b = model.sample(3)
    torch.manual_seed(8)
    c = model.sample(3)
    assert a.dtype == torch.uint8 and a.shape == (3, 3, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.float().std() > 0  # not a constant image
    assert model.sample(2, temperature=0.5).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", MODELS)
def test_importance_weighting_tightens_the_bound(name, variant):
    model = tiny(name, variant, torch.float32)
    x = smooth_images(4, seed=1)
    data_dependent_init(model, x)
    torch.manual_seed(0)
    k1 = torch.stack([model.log_likelihood_bpd(x, samples=1) for _ in range(4)])  # (4, N)
    k64 = model.log_likelihood_bpd(x, samples=64)  # (N,)
    assert k1.shape == (4, 4) and k64.shape == (4,)
    assert torch.isfinite(k1).all() and torch.isfinite(k64).all()
    # In bits/dim lower is better: the 64-sample bound is below the 1-sample one on average over the batch.
    # Statistical, not rounding: the gap grows with K in expectation and dwarfs float error here.
    assert k64.mean() <= k1.mean()


# --------------------------------------------------------------------------------- likelihood sanity
UNIFORM_CASES = [("rvae", v) for v in VARIANTS] + [("flowpp", "binary")]


@pytest.mark.parametrize("name, variant", UNIFORM_CASES)
def test_no_bound_below_8_bits_on_uniform_noise(name, variant):
    """Uniform 8-bit noise has entropy 8 bits/dim: no valid bound, trained on it or not, may go below that by
    more than sampling noise (3 standard errors over the held-out batch)."""
    model = tiny(name, variant, torch.float32)
    data_dependent_init(model, noise(32, seed=0))
    held_out = noise(32, seed=1)

    def check(bound):
        floor = 8.0 - 3 * bound.std().item() / math.sqrt(bound.numel())
        assert bound.mean().item() >= floor, f"bound {bound.mean().item():.4f} < 8 bits/dim (floor {floor:.4f})"

    check(model.log_likelihood_bpd(held_out, samples=4))
    last = TrainingSteps(model, name, variant)(noise(8, seed=100 + i) for i in range(100))
    # the training loss (a bound on a fresh batch of 8) as well; statistical: 0.05 bits/dim is the sampling
    # noise allowance of a one-batch estimate (check's floor uses 3 standard errors of the held-out batch)
    assert last >= 8.0 - 0.05
    check(model.log_likelihood_bpd(held_out, samples=4))


FIXED_CASES = [("rvae", v) for v in VARIANTS] + [("flowpp", "binary_act")]


@pytest.mark.parametrize("name, variant", FIXED_CASES)
def test_training_on_a_few_images_drives_bits_per_dim_down(name, variant):
    model = tiny(name, variant, torch.float32)
    x = smooth_images(4, seed=2)
    data_dependent_init(model, x)
    torch.manual_seed(0)
    before = model.log_likelihood_bpd(x).mean().item()
    # Up to 200 training steps, in chunks of 25; stop early once the training loss is 1.5 bits/dim down.
    steps = TrainingSteps(model, name, variant)
    for _ in range(8):
        if steps([x] * 25) < before - 1.5:
            break
    torch.manual_seed(1)
    after = model.log_likelihood_bpd(x, samples=8).mean().item()
    # Modelling, not rounding: learning must move the bound by a whole bit/dim, far above the estimate's
    # sampling noise and any float error, so 1.0 separates training from no training.
    assert after < before - 1.0, f"bits/dim {before:.3f} -> {after:.3f}"


# --------------------------------------------------------------------------------------- bad configs
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(
    "change, key",
    [
        ({"binary_weights": "maybe"}, "model.binary_weights"),  # wrong type
        ({"image_size": 31}, "model.image_size"),  # impossible shape
        ({"image_sise": 32}, "model.image_sise"),  # unknown key
    ],
)
def test_bad_configs_name_the_key_before_building(name, change, key):
    raw = load_config(config_path(name, "fp")).to_dict()
    raw["model"].update(change)
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(raw)
    with pytest.raises(ConfigError, match=f"'{key}'"):
        build(raw)
