"""dbgen.kernels on CPU: bit layouts, the exact reference vs F.conv2d / F.linear, and packed execution of models.

The reference is what dbgen.kernels runs without CUDA; the GPU kernels are compared against it in
tests/test_kernels_gpu.py. Every binary shape of the models (dbgen/config.py defaults) is covered, plus odd
channel counts, strides and paddings.
"""

import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from bounds import assert_within, conv2d_bound, gamma, linear_bound, stack_bound
from torch import nn

import dbgen.kernels as K
import dbgen.nn as dnn
from dbgen.kernels.packing import PackedWeight, pack_bits_lastdim, popcount32, unpack_bits_lastdim
from dbgen.kernels.reference import and_popcount_matmul
from dbgen.models import build

ROOT = Path(__file__).resolve().parents[1]


def sign(t):
    return torch.where(t >= 0, 1.0, -1.0).to(t.dtype)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ layouts
def test_word_packing_round_trip_and_popcount():
    g = gen(0)
    bits = torch.rand(5, 3, 77, generator=g) > 0.5
    words = pack_bits_lastdim(bits)
    assert words.dtype == torch.int32 and words.shape == (5, 3, 3)
    assert torch.equal(unpack_bits_lastdim(words, 77), bits)
    assert torch.equal(popcount32(words).sum(-1), bits.sum(-1))
    # Padding bits of the last word are zero: 77 = 2*32 + 13 -> bits 13..31 of word 2 clear.
    assert int((words[..., 2].to(torch.int64) & 0xFFFFFFFF).max()) < 2**13
    # Bit 31 set -> a negative int32, still counted once.
    w = torch.tensor([-1, -(2**31), 1, 0], dtype=torch.int32)
    assert popcount32(w).tolist() == [32, 1, 1, 0]


def test_and_popcount_matmul_matches_bitwise_definition():
    g = gen(1)
    a = torch.randint(-(2**31), 2**31 - 1, (9, 5), generator=g, dtype=torch.int64).to(torch.int32)
    b = torch.randint(-(2**31), 2**31 - 1, (4, 5), generator=g, dtype=torch.int64).to(torch.int32)
    got = and_popcount_matmul(a, b)
    ab = unpack_bits_lastdim(a, 160).float()  # (9, 160)
    bb = unpack_bits_lastdim(b, 160).float()
    assert torch.equal(got, (ab @ bb.t()).long())


def test_activation_layout_is_pack_signs_of_nhwc():
    x = torch.randn(2, 64, 3, 5, generator=gen(2))
    pa = K.pack_activations(x)
    assert pa.words.shape == (2, 3, 5, 2) and pa.channels == 64
    nhwc_bytes = dnn.pack_signs(x.permute(0, 2, 3, 1).contiguous())
    assert torch.equal(nhwc_bytes.view(torch.int32).view(2, 3, 5, 2), pa.words)
    assert torch.equal(pa.unpack(), sign(x))
    lin = K.pack_activations(torch.randn(4, 6, 70, generator=gen(3)))
    assert lin.words.shape == (4, 6, 3) and lin.unpack().shape == (4, 6, 70)


def test_activation_sign_conventions():
    x = torch.tensor([0.0, -0.0, -1e-30, 1e-30, -3.0, float("nan")]).view(1, 6)
    assert K.pack_activations(x).unpack().tolist() == [[1, 1, -1, 1, -1, -1]]  # as pack_signs: NaN -> -1


@pytest.mark.parametrize("shape", [(7, 5, 3, 3), (256, 256, 3, 3), (120, 240, 1, 1), (3, 33, 5, 5), (9, 70)])
def test_weight_conversion_from_and_to_pack_signs(shape):
    w = torch.randn(shape, generator=gen(4))
    pw = PackedWeight.from_pack_signs(dnn.pack_signs(w), shape)
    assert torch.equal(pw.words, PackedWeight.from_signs(w).words)
    assert pw.words.shape[1] % 8 == 0 and pw.words.shape[1] >= pw.taps * pw.channel_words
    assert torch.equal(pw.signs(), sign(w))
    assert torch.equal(pw.to_pack_signs(), dnn.pack_signs(w))
    # tap_corr = C - 2 * (#+1 weights of the tap) = -(sum of the +-1 weights of the tap)
    s4 = sign(w).reshape(shape[0], shape[1], -1)
    assert torch.equal(pw.tap_corr.long(), -s4.sum(1).long())


