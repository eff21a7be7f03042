"""Flow++: every flow layer and the whole model invert exactly and report the brute-force log-determinant;
the mixture-CDF inverse is accurate; the dequantization bound is the sum it claims to be; actnorm init;
which layers are binary; sizes of the paper configs."""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from bounds import assert_within, gamma, mean_bound, std_rel_bound, unit_roundoff
from torch.autograd.functional import jacobian

from dbgen.config import ConfigError, FlowPPConfig, load_config
from dbgen.models import build
from dbgen.models.flowpp import FlowPP
from dbgen.models.flows import (
    ActNorm,
    ContextNet,
    Coupling,
    DequantFlow,
    GatedResBlock,
    LogitPreprocess,
    MixLogisticTransform,
    Pointwise,
    Sigmoid,
    concat_elu,
    concat_sign,
    merge,
    mixlogistic_invlogitcdf,
    mixlogistic_logcdf_logsf,
    mixlogistic_logpdf,
    split,
    squeeze,
    unsqueeze,
)
from dbgen.nn import BinaryConv2d, WNConv2d, binary_layers, data_dependent_init, size_report

CONFIGS = Path(__file__).parents[1] / "configs"
# inverse(forward(x)) in float64. Not a rounding bound: the mixture-logistic inverse is a bisection to 1e-12
# (dbgen.models.flows.mixlogistic_invlogitcdf), amplified by the inverse layers' Lipschitz constants; the
# round trips land ~1e-12 off, float64 rounding is ~1e-14, and a wrong inverse is off by O(1).
TOL = 1e-5
# Log-determinants against brute force (slogdet of the autograd Jacobian), both in float64: the same number
# along two paths of ~10^2-10^3 float64 operations, ~1e-14 apart here. No short a-priori bound covers LU of an
# autograd Jacobian, so this is an identity check: 1e-7 is ~10^7 times what rounding does here, and far below
# a wrong term (a missing log-scale or dropped Jacobian block moves it by >= 1e-3).
LOGDET_TOL = dict(rtol=1e-7, atol=1e-7)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.cache
def paper_model(variant: str):
    """The CIFAR-10 paper model of a variant, built once per test session (read-only use)."""
    return build(CONFIGS / f"flowpp_cifar10_{variant}.yaml")


def brute_logdet(fn, x):
    """Per-example log |det J| of ``fn`` (batch -> batch) from the full autograd Jacobian; also checks that
    examples do not interact (cross-example blocks are zero)."""
    n, d = x.shape[0], x[0].numel()
    jac = jacobian(fn, x, vectorize=True).reshape(n, d, n, d)  # vectorized: one batched backward pass
    for i in range(n):
        for j in range(n):
            if i != j:
                assert jac[i, :, j, :].abs().max() == 0
    return torch.stack([torch.linalg.slogdet(jac[i, :, i, :])[1] for i in range(n)])


