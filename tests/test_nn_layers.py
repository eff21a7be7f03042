"""BWN / WN layers against the formula computed with torch.nn.functional."""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from bounds import (
    assert_within,
    conv2d_bound,
    gamma,
    linear_bound,
    magnitude,
    mean_bound,
    rounding_bound,
    std_rel_bound,
)
from torch import nn

import dbgen.nn as dnn


@pytest.fixture(autouse=True)
def float64_default():
    # float64 so the formula comparisons can use tight tolerances; restored so other test modules see float32.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def sign(t):
    return torch.where(t >= 0, 1.0, -1.0).to(t.dtype)


def conv_case(seed):
    g = torch.Generator().manual_seed(seed)
    cin, cout = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))
    k = int(torch.randint(1, 6, (1,), generator=g))
    stride = int(torch.randint(1, 3, (1,), generator=g))
    padding = int(torch.randint(0, k, (1,), generator=g))
    x = torch.randn(3, cin, 9, 11, generator=g)
    return cin, cout, k, stride, padding, x, g


def randomize(layer, g):
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
        layer.weight.view(-1)[0] = 0.0  # sign(0) must be +1
        layer.gain.copy_(torch.rand(layer.gain.shape, generator=g) + 0.1)
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))


@pytest.mark.parametrize("seed", range(6))
def test_binary_conv2d_matches_formula(seed):
    cin, cout, k, stride, padding, x, g = conv_case(seed)
    layer = dnn.BinaryConv2d(cin, cout, k, stride=stride, padding=padding)
    randomize(layer, g)
    n = cin * k * k
    assert layer.fan_in == n
    scale = layer.gain / math.sqrt(n)
    ref = F.conv2d(x, sign(layer.weight), None, stride, padding) * scale.view(1, -1, 1, 1)
    ref = ref + layer.bias.view(1, -1, 1, 1)
    # Both float64, n-term sums in different orders: the layer rounds gain * (1/sqrt(n)) (3 roundings) into
    # its weights, the formula rounds gain / sqrt(n) (2) and then scales and adds (2): gamma_{n+5} each.
    bound = conv2d_bound(x, sign(layer.weight), scale, layer.bias, stride, padding, roundings=5, dtype=torch.float64)
    y = layer(x)
    assert_within(y, ref, bound, "BinaryConv2d")
    if seed == 0:  # ... and the bound fails on one wrong weight sign (of the largest-scale channel)
        o = int(scale.argmax())
        flipped = sign(layer.weight).detach().clone()
        flipped[o].view(-1)[0] *= -1
        bad = F.conv2d(x, flipped, None, stride, padding) * scale.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
        with pytest.raises(AssertionError, match="rounding-error bound"):
            assert_within(y, bad, bound)


@pytest.mark.parametrize("seed", range(4))
def test_binary_conv_transpose2d_matches_formula(seed):
    cin, cout, k, stride, padding, x, g = conv_case(seed)
    layer = dnn.BinaryConvTranspose2d(cin, cout, k, stride=stride, padding=padding, output_padding=stride - 1)
    randomize(layer, g)
    n = cin * k * k  # weights feeding one output channel: (in, kh, kw)
    assert layer.weight.shape == (cin, cout, k, k) and layer.fan_in == n
    ref = F.conv_transpose2d(x, sign(layer.weight), None, stride, padding, stride - 1)
    scale = layer.gain / math.sqrt(n)
    ref = ref * scale.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
    # As for BinaryConv2d: at most n terms per output, 5 roundings besides the sum, both float64.
    mag = magnitude(
        lambda a, w: F.conv_transpose2d(a, w, None, stride, padding, stride - 1),
        x,
        sign(layer.weight),
        scale,
        layer.bias,
    )
    assert_within(layer(x), ref, rounding_bound(mag, n + 5, torch.float64, ref_dtype=torch.float64))