# ------------------------------------------------------------------------- fully binary conv / linear
# (N, C_in, C_out, H, W, k, stride, padding): every binary conv of the models at their default sizes, then odd
# channel counts (not multiples of 32/64), strides, paddings and non-square images.
CONV_CASES = [
    (1, 256, 256, 16, 16, 3, 1, 1),  # RVAE stochastic-layer residual conv
    (1, 256, 256, 16, 16, 5, 1, 2),  # RVAE pre/post-processing residual conv
    (2, 240, 120, 16, 8, 3, 1, 1),  # Flow++ gated block conv (concat act: 2*hdim -> hdim)
    (2, 240, 240, 16, 8, 1, 1, 0),  # Flow++ 1x1 gate conv (2*hdim -> 2*hdim, GLU)
    (2, 64, 32, 16, 8, 3, 1, 1),  # Flow++ dequantization blocks (hdim 32)
    (2, 64, 64, 16, 8, 1, 1, 0),
    (2, 37, 45, 9, 7, 5, 1, 2),
    (2, 33, 17, 11, 10, 3, 2, 1),
    (3, 1, 5, 6, 6, 3, 1, 1),
    (2, 65, 31, 7, 9, 5, 2, 2),
    (1, 96, 40, 5, 5, 3, 1, 0),
    (1, 20, 24, 4, 6, 3, 1, 3),  # padding beyond the kernel radius: whole rows of padded taps
    (2, 100, 3, 8, 8, 5, 2, 2),  # stride 2, 5x5 (the RVAE's full-precision down/up sampling geometry)
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c)))
def test_binary_conv2d_exact_vs_conv2d(case):
    n, c, o, h, w, k, s, p = case
    g = gen(sum(case))
    x = torch.randn(n, c, h, w, generator=g)
    wt = torch.randn(o, c, k, k, generator=g)
    pw = PackedWeight.from_signs(wt)
    expected = F.conv2d(sign(x).double(), sign(wt).double(), stride=s, padding=p)
    # Integer part: exact (float32 holds these integers exactly).
    dot = K.binary_act_conv2d(x, pw, stride=s, padding=p)
    assert dot.dtype == torch.float32 and torch.equal(dot.double(), expected)
    # From packed activations: the same numbers.
    assert torch.equal(K.binary_act_conv2d(K.pack_activations(x), pw, stride=s, padding=p), dot)
    # Scale and bias epilogue vs the float64 conv with the scaled weight. The dot is exact, so y = fl(fl(dot *
    # scale) + bias) is off by gamma_2 (|dot| scale + |bias|) at most; the reference by gamma_{K+2} in float64.
    scale, bias = torch.rand(o, generator=g) + 0.1, torch.randn(o, generator=g)
    y = K.binary_act_conv2d(x, pw, scale, bias, s, p)
    assert y.dtype == torch.float32
    ref = F.conv2d(sign(x).double(), sign(wt).double() * scale.double().view(-1, 1, 1, 1), bias.double(), s, p)
    assert_within(y, ref, conv2d_bound(sign(x), sign(wt), scale, bias, s, p, exact_sum=True), "epilogue")
    # Fused sign packing of the output = packing the float output.
    packed = K.binary_act_conv2d(x, pw, scale, bias, s, p, pack_output=True)
    assert packed.channels == o and torch.equal(packed.words, K.pack_activations(y).words)
    # Lower-precision outputs are the float32 result rounded once.
    y16 = K.binary_act_conv2d(x, pw, scale, bias, s, p, out_dtype=torch.bfloat16)
    assert torch.equal(y16, y.to(torch.bfloat16))