@torch.no_grad()
def jiggle_(module, scale=0.3, seed=0):
    """Move every parameter away from its init so no layer is (close to) the identity."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def tiny_cfg(**kw) -> FlowPPConfig:
    base = dict(
        image_size=4,
        hdim=6,
        blocks=1,
        mix_components=3,
        dropout=0.0,
        dequant_couplings=2,
        dequant_blocks=1,
        dequant_context_hdim=4,
        dequant_context_blocks=1,
    )
    return FlowPPConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------ volume preserving
@pytest.mark.parametrize("kind", ["stripe", "channel"])
def test_split_merge_are_exact_permutations(kind):
    x = torch.randn(2, 4, 6, 8)
    a, b = split(x, kind)
    if kind == "stripe":
        assert torch.equal(a, x[..., 0::2]) and torch.equal(b, x[..., 1::2])
    else:
        assert torch.equal(a, x[:, :2]) and torch.equal(b, x[:, 2:])
    assert torch.equal(merge(a, b, kind), x)
    with pytest.raises(ValueError, match="stripe' or 'channel"):
        split(x, "checkerboard")


def test_squeeze_is_space_to_depth_and_inverts():
    x = torch.randn(2, 3, 4, 6)
    y = squeeze(x)
    assert y.shape == (2, 12, 2, 3)
    # sub-pixel-major: channels 0-2 are the (0, 0) sub-pixels of R, G, B, then (0, 1), (1, 0), (1, 1)
    subpixels = [x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]]
    assert torch.equal(y, torch.cat(subpixels, dim=1))
    assert torch.equal(unsqueeze(y), x)


# ------------------------------------------------------------------------------- invertible layers
def _layer_cases():
    torch.manual_seed(0)
    an = ActNorm(3).double()
    jiggle_(an)
    pw = Pointwise(3, noise=0.5).double()
    mix_params = torch.randn(2, 3, 2 + 3 * 4, 2, 2, dtype=torch.float64)
    mix = MixLogisticTransform(4)
    return {
        "logit_preprocess": (
            LogitPreprocess(),
            lambda: torch.rand(2, 3, 2, 2, dtype=torch.float64) * 256,
            lambda m, x: m(x),
            lambda m, y: m.inverse(y),
        ),
        "sigmoid": (
            Sigmoid(),
            lambda: 3 * torch.randn(2, 3, 2, 2, dtype=torch.float64),
            lambda m, x: m(x),
            lambda m, y: m.inverse(y),
        ),
        "actnorm": (
            an,
            lambda: torch.randn(2, 3, 2, 2, dtype=torch.float64),
            lambda m, x: m(x),
            lambda m, y: m.inverse(y),
        ),
        "pointwise": (
            pw,
            lambda: torch.randn(2, 3, 2, 2, dtype=torch.float64),
            lambda m, x: m(x),
            lambda m, y: m.inverse(y),
        ),
        "mixlogistic": (
            mix,
            lambda: 3 * torch.randn(2, 3, 2, 2, dtype=torch.float64),
            lambda m, x: m(x, mix_params),
            lambda m, y: m.inverse(y, mix_params),
        ),
    }


@pytest.mark.parametrize("name", list(_layer_cases()))
def test_layer_inverts_and_logdet_matches_jacobian(name):
    module, make_x, fwd, inv = _layer_cases()[name]
    x = make_x()
    y, logdet = fwd(module, x)
    assert logdet.shape == (x.shape[0],)
    assert (inv(module, y) - x).abs().max() < TOL
    torch.testing.assert_close(logdet, brute_logdet(lambda t: fwd(module, t)[0], x), **LOGDET_TOL)


@pytest.mark.parametrize("kind, channels, context", [("stripe", 3, 0), ("channel", 6, 0), ("stripe", 3, 4)])
@pytest.mark.parametrize("binary_weights, binary_activations", [(False, False), (True, False), (True, True)])
def test_coupling_inverts_and_logdet_matches_jacobian(kind, channels, context, binary_weights, binary_activations):
    torch.manual_seed(1)
    c = Coupling(
        channels,
        kind,
        hdim=5,
        blocks=2,
        components=3,
        context_channels=context,
        binary_weights=binary_weights,
        binary_activations=binary_activations,
    ).double()
    x = torch.randn(2, channels, 2, 4, dtype=torch.float64)
    ctx = torch.randn(2, context, 2, 2, dtype=torch.float64) if context else None
    data_dependent_init(c, x, ctx)
    jiggle_(c)
    y, logdet = c(x, ctx)
    assert y.shape == x.shape
    assert (c.inverse(y, ctx) - x).abs().max() < TOL
    # Binary signs have straight-through (wrong) derivatives, but only in the conditioning path, i.e. in the
    # off-diagonal block of a triangular Jacobian, which the determinant ignores.
    torch.testing.assert_close(logdet, brute_logdet(lambda t: c(t, ctx)[0], x), **LOGDET_TOL)


def test_dequant_flow_inverts_and_logdet_matches_jacobian():
    torch.manual_seed(2)
    dq = DequantFlow(3, couplings=2, hdim=5, blocks=1, components=3, context_width=4, context_blocks=1).double()
    x = torch.randint(0, 256, (2, 3, 4, 4)).double()
    eps = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    data_dependent_init(dq, eps, x)
    jiggle_(dq)
    u, logdet = dq(eps, x)
    assert ((u > 0) & (u < 1)).all()
    assert (dq.inverse(u, x) - eps).abs().max() < TOL
    torch.testing.assert_close(logdet, brute_logdet(lambda t: dq(t, x)[0], eps), **LOGDET_TOL)
    # the noise depends on the image (through the context network)
    assert not torch.allclose(dq(eps, x)[0], dq(eps, 255 - x)[0])


# The main flow of configs/flowpp_imagenet64_*.yaml: three squeezes, 3 x S x S -> 192 x S/8 x S/8.
IMAGENET64_FLOW = ["squeeze"] + ["stripe"] * 4 + (["squeeze"] + ["channel"] * 2 + ["stripe"] * 2) * 2


@pytest.mark.parametrize(
    "flow, channels, size, latent, binary_weights, binary_activations",
    [
        (None, 3, 4, (12, 2, 2), False, False),  # the default (CIFAR-10) flow
        (None, 3, 4, (12, 2, 2), True, True),
        (IMAGENET64_FLOW, 1, 16, (64, 2, 2), False, False),  # ImageNet64's; one channel: a 256 x 256 Jacobian
    ],
)
def test_whole_main_flow_inverts_and_logdet_matches_jacobian(
    flow, channels, size, latent, binary_weights, binary_activations
):
    torch.manual_seed(3)
    structure = {} if flow is None else dict(flow=flow)
    cfg = tiny_cfg(
        channels=channels,
        image_size=size,
        binary_weights=binary_weights,
        binary_activations=binary_activations,
        **structure,
    )
    model = FlowPP(cfg).double()
    assert model.latent_shape == latent
    data_dependent_init(model, torch.randint(0, 256, (8, channels, size, size), dtype=torch.uint8))
    jiggle_(model, scale=0.1)
    x = torch.rand(1, channels, size, size, dtype=torch.float64) * 256  # one example: cross-example blocks are
    z, logdet = model.flow_forward(x)  # checked above
    assert z.shape == (1, *latent)
    assert (model.flow_inverse(z) - x).abs().max() < TOL
    torch.testing.assert_close(logdet, brute_logdet(lambda t: model.flow_forward(t)[0], x), **LOGDET_TOL)
    assert model.eval().sample(2).shape == (2, channels, size, size)


def test_stages_are_the_runs_of_couplings_of_the_flow():
    """Each run of same-split couplings is a stage named in flow order: the default flow has the parameter names
    of every checkpoint written before ``model.flow`` existed (stage1: 4 stripe, stage2: 2 channel, stage3: 3
    stripe); the ImageNet64 flow has five stages at 12x32x32, 48x16x16 (x2) and 192x8x8 (x2)."""

    def stages(model):
        return [
            (
                name,
                len(getattr(model, name)),
                getattr(model, name)[0].split,
                getattr(model, name)[0].norms[0].logscale.numel(),
            )
            for name in model.flow_steps
            if name != "squeeze"
        ]

    assert stages(FlowPP(tiny_cfg())) == [
        ("stage1", 4, "stripe", 3),
        ("stage2", 2, "channel", 6),
        ("stage3", 3, "stripe", 12),
    ]
    for preset in ("fp", "binary", "binary_act", "binary_tiny"):
        assert load_config(CONFIGS / f"flowpp_imagenet64_{preset}.yaml").model.flow == IMAGENET64_FLOW
    model = FlowPP(tiny_cfg(image_size=64, flow=IMAGENET64_FLOW))
    assert model.flow_steps == ["squeeze", "stage1", "squeeze", "stage2", "stage3", "squeeze", "stage4", "stage5"]
    assert stages(model) == [
        ("stage1", 4, "stripe", 12),
        ("stage2", 2, "channel", 24),
        ("stage3", 2, "stripe", 48),
        ("stage4", 2, "channel", 96),
        ("stage5", 2, "stripe", 192),
    ]
    assert model.latent_shape == (192, 8, 8)


class LegacyFlowPP(torch.nn.Module):
    """The model as it was before ``model.flow`` (its code, in short): fixed stage1 / stage2 / stage3."""

    def __init__(self, cfg: FlowPPConfig):
        super().__init__()
        c = cfg.channels
        common = dict(
            hdim=cfg.hdim,
            components=cfg.mix_components,
            binary_weights=cfg.binary_weights,
            binary_activations=cfg.binary_activations,
            dropout=cfg.dropout,
        )
        self.dequant = DequantFlow(
            c,
            couplings=cfg.dequant_couplings,
            blocks=cfg.dequant_blocks,
            context_width=cfg.dequant_context_hdim,
            context_blocks=cfg.dequant_context_blocks,
            **common,
        )
        self.preprocess = LogitPreprocess()
        self.stage1 = torch.nn.ModuleList(Coupling(c, "stripe", blocks=cfg.blocks, **common) for _ in range(4))
        self.stage2 = torch.nn.ModuleList(Coupling(4 * c, "channel", blocks=cfg.blocks, **common) for _ in range(2))
        self.stage3 = torch.nn.ModuleList(Coupling(4 * c, "stripe", blocks=cfg.blocks, **common) for _ in range(3))

    def loss(self, x_uint8):
        x = x_uint8.double()
        eps = torch.randn(x.shape, dtype=x.dtype)
        u, ld_q = self.dequant(eps, x)
        h, logdet = self.preprocess(x + u)
        for i, coupling in enumerate((*self.stage1, *self.stage2, *self.stage3)):
            h = squeeze(h) if i == 4 else h
            h, ld = coupling(h)
            logdet = logdet + ld
        normal = torch.distributions.Normal(0.0, 1.0)
        elbo = normal.log_prob(h).flatten(1).sum(1) + logdet - (normal.log_prob(eps).flatten(1).sum(1) - ld_q)
        return -elbo.mean() / (x[0].numel() * math.log(2))


def test_a_state_dict_saved_with_the_old_names_loads_and_gives_the_same_loss(tmp_path):
    torch.manual_seed(16)
    cfg = tiny_cfg(image_size=8)
    legacy = LegacyFlowPP(cfg).double()
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    data_dependent_init(legacy, x, forward=legacy.loss)
    jiggle_(legacy, scale=0.1)
    torch.save(legacy.state_dict(), tmp_path / "old.pt")
    model = FlowPP(cfg).double()
    model.load_state_dict(torch.load(tmp_path / "old.pt", weights_only=True))  # strict: the same names and shapes
    torch.manual_seed(17)
    old = legacy.loss(x)
    torch.manual_seed(17)
    # the same operations in the same order on the same float64 values: equal, not close
    assert torch.equal(model(x), old)


def test_full_size_model_inverts_in_float64_and_float32():
    torch.manual_seed(4)
    model = build(CONFIGS / "flowpp_binary_act_tiny.yaml")
    data_dependent_init(model, torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8))
    x = torch.rand(2, 3, 32, 32) * 256
    with torch.no_grad():
        err32 = (model.flow_inverse(model.flow_forward(x)[0]) - x).abs().max()
        model.double()
        x64 = x.double()
        err64 = (model.flow_inverse(model.flow_forward(x64)[0]) - x64).abs().max()
    assert err64 < TOL
    # A modelling tolerance, in pixel units (x in [0, 256)): sampling floors to integers, so a round trip within
    # 1e-2 of a pixel is all fp32 needs (fp32 spacing near 256 is 3e-5; the bisection stops at 1e-6).
    assert err32 < 1e-2


# ------------------------------------------------------------------------------- mixture CDF
def test_mixture_cdf_pdf_and_inverse():
    torch.manual_seed(5)
    shape = (4, 3, 5, 6, 6)  # (N, C, K, H, W)
    logits, means, logscales = torch.randn(shape).double(), 3 * torch.randn(shape).double(), torch.randn(shape).double()
    x = 5 * torch.randn(4, 3, 6, 6, dtype=torch.float64)
    logcdf, logsf = mixlogistic_logcdf_logsf(x, logits, means, logscales, dim=2)
    pi = torch.softmax(logits, dim=2)
    cdf = (pi * torch.sigmoid((x.unsqueeze(2) - means) / logscales.exp())).sum(2)
    # First-order float64 bounds: each side is <= 32 roundings or libm calls (each <= 2u) along any path
    # (softmax, z = (x - mean) / scale, (log)sigmoid or softplus, a 5-term logsumexp or sum, exp); an error
    # u |l| in log space is a relative error after exp, and z's relative rounding moves sigmoid(z) by <= |z| u
    # relative. So gamma_32 (1 + |log value| + max_k |z_k|) relative; 1 - cdf also carries cdf's error.
    zmax = ((x.unsqueeze(2) - means) * torch.exp(-logscales)).abs().amax(2)
    g32 = gamma(32, torch.float64)
    assert_within(logcdf.exp(), cdf, g32 * cdf * (1 + logcdf.abs() + zmax), "cdf")
    assert_within(logsf.exp(), 1 - cdf, g32 * ((1 - cdf) * (1 + logsf.abs() + zmax) + cdf * (1 + zmax)), "sf")
    # the density is the derivative of the CDF (same first-order bound: autograd's path has the same kinds of steps)
    xg = x.clone().requires_grad_()
    dcdf = torch.autograd.grad(mixlogistic_logcdf_logsf(xg, logits, means, logscales, 2)[0].exp().sum(), xg)[0]
    logpdf = mixlogistic_logpdf(x, logits, means, logscales, 2)
    assert_within(logpdf.exp(), dcdf, g32 * logpdf.exp() * (1 + logpdf.abs() + zmax), "pdf")

    # inverse: logit targets from the far tails (F ~ 1e-13) to the middle
    t = torch.linspace(-30, 30, 4 * 3 * 6 * 6, dtype=torch.float64).reshape(4, 3, 6, 6)
    xi = mixlogistic_invlogitcdf(t, logits, means, logscales, dim=2)
    lc, ls = mixlogistic_logcdf_logsf(xi, logits, means, logscales, 2)
    pdf = mixlogistic_logpdf(xi, logits, means, logscales, 2).exp()
    # error in x from the residual in logit space: dx = dt / (d logit F / dx) = dt * F (1 - F) / f
    dx = ((lc - ls) - t).abs() * (lc + ls).exp() / pdf
    # Solver tolerances, not rounding bounds: the bisection stops within 1e-12 of the root in float64 (its
    # default tol); 1e-10 / 1e-9 leave room for evaluating the residual, a non-converged solve is far off.
    assert dx.max() < 1e-10
    # and round trip x -> t -> x
    logcdf, logsf = mixlogistic_logcdf_logsf(x, logits, means, logscales, 2)
    assert (mixlogistic_invlogitcdf(logcdf - logsf, logits, means, logscales, 2) - x).abs().max() < 1e-9
    # float32: bounded by float spacing, not by the iteration cap (|x| <= 20: fp32 spacing ~2e-6, flat tails
    # of F amplify it; 1e-3 is the float32 solver's spec here, an iteration-capped solve is off by far more)
    x32 = mixlogistic_invlogitcdf((logcdf - logsf).float(), logits.float(), means.float(), logscales.float(), 2)
    assert (x32.double() - x).abs().max() < 1e-3


# ------------------------------------------------------------------------------------------- bound
def test_bound_is_log_p_minus_log_q_by_brute_force():
    """The loss is -(log p(x + u) - log q(u|x)) / (D ln 2) with both terms from brute-force Jacobians."""
    torch.manual_seed(6)
    model = FlowPP(tiny_cfg()).double()
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    data_dependent_init(model, x)
    jiggle_(model, scale=0.1)
    torch.manual_seed(7)
    elbo = model.elbo_nats(x)
    torch.manual_seed(7)
    xf = x.double()
    eps = torch.randn_like(xf)  # the same draw elbo_nats made
    u, _ = model.dequant(eps, xf)
    assert ((u > 0) & (u < 1)).all() and torch.equal((xf + u).floor(), xf)
    normal = torch.distributions.Normal(0.0, 1.0)
    log_q = normal.log_prob(eps).flatten(1).sum(1) - brute_logdet(lambda t: model.dequant(t, xf)[0], eps)
    z, _ = model.flow_forward(xf + u)
    log_p = normal.log_prob(z).flatten(1).sum(1) + brute_logdet(lambda t: model.flow_forward(t)[0], xf + u)
    # float64 identity checks as LOGDET_TOL's (the same numbers along two paths, ~1e-13 apart here; a wrong
    # term of the bound is >= 1e-3 nats), tighter because these sums of 48 log-densities are well conditioned.
    torch.testing.assert_close(elbo, log_p - log_q, rtol=1e-9, atol=1e-8)
    torch.manual_seed(7)
    torch.testing.assert_close(model(x), -(log_p - log_q).mean() / (48 * math.log(2)), rtol=1e-9, atol=1e-9)
    torch.manual_seed(7)
    torch.testing.assert_close(
        model.log_likelihood_bpd(x, samples=1), -(log_p - log_q) / (48 * math.log(2)), rtol=1e-9, atol=1e-9
    )


def test_importance_weighting_tightens_the_bound():
    torch.manual_seed(8)
    model = build(CONFIGS / "flowpp_fp_tiny.yaml").eval()
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    data_dependent_init(model, x)
    jiggle_(model, scale=0.05)  # an untrained q is close to p's posterior; make them differ
    k1 = torch.stack([model.log_likelihood_bpd(x, samples=1) for _ in range(8)]).mean(0)
    k16 = model.log_likelihood_bpd(x, samples=16)
    assert k16.shape == (4,)
    assert (k16 <= k1 + 1e-4).all()  # statistical: Jensen holds in expectation, k1 averages only 8 draws
    with pytest.raises(ValueError, match="samples must be >= 1"):
        model.log_likelihood_bpd(x, samples=0)


def test_input_checks():
    model = FlowPP(tiny_cfg())
    with pytest.raises(TypeError, match="uint8"):
        model(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"shape \(N, 3, 4, 4\)"):
        model(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


# ------------------------------------------------------------------------------------------- init
def test_actnorm_data_init_gives_unit_channels():
    torch.manual_seed(9)
    x = 3 + 5 * torch.randn(16, 4, 5, 5) * torch.tensor([1.0, 2.0, 0.1, 10.0]).view(1, 4, 1, 1)
    an = ActNorm(4)
    assert data_dependent_init(an, x) == 1
    y, logdet = an(x)
    # Bounds from the fp32 rounding of init and forward (M = 400 values per channel; libm exp/log <= 2u):
    # s = exp(logscale), bias = -mean(x) s. y = x s + bias within e = gamma_2 (|x| s + |bias|), so |mean(y)| <=
    # s * mean's error on x + u |bias| + mean(e) + y's own mean error; std(y) = s std(x) +- rms(e) with
    # s std(x) = 1 up to exp(-log(std)) (gamma_4 (1 + |logscale|)) and x's and y's relative std errors.
    dims, f32 = (0, 2, 3), torch.float32
    s, b = an.logscale.detach().double().exp().view(1, -1, 1, 1), an.bias.detach().double().view(1, -1, 1, 1)
    e = gamma(2, f32) * (x.double().abs() * s + b.abs())
    mean_b = (
        s.view(-1) * mean_bound(x, dims) + unit_roundoff(f32) * b.abs().view(-1) + e.mean(dims) + mean_bound(y, dims)
    )
    rel = gamma(4, f32) * (1 + an.logscale.detach().double().abs()) + std_rel_bound(x, dims) + std_rel_bound(y, dims)
    assert_within(y.mean(dim=dims), torch.zeros(4), mean_b, "mean")
    assert_within(y.std(dim=dims, unbiased=False), torch.ones(4), 1.01 * (rel + e.square().mean(dims).sqrt()), "std")
    # inverse: (y - bias) * exp(-logscale) = x (1 + theta) + (bias / s) delta, <= 10 roundings/libm ulps.
    assert_within(an.inverse(y), x, gamma(10, f32) * (x.double().abs() + b.abs() / s), "inverse")


def test_model_data_init_normalizes_every_actnorm_in_place():
    """Inside the model each actnorm is initialized on the input it actually receives (forward order)."""
    torch.manual_seed(10)
    model = build(CONFIGS / "flowpp_fp_tiny.yaml")
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    seen = []
    norms = [m for m in model.modules() if isinstance(m, ActNorm)]
    assert len(norms) == 2 * (9 + 4)
    n_init = data_dependent_init(model, x)
    assert n_init == len(norms) + sum(isinstance(m, WNConv2d | BinaryConv2d) for m in model.modules())
    hooks = [m.register_forward_hook(lambda m, a, out: seen.append(out[0])) for m in norms]
    torch.manual_seed(11)  # same dequantization noise as... any: the statistics are of this pass
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    # The first actnorm of each flow sees the same distribution as at init (only the noise draw differs).
    for y in (seen[0], seen[8]):  # dequant flow's first coupling, main flow's first coupling
        # statistical, not rounding: another noise draw on 32 images (0.05 is several standard errors)
        assert y.mean(dim=(0, 2, 3)).abs().max() < 0.05
        assert (y.std(dim=(0, 2, 3)) - 1).abs().max() < 0.05


# ------------------------------------------------------------------------------------- binary layers
def _role(name: str) -> str:
    return name.rsplit(".", 1)[-1]


@pytest.mark.parametrize("variant", ["fp", "binary", "binary_act"])
def test_binary_layers_are_exactly_the_residual_block_convs(variant):
    cfg = load_config(CONFIGS / f"flowpp_{variant}_tiny.yaml").model
    model = build(cfg)
    binary = binary_layers(model)
    if variant == "fp":
        assert binary == []
    else:
        # every binary layer is a 3x3 conv, 1x1 gate or 1x1 context projection of a coupling's gated block
        for name, m in binary:
            assert type(m) is BinaryConv2d
            assert ".cond.blocks." in name and _role(name) in ("conv", "gate", "context_proj"), name
            assert m.kernel_size == ((3, 3) if _role(name) == "conv" else (1, 1))
        main = 9 * cfg.blocks * 2
        dequant = cfg.dequant_couplings * cfg.dequant_blocks * 3
        assert len(binary) == main + dequant
    # everything else that convolves is full precision weight-norm: proj_in / proj_out and the context net
    fp_convs = [(n, m) for n, m in model.named_modules() if type(m) is WNConv2d]
    for name, _ in fp_convs:
        in_block = ".cond.blocks." in name
        assert not (in_block and variant != "fp"), name
        assert in_block or _role(name) in ("proj_in", "proj_out", "proj") or "dequant.context." in name, name
    # the context network is always full precision with concat-ELU
    ctx = model.dequant.context
    assert isinstance(ctx, ContextNet) and not binary_layers(ctx)
    assert all(b.act is concat_elu for b in ctx.blocks)
    coupling_blocks = [m for n, m in model.named_modules() if isinstance(m, GatedResBlock) and ".cond." in n]
    assert all(b.act is (concat_sign if variant == "binary_act" else concat_elu) for b in coupling_blocks)


def test_dropout_only_in_full_precision():
    def dropouts(variant):
        return {m.p for m in paper_model(variant).modules() if isinstance(m, torch.nn.Dropout)}

    assert dropouts("fp") == {0.2}
    assert dropouts("binary") == {0.0}
    assert dropouts("binary_act") == {0.0}


def test_concat_sign_is_two_threshold_planes():
    x = torch.tensor([-2.0, -0.5, -0.2, 0.0, 0.3, 0.5, 1.5]).view(1, 7, 1, 1)
    y = concat_sign(x).view(2, 7)
    assert y.abs().eq(1).all()
    # plane 0: sign(x - 0.5), plane 1: sign(x + 0.5), sign(0) = +1
    assert y[0].tolist() == [-1, -1, -1, -1, -1, 1, 1]
    assert y[1].tolist() == [-1, 1, 1, 1, 1, 1, 1]


def test_variants_have_identical_parameters():
    for make in (lambda v: build(CONFIGS / f"flowpp_{v}_tiny.yaml"), paper_model):
        shapes = [{n: tuple(p.shape) for n, p in make(v).named_parameters()} for v in ("fp", "binary", "binary_act")]
        assert shapes[0] == shapes[1] == shapes[2]


def test_paper_config_sizes():
    for v in ("binary", "binary_act"):
        report = size_report(paper_model(v))
        assert abs(report["params"] - 33.6e6) <= 0.03 * 33.6e6
        assert report["params"] == 33_479_920 and report["binary_params"] == 31_107_840
        assert report["binary_fraction"] >= 0.90
    for path in CONFIGS.glob("flowpp_*_tiny.yaml"):
        # the 64x64 tiny model has 473k: the 192-channel pointwise layers and proj_outs of its 8x8 stages
        assert 2_000 <= size_report(build(path))["params"] <= 500_000


def test_imagenet_configs_match_cifar_architecture():
    for v in ("fp", "binary", "binary_act"):
        a, b = load_config(CONFIGS / f"flowpp_cifar10_{v}.yaml"), load_config(CONFIGS / f"flowpp_imagenet32_{v}.yaml")
        assert a.model == b.model
        assert b.data.train.startswith("data/imagenet32")


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.image_size=30", "model.image_size"),
        ("model.mix_components=0", "model.mix_components"),
        ("model.dropout=1.0", "model.dropout"),
        ("model.hdmi=3", "model.hdmi"),
        ("model.blocks=two", "model.blocks"),
    ],
)
def test_bad_configs_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(CONFIGS / "flowpp_fp_tiny.yaml", [override])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.flow=[stripe, checkerboard]"],
            "'model.flow[1]' = 'checkerboard': expected one of 'stripe', 'channel'",
        ),
        (["model.flow=[squeeze, squeeze]"], "'model.flow' = ['squeeze', 'squeeze']: expected at least one 'stripe' or"),
        (["model.flow=[]"], "'model.flow' = []: expected at least one 'stripe' or 'channel' coupling"),
        (["model.flow=[stripe, channel]"], "expected an even channel count at each 'channel' step (step 1 splits 3"),
        (["model.channels=4", "model.flow=[channel, squeeze, channel]"], None),  # 4 channels split: fine
        # three squeezes and a stripe split after them: 8 -> 4 -> 2 -> 1 column, not splittable
        (["model.image_size=8", f"model.flow={IMAGENET64_FLOW}"], "'model.image_size' = 8: expected a multiple of 16"),
        (["model.image_size=6", "model.flow=[stripe]"], None),  # no squeeze: any even size
        (["model.image_size=6", "model.flow=[stripe, squeeze]"], None),  # 6 -> 3x3: a squeeze needs only even
        (["model.image_size=6", "model.flow=[squeeze, stripe]"], "'model.image_size' = 6: expected a multiple of 4"),
    ],
)
def test_flow_structure_is_checked_at_load_time(overrides, message):
    if message is None:
        load_config(CONFIGS / "flowpp_fp_tiny.yaml", overrides)
        return
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(CONFIGS / "flowpp_fp_tiny.yaml", overrides)
    with pytest.raises(ConfigError, match="model.flow|model.image_size"):  # and when built in code
        FlowPPConfig(**{o.split("=")[0].removeprefix("model."): yaml.safe_load(o.split("=")[1]) for o in overrides})


# ------------------------------------------------------------------------------------------- sampling
def test_sample_shape_range_determinism_and_temperature():
    torch.manual_seed(12)
    model = build(CONFIGS / "flowpp_binary_tiny.yaml").eval()
    data_dependent_init(model, torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8))
    torch.manual_seed(13)
    a = model.sample(3)
    torch.manual_seed(13)
    b = model.sample(3)
    assert a.dtype == torch.uint8 and a.shape == (3, 3, 32, 32) and torch.equal(a, b)
    cold = model.sample(2, temperature=0.0)  # z = 0: the same image twice
    assert torch.equal(cold[0], cold[1])


def test_bf16_autocast_runs_only_the_conditioning_networks_in_bf16():
    """Under autocast the flow path (actnorm, pointwise, mixture CDF, log-dets) stays fp32."""
    torch.manual_seed(14)
    model = build(CONFIGS / "flowpp_binary_tiny.yaml")
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    data_dependent_init(model, x)
    xc = torch.rand(2, 3, 32, 32) * 256
    with torch.no_grad():
        z32, ld32 = model.flow_forward(xc)
        torch.manual_seed(15)
        loss32 = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z, ld = model.flow_forward(xc)
            torch.manual_seed(15)
            loss = model(x)
    assert z.dtype == ld.dtype == loss.dtype == torch.float32
    # Modelling thresholds: the bf16 conditioning networks (u = 2^-8 = 3.9e-3) move the coupling parameters,
    # so log-dets and loss differ; a flow path run in bf16 would put the log-dets ~2^-8 relative off, 40x this
    # 1e-4, and the loss within 1e-2 bits/dim is the bf16 forward's budget (the step's spec is 1e-3 at init).
    assert ((ld - ld32).abs() / ld32.abs()).max() < 1e-4
    assert (loss - loss32).abs() < 1e-2