@pytest.mark.parametrize("seed", range(4))
def test_binary_linear_matches_formula(seed):
    g = torch.Generator().manual_seed(seed)
    fin, fout = 1 + seed * 7, 3 + seed
    layer = dnn.BinaryLinear(fin, fout)
    randomize(layer, g)
    x = torch.randn(5, fin, generator=g)
    ref = F.linear(x, sign(layer.weight)) * layer.gain / math.sqrt(fin) + layer.bias
    # As for BinaryConv2d: fin-term sums, 5 roundings besides, both float64.
    bound = linear_bound(
        x, sign(layer.weight), layer.gain / math.sqrt(fin), layer.bias, roundings=5, dtype=torch.float64
    )
    assert_within(layer(x), ref, bound)


def test_binary_conv2d_groups_fan_in_is_per_group():
    layer = dnn.BinaryConv2d(8, 4, 3, padding=1, groups=2, bias=False)
    x = torch.randn(2, 8, 5, 5)
    assert layer.fan_in == 4 * 9 and layer.bias is None
    ref = F.conv2d(x, sign(layer.weight), None, 1, 1, 1, 2) * (layer.gain / 6.0).view(1, -1, 1, 1)
    # 36-term sums per group (float64), the scale rounded into the weights vs applied after: gamma_{36+5}.
    bound = conv2d_bound(x, sign(layer.weight), layer.gain / 6.0, None, 1, 1, 2, roundings=5, dtype=torch.float64)
    assert_within(layer(x), ref, bound)


@pytest.mark.parametrize("cls", [dnn.WNConv2d, dnn.WNConvTranspose2d])
def test_wn_conv_matches_formula(cls):
    g = torch.Generator().manual_seed(1)
    layer = cls(4, 6, 3, stride=2, padding=1)
    randomize(layer, g)
    v = layer.weight
    dims = (1, 2, 3) if cls is dnn.WNConv2d else (0, 2, 3)
    shape = (-1, 1, 1, 1) if cls is dnn.WNConv2d else (1, -1, 1, 1)
    w = layer.gain.view(shape) * v / torch.linalg.vector_norm(v, dim=dims, keepdim=True)
    x = torch.randn(2, 4, 7, 7, generator=g)
    op = F.conv2d if cls is dnn.WNConv2d else F.conv_transpose2d
    # Weights g * v / ||v|| rounded twice on either side (other order, same norm), then float64 sums of at
    # most 36 terms plus the bias: gamma_{36+3} each.
    mag = magnitude(lambda a, ww: op(a, ww, None, 2, 1), x, w, None, layer.bias)
    assert_within(
        layer(x), op(x, w, layer.bias, 2, 1), rounding_bound(mag, 36 + 3, torch.float64, ref_dtype=torch.float64)
    )


def test_wn_linear_matches_formula():
    layer = dnn.WNLinear(5, 3)
    randomize(layer, torch.Generator().manual_seed(2))
    x = torch.randn(4, 5)
    w = layer.gain[:, None] * layer.weight / layer.weight.norm(dim=1, keepdim=True)
    # As for the WN convs: weights rounded twice either way, 5-term sums plus the bias, float64.
    assert_within(
        layer(x), F.linear(x, w, layer.bias), linear_bound(x, w, None, layer.bias, roundings=3, dtype=torch.float64)
    )


@pytest.mark.parametrize(
    "binary, fp",
    [
        (dnn.BinaryConv2d, dnn.WNConv2d),
        (dnn.BinaryConvTranspose2d, dnn.WNConvTranspose2d),
        (dnn.BinaryLinear, dnn.WNLinear),
    ],
)
def test_signatures_match_pytorch_and_twins(binary, fp):
    torch_cls = {
        dnn.BinaryConv2d: nn.Conv2d,
        dnn.BinaryConvTranspose2d: nn.ConvTranspose2d,
        dnn.BinaryLinear: nn.Linear,
    }[binary]
    ours = list(inspect.signature(binary.__init__).parameters)
    assert ours == list(inspect.signature(fp.__init__).parameters)
    theirs = [
        p for p in inspect.signature(torch_cls.__init__).parameters if p not in ("device", "dtype", "padding_mode")
    ]
    assert ours[: len(theirs)] == theirs
    assert ours[len(theirs) :] == ["init_scale"]