@pytest.mark.parametrize("lead,c,o", [((5,), 256, 256), ((2, 3), 70, 33), ((4,), 1, 7), ((1,), 240, 240)])
def test_binary_linear_exact_vs_linear(lead, c, o):
    g = gen(c + o)
    x = torch.randn(*lead, c, generator=g)
    wt = torch.randn(o, c, generator=g)
    pw = PackedWeight.from_signs(wt)
    dot = K.binary_act_linear(x, pw)
    assert dot.shape == (*lead, o)
    assert torch.equal(dot.double(), F.linear(sign(x).double(), sign(wt).double()))
    scale, bias = torch.rand(o, generator=g), torch.randn(o, generator=g)
    y = K.binary_act_linear(x, pw, scale, bias)
    # Exact dot, then the two epilogue roundings (as in the conv test); the reference in float64.
    ref = F.linear(sign(x).double(), sign(wt).double() * scale.double()[:, None], bias.double())
    assert y.dtype == torch.float32
    assert_within(y, ref, linear_bound(sign(x), sign(wt), scale, bias, exact_sum=True), "epilogue")
    packed = K.binary_act_linear(K.pack_activations(x), pw, scale, bias, pack_output=True)
    assert torch.equal(packed.words, K.pack_activations(y).words)


# --------------------------------------------------------------------- packed weights x float activations
@pytest.mark.parametrize("case", CONV_CASES[:3] + CONV_CASES[6:9], ids=lambda c: "x".join(map(str, c)))
def test_packed_weight_conv2d_vs_conv2d(case):
    n, c, o, h, w, k, s, p = case
    g = gen(sum(case) + 1)
    x = torch.randn(n, c, h, w, generator=g)
    wt = torch.randn(o, c, k, k, generator=g)
    scale, bias = torch.rand(o, generator=g), torch.randn(o, generator=g)
    pw = PackedWeight.from_signs(wt)
    y = K.packed_weight_conv2d(x, pw, scale, bias, s, p)
    ref = F.conv2d(x.double(), sign(wt).double() * scale.double().view(-1, 1, 1, 1), bias.double(), s, p)
    # An fp32 sum of K = C*k*k products (any order, any vector width), then * scale and + bias: gamma_{K+2}
    # times conv(|x|, 1) * scale + |bias| (the fixed atol=1e-4 failed on a wider-vector CPU for K = 2,304).
    assert_within(y, ref, conv2d_bound(x, sign(wt), scale, bias, s, p), "fp32")
    yb = K.packed_weight_conv2d(x.bfloat16(), pw, scale, bias, s, p)
    assert yb.dtype == torch.bfloat16
    ref_b = F.conv2d(x.bfloat16().double(), sign(wt).double() * scale.double().view(-1, 1, 1, 1), bias.double(), s, p)
    # bf16 input: the same fp32 computation on the bf16 values, then one rounding to bf16 (2^-8 relative).
    assert_within(yb, ref_b, conv2d_bound(x.bfloat16(), sign(wt), scale, bias, s, p, out_dtype=torch.bfloat16), "bf16")


def test_packed_weight_linear_vs_linear():
    g = gen(7)
    x, wt = torch.randn(3, 4, 70, generator=g), torch.randn(33, 70, generator=g)
    scale, bias = torch.rand(33, generator=g), torch.randn(33, generator=g)
    y = K.packed_weight_linear(x, PackedWeight.from_signs(wt), scale, bias)
    # fp32 sum of 70 products, scale, bias: gamma_72 bound; the reference in float64.
    ref = F.linear(x.double(), sign(wt).double() * scale.double()[:, None], bias.double())
    assert_within(y, ref, linear_bound(x, sign(wt), scale, bias), "packed weight linear")


