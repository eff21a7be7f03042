"""The ResNet VAE and its likelihoods: exact probabilities, the paper's architecture and sizes, the bounds."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bounds import assert_within, gamma

from dbgen.config import ConfigError, load_config
from dbgen.models import build
from dbgen.models.likelihoods import (
    DiscretizedLogistic,
    discretized_logistic_logp,
    discretized_logistic_sample,
    logistic_logp,
    to_unit,
)
from dbgen.models.rvae import RVAE, ResidualLayer, StochasticLayer, free_bits_kl
from dbgen.nn import (
    BinaryConv2d,
    WeightNormLayer,
    WNConv2d,
    WNConvTranspose2d,
    binary_layers,
    clamp_latents_,
    data_dependent_init,
    load_packed_state_dict,
    packed_state_dict,
)

ROOT = Path(__file__).parents[1]
TINY = {v: ROOT / f"configs/rvae_{v}_tiny.yaml" for v in ("fp", "binary", "binary_act")}
PAPER = ROOT / "configs/rvae_cifar10_binary.yaml"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(variant="binary", dtype=torch.float64, **model):
    cfg = load_config(TINY[variant], [f"model.{k}={v}" for k, v in model.items()])
    return build(cfg).to(dtype)


def images(n, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- likelihoods
@pytest.mark.parametrize(
    "loc, log_scale", [(0.0, -3.0), (0.3, -1.0), (-0.97, -5.0), (1.0, 0.0), (0.5, -9.0), (3.0, -2.0), (-0.2, 2.0)]
)
def test_discretized_logistic_sums_to_one(loc, log_scale):
    x = to_unit(torch.arange(256, dtype=torch.uint8), torch.float64)
    logp = discretized_logistic_logp(
        x, torch.tensor(loc, dtype=torch.float64), torch.tensor(log_scale, dtype=torch.float64)
    )
    assert torch.isfinite(logp).all()
    # First-order float64 bounds. Each mass comes from <= 16 roundings/libm calls (edges, logsigmoids, log of
    # expm1, exp): relative error gamma_16 (1 + |log mass| + cond), cond = (|upper| + |lower|) / (upper - lower)
    # the cancellation of the edge difference inside expm1; the 256-term sum adds gamma_256 (masses sum to 1).
    mass, s, h = logp.exp(), math.exp(log_scale), 1 / 255
    upper, lower = (x - loc + h) / s, (x - loc - h) / s
    mass_err = gamma(16, torch.float64) * mass * (1 + logp.abs() + (upper.abs() + lower.abs()) / (upper - lower))
    assert_within(mass.sum(), torch.tensor(1.0, dtype=torch.float64), gamma(256, torch.float64) + mass_err.sum())
    # Each bin's mass is the logistic CDF difference over the bin (where that difference is well conditioned).
    cdf = lambda t: torch.sigmoid((t - loc) / math.exp(log_scale))  # noqa: E731
    lo, hi = cdf(x - 1 / 255), cdf(x + 1 / 255)
    hi[-1], lo[0] = 1.0, 0.0
    # The naive difference: each sigmoid relatively within gamma_16 (1 + |argument|) (the argument's rounding
    # is amplified by |argument|), absolutely at most that times hi + lo; plus the mass's own error.
    assert_within(mass, hi - lo, mass_err + gamma(16, torch.float64) * (hi + lo) * (1 + upper.abs() + lower.abs()))


def test_discretized_logistic_far_tail_is_exact_and_differentiable():
    # 40 scales away from a bin the naive CDF difference is 0 in float64; the stable form keeps the log-mass.
    x = torch.tensor([0.0], dtype=torch.float64)
    loc = torch.tensor([0.8], dtype=torch.float64, requires_grad=True)
    log_scale = torch.tensor(math.log(0.02), dtype=torch.float64, requires_grad=True)
    logp = discretized_logistic_logp(x, loc, log_scale)
    s, h = 0.02, 1 / 255
    # log(sigmoid(a) - sigmoid(b)) ~ b + log(e^(a-b) - 1) for very negative a, b
    a, b = (0.0 - 0.8 + h) / s, (0.0 - 0.8 - h) / s
    expected = b + math.log(math.expm1(a - b))
    # The identity is exact up to sigmoid(a) ~ 1e-17; both sides are <= 16 float64 roundings/libm calls on
    # values of size |a|, |b| ~ 40, with a - b (0.4) formed by cancellation (amplifying by (|a| + |b|) / (a - b)).
    cond = (abs(a) + abs(b)) / (a - b)
    assert_within(logp.item(), expected, gamma(16, torch.float64) * (1 + abs(a) + abs(b) + cond) + 2 * math.exp(a))
    logp.sum().backward()
    # far in the lower tail log p ~ (x - loc) / s: moving loc towards x raises it at rate 1/s, exactly up to
    # (sigmoid(a) + sigmoid(b)) / s, and autograd's few float64 steps (gamma_8 relative)
    tail = (1 / (1 + math.exp(-a)) + 1 / (1 + math.exp(-b))) / s
    assert_within(loc.grad.item(), -1 / s, gamma(8, torch.float64) / s + tail)
    assert torch.isfinite(log_scale.grad)


def test_discretized_logistic_sampling_matches_probabilities():
    torch.manual_seed(0)
    n = 200_000
    loc, log_scale = torch.full((n,), 0.9, dtype=torch.float64), torch.tensor(math.log(0.05), dtype=torch.float64)
    counts = torch.bincount(discretized_logistic_sample(loc, log_scale).long(), minlength=256).double()
    probs = discretized_logistic_logp(to_unit(torch.arange(256), torch.float64), loc[:1], log_scale).exp()
    # total variation between the empirical and exact pmf: ~ sqrt(bins with mass / n) for a correct sampler
    assert 0.5 * (counts / n - probs).abs().sum().item() < 0.01
    # the clamped edge; statistical: p ~ 0.13, one binomial standard error is 7.5e-4 at n = 200,000
    assert counts[255] > 0 and counts[255] / n == pytest.approx(probs[255].item(), abs=0.005)


def test_logistic_density_integrates_to_one():
    z = torch.linspace(-40, 40, 400_001, dtype=torch.float64)
    p = logistic_logp(z, torch.tensor(0.7, dtype=torch.float64), torch.tensor(1.3, dtype=torch.float64)).exp()
    # Quadrature, not only rounding: the 400,001-term float64 sum is within gamma_{4e5} ~ 4e-11 of its exact
    # value, the tails beyond +-40 hold ~1e-13, and the trapezoid rule on a smooth decaying density is
    # exponentially accurate: 1e-9 is that budget; a wrong normalization is off by >= 1e-3.
    assert torch.trapezoid(p, z).item() == pytest.approx(1.0, abs=1e-9)
    # pdf = sigmoid(y) sigmoid(-y) / s. Elementwise, <= 16 float64 roundings/libm calls per side; log-space
    # and argument roundings of size u |y| become relative errors after exp: gamma_16 (1 + 2 |y|) relative.
    # And F.softplus returns its input above 20, dropping log1p(e^-|y|) <= e^-|y| (twice in logistic_logp).
    y = (z - 0.7) / 1.3
    ref = torch.sigmoid(y) * torch.sigmoid(-y) / 1.3
    softplus_cut = torch.where(y.abs() > 20, 2.01 * (-y.abs()).exp(), 0.0)
    assert_within(p, ref, ref * (gamma(16, torch.float64) * (1 + 2 * y.abs()) + softplus_cut))


def test_likelihood_data_init_matches_residual_spread():
    torch.manual_seed(0)
    lik = DiscretizedLogistic().double()
    x = to_unit(images(64), torch.float64)
    loc = torch.zeros_like(x)
    data_dependent_init(lik, x, loc)
    logistic_std = lik.log_scale.exp().item() * math.pi / math.sqrt(3)
    # The init's mean of squares is the same reduction as the reference's (loc = 0); then sqrt, pi, log, exp
    # and back: <= 16 roundings/libm calls, exp amplifying log's by |log_scale|.
    ref = x.square().mean().sqrt().item()
    assert_within(logistic_std, ref, gamma(16, torch.float64) * (1 + abs(lik.log_scale.item())) * ref)


# ----------------------------------------------------------------------------------------- architecture
def test_paper_config_sizes_via_inspect_cli():
    out = subprocess.run(
        [sys.executable, "-m", "dbgen.inspect", "--config", str(PAPER), "--json"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=120,
    )
    report = json.loads(out.stdout)
    assert report["params"] == pytest.approx(56.15e6, rel=0.005)  # the paper's size, as it reports it (spec)
    assert report["binary_fraction"] >= 0.970
    # Binary: 8 proc layers of two 5x5 256->256 convs + 12 stochastic layers x (up + down) x two 3x3 convs.
    assert report["binary_params"] == 8 * 2 * 25 * 256**2 + 12 * 2 * 2 * 9 * 256**2 == 54_525_952
    assert report["packed_mb"] < 14 and report["fp32_mb"] > 200
    assert report["binary_layer_types"] == {"BinaryConv2d": 64}


def test_inspect_human_output_and_bad_config(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "dbgen.inspect", "--config", str(TINY["binary_act"])],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=60,
    )
    assert "binary fraction" in out.stdout and "1/1" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "dbgen.inspect", "--config", str(TINY["fp"]), "model.kernel=4"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert bad.returncode == 2 and "'model.kernel' = 4" in bad.stderr


def test_binary_layers_are_exactly_the_residual_convs():
    cfg = load_config(TINY["binary"]).model
    model = RVAE(cfg)
    residual = [m for m in model.modules() if isinstance(m, ResidualLayer)]
    assert len(residual) == 2 * cfg.num_proc_layers + 2 * cfg.num_stochastic
    expected = {id(c) for r in residual for c in (r.conv1, r.conv2)}
    found = binary_layers(model)
    assert {id(m) for _, m in found} == expected
    assert all(type(m) is BinaryConv2d for _, m in found)
    # Everything else that has weights is full precision: the first/last convs and the latent convs.
    fp = [m for m in model.modules() if isinstance(m, WeightNormLayer) and id(m) not in expected]
    assert all(not m.binary for m in fp)
    assert type(model.first_conv) is WNConv2d and type(model.last_conv) is WNConvTranspose2d
    for layer in model.layers:
        assert isinstance(layer, StochasticLayer)
        assert {type(layer.up_params), type(layer.down_params), type(layer.z_proj)} == {WNConv2d}
        assert layer.up_params.out_channels == 2 * cfg.zdim and layer.down_params.out_channels == 4 * cfg.zdim
    # Full-precision variant: the same layers, none binary.
    assert binary_layers(build(TINY["fp"])) == []


def test_residual_branches_start_as_identity_after_data_init():
    model = tiny("binary")
    data_dependent_init(model, images(16))
    x = torch.randn(2, 16, 16, 16, dtype=torch.float64)
    for m in model.modules():
        if isinstance(m, ResidualLayer):
            assert torch.all(m.conv2.gain == 0) and torch.all(m.conv2.bias == 0)
            assert torch.equal(m(x), x)  # zero weights and bias: the branch is exactly 0, and x + 0 = x


def test_binary_activations_see_only_signs():
    # With sign activations the branch depends on sign(x) only: scaling x by 3 leaves it unchanged.
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    one_one = ResidualLayer(8, 3, binary_weights=True, binary_activations=True).double()
    # The branch b is the same both times; (a + b) - a rounds twice: within gamma_2 (|a| + 2 |b|) of b, for
    # a = 3x and a = x.
    branch = one_one(x) - x
    bound = gamma(2, torch.float64) * (4 * x.abs() + 4 * branch.abs()) * 1.01
    assert_within(one_one(3 * x) - 3 * x, branch, bound)
    one_32 = ResidualLayer(8, 3, binary_weights=True, binary_activations=False).double()
    assert not torch.allclose(one_32(3 * x) - 3 * x, one_32(x) - x)


def test_packed_binary_model_gives_the_same_loss():
    # Only the signs of binary latents matter: a model restored from 1-bit packed state computes the same bound.
    model = tiny("binary")
    data_dependent_init(model, images(16))
    with torch.no_grad():  # move latents off the init values so restoring them as +-1 is a real change
        for _, m in binary_layers(model):
            m.weight.mul_(7.0)
    clamp_latents_(model)
    restored = tiny("binary")
    load_packed_state_dict(restored, packed_state_dict(model))
    x = images(8, seed=1)
    torch.manual_seed(3)
    a = model(x)
    torch.manual_seed(3)
    b = restored(x)
    assert torch.equal(a, b)  # the same BWN weights where(v >= 0, s, -s), same noise, same ops: identical


# ---------------------------------------------------------------------------------------------- bounds
def test_free_bits_clamps_batch_averaged_channel_kl():
    kl = torch.zeros(4, 3, 2, 2, dtype=torch.float64)
    kl[:, 0] = 0.5  # channel 0: 2.0 nats per example, above the floor
    kl[0, 1] = 0.04  # channel 1: 0.16 nats in one example -> 0.04 batch-averaged, below the floor
    assert free_bits_kl(kl, 0.1).item() == pytest.approx(2.0 + 0.1 + 0.1)
    assert free_bits_kl(kl, 0.0).item() == pytest.approx(2.0 + 0.04)


def test_iw_bound_with_one_sample_is_the_elbo_forward_computes():
    model = tiny("binary", kl_min=0.0)
    x = images(8)
    data_dependent_init(model, x)
    # Same noise: forward (no free bits) and the K=1 bound are the same function of it.
    torch.manual_seed(5)
    loss = model(x)
    torch.manual_seed(5)
    iw1 = model.log_likelihood_bpd(x, samples=1)
    assert iw1.shape == (8,)
    # The same per-example ELBOs (same noise); forward averages and scales to bits/dim in another order: a mean
    # of 8 and a few scalings, gamma_12 of the values (float64).
    assert_within(loss.item(), iw1.mean().item(), gamma(12, torch.float64) * iw1.abs().mean().item())
    # Independent noise: equal in expectation (within 4 standard errors of the difference of the means).
    fw = torch.stack([model(x).detach() for _ in range(24)])
    ll = torch.stack([model.log_likelihood_bpd(x, samples=1).mean() for _ in range(24)])
    se = math.sqrt((fw.var() + ll.var()).item() / 24)
    assert abs(fw.mean().item() - ll.mean().item()) < 4 * se + 1e-9
    # Free bits only ever raise the training loss above the true bound.
    with_free_bits = tiny("binary", kl_min=1000.0)  # above every channel's KL
    with_free_bits.load_state_dict(model.state_dict())
    torch.manual_seed(5)
    assert with_free_bits(x).item() > loss.item()
    torch.manual_seed(5)  # ... and never enter the reported bound: the same computation, identical
    assert torch.equal(with_free_bits.log_likelihood_bpd(x, samples=1), iw1)


def test_iw_bound_is_the_log_mean_exp_of_single_sample_weights():
    # The bottom-up pass draws no noise, so K samples consume the RNG exactly as K one-sample calls do.
    model = tiny("binary_act")
    x = images(4)
    data_dependent_init(model, x)
    torch.manual_seed(9)
    one = torch.stack([model.log_likelihood_bpd(x, samples=1) for _ in range(16)])  # (16, N) bits/dim
    torch.manual_seed(9)
    iw16 = model.log_likelihood_bpd(x, samples=16)
    nats_per_bit = model.dims * math.log(2)
    expected = -(torch.logsumexp(-one * nats_per_bit, dim=0) - math.log(16)) / nats_per_bit
    # nats <-> bits/dim scalings (a few roundings each way) and a 16-term logsumexp in another order: relative
    # to the log-weights' size, gamma_32 (|iw16| + max |one|) in float64.
    bound = gamma(32, torch.float64) * (expected.abs() + one.abs().amax(0))
    assert_within(iw16, expected, bound)
    assert torch.all(iw16 <= one.mean(dim=0) + bound)  # Jensen, per example (exact for these 16 draws)


def test_bf16_autocast_loss_close_to_fp32():
    model = tiny("binary", dtype=torch.float32)
    x = images(8)
    data_dependent_init(model, x)
    torch.manual_seed(0)
    ref = model(x)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    # A smoke check of autocast in the model, not a rounding bound: bf16 (u = 2^-8) convs move the loss; the
    # 1e-3 bits/dim product requirement at init is tests/test_step.py's, with the step's setup.
    assert low.item() == pytest.approx(ref.item(), abs=0.05)


def test_zero_temperature_sampling_is_deterministic():
    model = tiny("fp")
    data_dependent_init(model, images(16))
    torch.manual_seed(0)
    a = model.sample(3, temperature=0.0)
    torch.manual_seed(1)
    b = model.sample(3, temperature=0.0)
    assert torch.equal(a, b)
    torch.manual_seed(1)
    assert not torch.equal(model.sample(3), model.sample(3))


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda m: m(torch.zeros(2, 3, 32, 32)), r"uint8 images of shape \(N, 3, 32, 32\), got torch.float32"),
        (lambda m: m(torch.zeros(2, 3, 16, 16, dtype=torch.uint8)), r"got torch.uint8 \(2, 3, 16, 16\)"),
        (lambda m: m.log_likelihood_bpd(images(2), samples=0), "samples must be a positive int"),
        (lambda m: m.sample(0), "n must be a positive int"),
        (lambda m: m.sample(2, temperature=-1.0), "temperature must be >= 0"),
    ],
)
def test_bad_calls_raise_clear_errors(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(tiny("fp"))


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.image_size=31", "model.image_size"),
        ("model.kernel=2", "model.kernel"),
        ("model.width=0", "model.width"),
        ("model.num_stochastic=0", "model.num_stochastic"),
        ("model.kl_min=-1", "model.kl_min"),
    ],
)
def test_impossible_shapes_rejected_at_load(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(TINY["fp"], [override])