def test_output_depends_only_on_signs():
    g = torch.Generator().manual_seed(3)
    layer = dnn.BinaryConv2d(5, 7, 3, padding=1)
    randomize(layer, g)
    x = torch.randn(2, 5, 6, 6, generator=g)
    y = layer(x)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(layer.weight.shape, generator=g) * 10 + 1e-3)  # same signs
    assert torch.equal(layer(x), y)
    with torch.no_grad():
        layer.weight.view(-1)[5] *= -1
    assert not torch.equal(layer(x), y)


@pytest.mark.parametrize("cls", [dnn.BinaryConv2d, dnn.BinaryConvTranspose2d])
def test_straight_through_gradient(cls):
    g = torch.Generator().manual_seed(4)
    layer = cls(3, 4, 3, padding=1)
    randomize(layer, g)
    x = torch.randn(2, 3, 5, 5, generator=g)
    upstream = torch.randn(layer(x).shape, generator=g)
    (layer(x) * upstream).sum().backward()
    # Reference: the same loss as a function of W_eff = sign(v) * gain/sqrt(n), differentiated by autograd.
    scale = (layer.gain / math.sqrt(layer.fan_in)).detach()
    shape = (-1, 1, 1, 1) if cls is dnn.BinaryConv2d else (1, -1, 1, 1)
    w_eff = (sign(layer.weight.detach()) * scale.view(shape)).requires_grad_()
    op = F.conv2d if cls is dnn.BinaryConv2d else F.conv_transpose2d
    (op(x, w_eff, layer.bias.detach(), 1, 1) * upstream).sum().backward()
    # The weight gradient of the conv is the same op on the same (x, upstream) on both sides, so it is
    # identical; only the scale differs: gain * (1/sqrt(n)) vs gain / sqrt(n), 3 and 2 roundings, plus the
    # product's: gamma_4 + gamma_3 relative to the exact product, under gamma_8 of |ref|.
    ref = w_eff.grad * scale.view(shape)
    assert_within(layer.weight.grad, ref, gamma(8, torch.float64) * ref.abs())


def test_binary_activation_forward_and_clipped_gradient():
    x = torch.tensor([-2.0, -1.0, -0.5, -0.0, 0.0, 0.3, 1.0, 1.5], requires_grad=True)
    y = dnn.BinaryActivation()(x)
    assert y.tolist() == [-1, -1, -1, 1, 1, 1, 1, 1]
    up = torch.arange(1.0, 9.0)
    (y * up).sum().backward()
    assert x.grad.tolist() == [0, 2, 3, 4, 5, 6, 7, 0]