@pytest.mark.parametrize("case", CONV_CASES[:2], ids=lambda c: "x".join(map(str, c)))
def test_bound_catches_one_flipped_weight_sign(case):
    """The bounds above can fail: one wrong weight sign (of the largest-scale channel, at the tap that sees the
    largest |x|) moves an output by 2 |x| scale, far above the rounding bound."""
    n, c, o, h, w, k, s, p = case
    g = gen(sum(case) + 1)  # the data of test_packed_weight_conv2d_vs_conv2d
    x = torch.randn(n, c, h, w, generator=g)
    wt = torch.randn(o, c, k, k, generator=g)
    scale, bias = torch.rand(o, generator=g), torch.randn(o, generator=g)
    pw = PackedWeight.from_signs(wt)
    oc = int(scale.argmax())
    _, ci, hi, wi = (int(i) for i in torch.unravel_index(x.abs().argmax(), x.shape))
    flipped = sign(wt).double()
    flipped[oc, ci, k // 2, k // 2] *= -1  # the centre tap: output (hi, wi) reads x[ci, hi, wi] through it
    # Float activations (packed_weight_conv2d) and +-1 activations (binary_act_conv2d: exact dot, epilogue only).
    for xin, y, exact in (
        (x, K.packed_weight_conv2d(x, pw, scale, bias, s, p), False),
        (sign(x), K.binary_act_conv2d(x, pw, scale, bias, s, p), True),
    ):
        bound = conv2d_bound(xin, sign(wt), scale, bias, s, p, exact_sum=exact)
        good = F.conv2d(xin.double(), sign(wt).double() * scale.double().view(-1, 1, 1, 1), bias.double(), s, p)
        assert_within(y, good, bound)
        bad = F.conv2d(xin.double(), flipped * scale.double().view(-1, 1, 1, 1), bias.double(), s, p)
        change = 2 * float(xin[0, ci, hi, wi].abs() * scale[oc])
        assert change > 3 * float(bound[0, oc, hi, wi])  # the error is well outside the bound ...
        with pytest.raises(AssertionError, match="rounding-error bound"):
            assert_within(y, bad, bound)  # ... and the check reports it


def test_errors_name_the_problem(monkeypatch):
    pw = PackedWeight.from_signs(torch.randn(4, 8, 3, 3))
    with pytest.raises(ValueError, match="8"):
        K.binary_act_conv2d(torch.randn(1, 9, 5, 5), pw, padding=1)
    with pytest.raises(TypeError, match="PackedWeight"):
        K.binary_act_conv2d(torch.randn(1, 8, 5, 5), torch.zeros(36, dtype=torch.uint8))
    with pytest.raises(ValueError, match="linear weight"):
        K.binary_act_linear(torch.randn(2, 8), pw)
    with pytest.raises(ValueError, match="conv layout"):
        K.pack_activations(torch.randn(3, 8), "conv")
    with pytest.raises(ValueError, match="shape"):
        PackedWeight.from_pack_signs(torch.zeros(2, dtype=torch.uint8), (2, 2, 2))
    monkeypatch.setenv("DBGEN_KERNELS", "fast")
    with pytest.raises(ValueError, match="DBGEN_KERNELS"):
        K.backend("cpu")
    monkeypatch.delenv("DBGEN_KERNELS")
    assert K.backend("cpu") == ("cpu" if shutil.which("g++") else "reference")  # the CPU kernels where they build


def test_pack_signs_op_on_cpu_is_nn_pack_signs():
    t = torch.randn(3, 5, 7, generator=gen(8))
    assert torch.equal(K.pack_signs(t), dnn.pack_signs(t))


# --------------------------------------------------------------------------------------- integration
def _randomize_gains(model, g):
    """After data-dependent init, zero-init branches would hide the binary convs: give every layer a gain."""
    with torch.no_grad():
        for _, m in dnn.binary_layers(model):
            m.gain.copy_(0.5 + torch.rand(m.gain.shape, generator=g))
            if m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


def _stack_1_1(c=40, depth=3):
    layers = [dnn.WNConv2d(3, c, 3, padding=1)]
    for i in range(depth):
        k = 3 if i % 2 == 0 else 1
        layers += [dnn.BinaryActivation(), dnn.BinaryConv2d(c, c, k, padding=k // 2)]
    layers += [nn.ELU(), dnn.BinaryConv2d(c, 7, 3, padding=1)]  # a 1/32 layer at the end
    return nn.Sequential(*layers)


def test_to_packed_sequential_1_1_stack_matches_training_path():
    torch.manual_seed(0)
    g = gen(9)
    model = _stack_1_1()
    x = torch.randn(4, 3, 10, 9, generator=g)
    dnn.data_dependent_init(model, x)
    _randomize_gains(model, g)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    bound, signs = stack_bound(model, x)
    K.to_packed(model)
    kinds = [type(m).__name__ for m in model]
    assert kinds == [
        "WNConv2d",
        "SignPack",
        "PackedBinaryConv2d",
        "SignPack",
        "PackedBinaryConv2d",
        "SignPack",
        "PackedBinaryConv2d",
        "ELU",
        "PackedBinaryConv2d",
    ]
    # Fused: layers 2 and 4 emit packed signs for the next binary layer; the last binary layer feeds ELU.
    assert [m.pack_output for m in model if isinstance(m, K.PackedBinaryConv2d)] == [True, True, False, False]
    seen = []
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.append(o)) for m in model]
    with torch.no_grad():
        got = model(x)
    for h in hooks:
        h.remove()
    # Between the binary layers only packed words travel: no float +-1 tensor is materialized.
    assert [type(o).__name__ for o in seen] == ["Tensor"] + ["PackedActivation"] * 5 + ["Tensor"] * 3
    # The sign activations agree bit for bit (the integer dots are exact; the training path's fp32 sums are
    # within rounding, and no sign of these seeds sits that close to 0) ...
    for packed, ref_signs in zip([seen[1], seen[3], seen[5]], signs, strict=True):
        assert torch.equal(packed.words, K.pack_activations(ref_signs).words)
    # ... so the outputs differ only by fp32 roundings in different orders of the last two binary layers,
    # carried through ELU (stack_bound: gamma_{K+2} per layer, K = 360, 360).
    assert_within(got, expected, bound, "packed stack")


def test_to_packed_linear_stack_and_modes():
    torch.manual_seed(1)
    g = gen(10)
    model = nn.Sequential(
        dnn.WNLinear(20, 70),
        dnn.BinaryActivation(),
        dnn.BinaryLinear(70, 33),
        dnn.BinaryActivation(),
        dnn.BinaryLinear(33, 65),
        nn.Tanh(),
        dnn.BinaryLinear(65, 5),
    )
    x = torch.randn(6, 20, generator=g)
    dnn.data_dependent_init(model, x)
    _randomize_gains(model, g)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        bound, signs = stack_bound(model, x)  # fp32 roundings of both evaluations, carried layer by layer
        K.to_packed(model)
        seen = []
        hooks = [model[i].register_forward_hook(lambda mod, i, o: seen.append(o)) for i in (1, 3)]
        got = model(x)
        for h in hooks:
            h.remove()
        # Same signs bit for bit, then the last two layers' fp32 roundings (gamma_{K+2}, K = 33, 65) through Tanh.
        for packed, ref_signs in zip(seen, signs, strict=True):
            assert torch.equal(packed.words, K.pack_activations(ref_signs).words)
        assert_within(got, expected, bound, "packed linear stack")
    assert isinstance(model[1], K.SignPack) and model[2].pack_output and not model[4].pack_output


def test_to_packed_float_activations_and_errors():
    torch.manual_seed(2)
    conv = nn.Sequential(dnn.BinaryConv2d(8, 12, 3, padding=1), nn.ELU(), dnn.BinaryConv2d(12, 4, 1))
    x = torch.randn(2, 8, 6, 6)
    dnn.data_dependent_init(conv, x)
    with pytest.raises(ValueError, match="eval"):
        K.to_packed(conv)
    conv.eval()
    with torch.no_grad():
        expected = conv(x)
        bound, _ = stack_bound(conv, x)  # two fp32 convs (K = 72, 108) in other orders, through ELU
        K.to_packed(conv)  # no layer declares binary_input: binary weights x float activations
        assert_within(conv(x), expected, bound, "float activations")
    assert not any(m.binary_input or m.pack_output for m in conv if isinstance(m, K.PackedBinaryConv2d))
    # Packed modules hold 1 bit per weight (plus per-channel scale, bias and tap corrections).
    assert conv[0].words.dtype == torch.int32 and conv[0].words.numel() * 32 >= 12 * 8 * 9


def test_to_packed_keeps_unsupported_binary_layers():
    m = nn.Sequential(dnn.BinaryConvTranspose2d(4, 4, 4, stride=2, padding=1), dnn.BinaryConv2d(4, 4, 3, dilation=2))
    K.to_packed(m.eval())
    assert isinstance(m[0], dnn.BinaryConvTranspose2d) and isinstance(m[1], dnn.BinaryConv2d)


def _model(config_name):
    """The tiny preset's model; a missing (e.g. renamed) preset fails the test (ConfigError: not found)."""
    return build(ROOT / "configs" / config_name)


@pytest.mark.parametrize(
    "config_name",
    ["rvae_binary_act_tiny.yaml", "rvae_binary_tiny.yaml", "flowpp_binary_act_tiny.yaml", "flowpp_binary_tiny.yaml"],
)
def test_to_packed_real_model_same_bits_per_dim(config_name):
    model = _model(config_name)
    torch.manual_seed(3)
    g = gen(11)
    x = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    dnn.data_dependent_init(model, x)
    _randomize_gains(model, g)
    model.eval()
    n_binary = len(dnn.binary_layers(model))
    with torch.no_grad():
        torch.manual_seed(4)
        expected = model.log_likelihood_bpd(x)
        torch.manual_seed(5)
        expected_samples = model.sample(1)
        packed_state = dnn.packed_state_dict(model)
        K.to_packed(model)
        assert not dnn.binary_layers(model)
        n_packed = sum(isinstance(m, K.PackedBinaryConv2d | K.PackedBinaryLinear) for m in model.modules())
        assert n_packed == n_binary
        torch.manual_seed(4)
        got = model.log_likelihood_bpd(x)
        torch.manual_seed(5)
        samples = model.sample(1)
    assert torch.isfinite(got).all()
    # A product requirement, not a rounding bound: packed execution reports the training path's bits/dim to
    # 1e-3 (the precision bits/dim are reported with). Through dozens of layers with sign activations and the
    # likelihood there is no useful a-priori rounding bound, and a wrong layer moves bits/dim by far more.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-3)
    # Sampling runs through the packed layers; pixels may differ only where a sign sat on a rounding tie.
    assert samples.shape == expected_samples.shape
    assert (samples == expected_samples).float().mean() > 0.95

    # The exported packed state (1 bit per binary weight) loads into a fresh model that packs the same way.
    fresh = _model(config_name)
    dnn.load_packed_state_dict(fresh, packed_state)
    K.to_packed(fresh.eval())
    with torch.no_grad():
        torch.manual_seed(4)
        # The same words, scales and biases through the same ops in the same order: identical.
        assert torch.equal(fresh.log_likelihood_bpd(x), got)


def test_bwn_scale_equals_training_weight_magnitude():
    layer = dnn.BinaryConv2d(5, 6, 3, padding=1)
    with torch.no_grad():
        layer.gain.copy_(torch.rand(6) + 0.5)
    packed = K.PackedBinaryConv2d.from_layer(layer.eval())
    w_eff = layer.effective_weight().detach()
    assert torch.equal(w_eff.abs().amax(dim=(1, 2, 3)), packed.scale)
    # scale = fp32(gain * fp32(1 / sqrt(45))): two fp32 roundings from the exact value (the float64 reference
    # adds two more, far smaller).
    exact = float(layer.gain.detach()[0]) / math.sqrt(45)
    assert_within(packed.scale[0], exact, gamma(2, torch.float32) * exact + gamma(2, torch.float64) * exact)