def test_clamp_touches_only_latents():
    model = nn.Sequential(dnn.BinaryConv2d(2, 3, 3), dnn.WNConv2d(3, 3, 1), nn.Conv2d(3, 3, 1), dnn.BinaryLinear(3, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0).add_(5.0)
    before = {n: p.clone() for n, p in model.named_parameters()}
    dnn.clamp_latents_(model)
    for n, p in model.named_parameters():
        if n in ("0.weight", "3.weight"):
            assert torch.equal(p, torch.ones_like(p)), n
        else:
            assert torch.equal(p, before[n]), n
    assert [n for n, _ in dnn.binary_layers(model)] == ["0", "3"]


def init_bounds(layer, x, y, dims):
    """Bounds on |mean(y)| and |std(y) - init_scale| over ``dims`` for ``y = layer(x)`` right after
    ``data_init(x)`` (float64), from the rounding of each step; no tolerance of its own.

    data_init computed z = op(x, d) (unit gain), gain = init_scale / std(z), bias = -mean(z) * gain, each with
    its rounding; y = op(x, d * gain) + bias differs from gain * z + bias by e <= 2 gamma_{K+2} (op(|x|, |d|)
    gain + |bias|) elementwise. Then mean(y) is gain times mean's error on z, plus u |bias|, mean(e) and the
    error of y's own mean; std(y) is init_scale times (1 + z's and y's relative std errors + 2 roundings), plus
    rms(e) (a population std moves by at most the rms of a perturbation).
    """
    with torch.no_grad():
        d, g, b = layer.direction(), layer.gain, layer.bias
        z = layer._op(x, d, None)
        e = 2 * rounding_bound(
            magnitude(lambda a, w: layer._op(a, w, None), x, d, g, b, layer._output_dim),
            layer.fan_in + 2,
            torch.float64,
            ref_dtype=None,
        )
        e_mean = e.mean(dims).view(-1)
        mean_b = g * mean_bound(z, dims) + gamma(1, torch.float64) * b.abs() + e_mean + mean_bound(y, dims)
        rel = std_rel_bound(z, dims) + std_rel_bound(y, dims) + gamma(2, torch.float64)
        std_b = 1.01 * (layer.init_scale * rel + e.square().mean(dims).sqrt())
    return mean_b, std_b


@pytest.mark.parametrize("cls", [dnn.BinaryConv2d, dnn.WNConv2d, dnn.BinaryLinear, dnn.WNLinear])
@pytest.mark.parametrize("init_scale", [1.0, 0.3])
def test_data_dependent_init_gives_mean0_std_init_scale(cls, init_scale):
    torch.manual_seed(5)
    conv = cls in (dnn.BinaryConv2d, dnn.WNConv2d)
    layer = cls(6, 5, 3, padding=1, init_scale=init_scale) if conv else cls(6, 5, init_scale=init_scale)
    x = torch.randn(64, 6, 8, 8) * 3 + 1 if conv else torch.randn(256, 6) * 3 + 1
    assert dnn.data_dependent_init(layer, x) == 1
    y = layer(x)
    dims = (0, 2, 3) if conv else (0,)
    mean_b, std_b = init_bounds(layer, x, y, dims)  # rounding of init and forward, M = 4096 / 256 values
    assert_within(y.mean(dims), torch.zeros(5), mean_b, "mean")
    assert_within(y.std(dims, unbiased=False), torch.full((5,), init_scale), std_b, "std")
    assert not layer._forward_hooks  # nothing left behind


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = dnn.BinaryConv2d(c, c, 3, padding=1)
        self.conv2 = dnn.BinaryConv2d(c, c, 3, padding=1, init_scale=0.0)

    def forward(self, x):
        return x + self.conv2(F.elu(self.conv1(F.elu(x))))


def test_init_scale_zero_makes_residual_branch_identity_and_init_is_sequential():
    torch.manual_seed(6)
    model = nn.Sequential(dnn.WNConv2d(3, 4, 3, padding=1), Residual(4), Residual(4))
    x = torch.randn(32, 3, 6, 6)
    assert dnn.data_dependent_init(model, x) == 5
    h = model[0](x)
    assert torch.equal(model(x), h)  # both branches exactly zero
    assert torch.equal(model[1].conv2.gain, torch.zeros(4)) and torch.equal(model[1].conv2.bias, torch.zeros(4))
    # conv1 of the second block was initialized on the output of the (identity) first block
    z = model[2].conv1(F.elu(h))
    _, std_b = init_bounds(model[2].conv1, F.elu(h), z, (0, 2, 3))  # z is what its init saw, re-evaluated
    assert_within(z.std((0, 2, 3), unbiased=False), torch.ones(4), std_b)


def test_data_dependent_init_removes_hooks_on_error():
    layer = dnn.BinaryConv2d(3, 3, 3)
    with pytest.raises(RuntimeError):
        dnn.data_dependent_init(layer, torch.randn(1, 5, 8, 8))  # wrong channel count
    assert not layer._forward_hooks
