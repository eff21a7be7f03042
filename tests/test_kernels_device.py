"""Every CUDA kernel of dbgen.kernels against the exact reference, on two targets:

* ``emulated``: the same kernel source compiled with g++ against kernels/host_emulation.h and run on CPU
  threads (tensor-core mma and warp primitives emulated per the PTX fragment layouts). Runs wherever g++ and
  CUDA's headers exist; checks indexing, tiling, split-K and the epilogues, not the hardware.
* ``gpu`` (``@pytest.mark.gpu``): the nvcc build on a real CUDA device; skipped without one.

Outputs are poisoned first (NaN for floats, 0x7f7f7f7f for words, 0x7f for bytes) so unwritten elements fail.
The fully binary path must match the reference bit for bit (integer dot, same float32 epilogue rounding).
"""

import copy
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from bounds import assert_within, linear_bound, magnitude, rounding_bound, stack_bound
from torch import nn

import dbgen.kernels as K
import dbgen.nn as dnn
from dbgen.kernels import cuda
from dbgen.kernels import ops as kops
from dbgen.kernels.packing import PackedWeight
from dbgen.kernels.reference import binary_conv2d_ref, pack_activations_ref

HAS_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= cuda.MIN_CAPABILITY
CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
CAN_EMULATE = shutil.which("g++") is not None and (CUDA_HOME / "include" / "cuda_bf16.h").is_file()


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("emulated", marks=pytest.mark.skipif(not CAN_EMULATE, reason="needs g++ and CUDA headers")),
        pytest.param(
            "gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU, cc>=8.0")]
        ),
    ],
)
def target(request, tmp_path_factory):
    """Yields the device the kernels run on; the emulated target routes CPU tensors to the emulator."""
    if request.param == "emulated":
        cuda.set_emulator(cuda.load_library(cuda.build_emulator(tmp_path_factory.mktemp("emu"))))
        yield "cpu"
        cuda.set_emulator(None)
    else:
        cuda.library(torch.device("cuda"))  # build (or load the cached build) once, outside the timings
        yield "cuda"


def small(device):
    return device == "cpu"


def launch_configs(device, stationary=False):
    """(tile, ksplit) pairs to run: all on a GPU; under (slow) emulation one per tile, split and unsplit.
    Tiles 0/1 stream the weights (split-K possible); the binary conv's tiles 2/3 keep them in shared memory."""
    configs = [(0, 1), (1, 3)] if small(device) else [(0, 1), (0, 3), (1, 1), (1, 3)]
    return configs + ([(2, 1), (3, 1)] if stationary else [])


def poison(shape, dtype, device):
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    if dtype == torch.uint8:
        return torch.full(shape, 0x7F, dtype=dtype, device=device)
    return torch.full(shape, 0x7F7F7F7F, dtype=dtype, device=device)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# (N, C_in, C_out, H, W, k, stride, padding). GPU: the models' binary convs at full size plus odd shapes; the
# emulated target runs the same channel counts on smaller images (CPU threads are slow).
BCONV_CASES = [
    (2, 256, 256, 16, 16, 3, 1, 1),  # RVAE residual 3x3
    (2, 256, 256, 16, 16, 5, 1, 2),  # RVAE residual 5x5
    (2, 240, 120, 32, 16, 3, 1, 1),  # Flow++ gated block conv
    (2, 240, 240, 32, 16, 1, 1, 0),  # Flow++ gate conv
    (3, 64, 32, 16, 8, 3, 1, 1),  # Flow++ dequantization blocks
    (2, 37, 45, 9, 7, 5, 1, 2),
    (2, 33, 17, 11, 10, 3, 2, 1),
    (3, 1, 5, 6, 6, 3, 1, 1),
    (2, 65, 31, 7, 9, 5, 2, 2),
    (1, 20, 24, 4, 6, 3, 1, 3),
]


def _shrink(case, device):
    n, c, o, h, w, k, s, p = case
    if small(device):
        n, h, w = 1, min(h, 6), min(w, 5)
    return n, c, o, h, w, k, s, p


def _ids(c):
    return "x".join(map(str, c))


# ------------------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("n", [1, 7, 8, 33, 1000, 4097])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pack_signs(target, n, dtype):
    t = torch.randn(n, generator=gen(n)).to(dtype)
    t[0] = -0.0
    if n > 2:
        t[1], t[2] = 0.0, float("nan")
    out = poison(((n + 7) // 8,), torch.uint8, target)
    got = cuda.pack_signs_cuda(t.to(target), out=out)
    assert torch.equal(got.cpu(), dnn.pack_signs(t))


@pytest.mark.parametrize("shape", [(2, 37, 5, 6), (1, 256, 16, 16), (3, 1, 2, 2), (2, 240, 8, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_activations_conv_layout(target, shape, dtype):
    x = torch.randn(shape, generator=gen(sum(shape))).to(dtype)
    expected = pack_activations_ref(x, 1).words
    for xx in (x, x.to(memory_format=torch.channels_last)):  # strided reads, either layout
        n, c, h, w = shape
        out = poison((n, h, w, (c + 31) // 32), torch.int32, target)
        assert torch.equal(cuda.pack_activations_cuda(xx.to(target), 1, out=out).cpu(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pack_activations_channels_last(target, dtype):
    """Channels-last input (channel stride 1) takes the warp-per-pixel kernel: more than 32 words per pixel,
    a partial last word, -0.0 / 0.0 / NaN signs, and a strided view (a W slice of an NHWC tensor)."""
    x = torch.randn(2, 1100, 3, 4, generator=gen(3)).to(dtype)  # 35 words per pixel
    x[0, 0, 0, 0], x[0, 1, 0, 0], x[1, 1099, 2, 3] = -0.0, 0.0, float("nan")
    xl = x.contiguous(memory_format=torch.channels_last)
    for xx in (xl, xl[:, :, :, 1:]):
        assert xx.stride(1) == 1
        out = poison((xx.shape[0], xx.shape[2], xx.shape[3], 35), torch.int32, target)
        got = cuda.pack_activations_cuda(xx.to(target), 1, out=out).cpu()
        assert torch.equal(got, pack_activations_ref(xx, 1).words)


def test_pack_activations_linear_layout(target):
    x = torch.randn(3, 4, 70, generator=gen(5))
    assert torch.equal(cuda.pack_activations_cuda(x.to(target), -1).cpu(), pack_activations_ref(x, -1).words)


# ------------------------------------------------------------------------------------ fully binary conv
def check_binary_conv(target, case, configs):
    """The binary conv of ``case`` (unshrunk) under each (tile, ksplit) against the reference, float and packed
    outputs bit for bit; returns the inputs and the float reference for further checks."""
    n, c, o, h, w, k, s, p = case
    g = gen(sum(case))
    x, wt = torch.randn(n, c, h, w, generator=g), torch.randn(o, c, k, k, generator=g)
    scale, bias = torch.rand(o, generator=g) + 0.1, torch.randn(o, generator=g)
    pw, pa = PackedWeight.from_signs(wt), pack_activations_ref(x, 1)
    ref = binary_conv2d_ref(pa, pw, scale, bias, (s, s), (p, p))
    ref_packed = binary_conv2d_ref(pa, pw, scale, bias, (s, s), (p, p), pack_output=True).words
    words, pwd = pa.words.to(target), pw.to(target)
    for tile, ksplit in configs:
        out = poison(ref.shape, torch.float32, target)
        cuda.bconv_cuda(words, c, pwd, scale, bias, (s, s), (p, p), tile=tile, ksplit=ksplit, out=out)
        assert torch.equal(out.cpu(), ref), f"tile={tile} ksplit={ksplit}: {(out.cpu() - ref).abs().max()}"
        outp = poison(ref_packed.shape, torch.int32, target)
        cuda.bconv_cuda(
            words, c, pwd, scale, bias, (s, s), (p, p), tile=tile, ksplit=ksplit, pack_output=True, out=outp
        )
        assert torch.equal(outp.cpu(), ref_packed), f"packed output, tile={tile} ksplit={ksplit}"
    return pa, pw, scale, bias, ref


@pytest.mark.parametrize("case", BCONV_CASES, ids=_ids)
def test_binary_conv_bit_exact(target, case):
    n, c, o, h, w, k, s, p = _shrink(case, target)
    pa, pw, scale, bias, ref = check_binary_conv(target, (n, c, o, h, w, k, s, p), launch_configs(target, True))
    words, pwd = pa.words.to(target), pw.to(target)
    for dtype, tile in ((torch.bfloat16, 0), (torch.float16, 3)):
        out = poison(ref.shape, dtype, target)
        cuda.bconv_cuda(words, c, pwd, scale, bias, (s, s), (p, p), out_dtype=dtype, tile=tile, out=out)
        assert torch.equal(out.cpu(), ref.to(dtype)), f"{dtype} tile={tile}"
    # No scale / bias: the raw integer dot product.
    out = cuda.bconv_cuda(words, c, pwd, None, None, (s, s), (p, p))
    assert torch.equal(out.cpu(), binary_conv2d_ref(pa, pw, None, None, (s, s), (p, p)))
    # Split-K tile counters are left at zero for the next launch.
    assert all(int(cnt.count_nonzero()) == 0 for cnt in cuda._counters.values())


def test_emulated_cp_async_catches_an_early_read(target, tmp_path):
    """The emulation lands a cp.async copy at the wait that covers its group, not at issue, so a kernel that reads
    a ring stage before its copies have landed reads stale shared memory. Proof that the check above can fail:
    built with wait_group N leaving N + 1 groups pending (an off-by-one wait), the same check fails on every
    tile (the ring carries the activations of all tiles and the streamed weights of tiles 0/1), aligned (Cw % 8
    == 0: 16-byte copies) and not (4-byte copies); the normal build passes it on the same inputs."""
    if target != "cpu":
        pytest.skip("the fault switch is a build of the host emulation")
    faulty = cuda.load_library(cuda.build_emulator(tmp_path, defines=("DBGEN_EMU_FAULT_WEAK_WAIT",)))
    normal = cuda._emulator
    configs = [(0, 1), (1, 2), (2, 1), (3, 1)]
    for case in ((1, 256, 40, 5, 4, 3, 1, 1), (1, 65, 31, 5, 4, 3, 1, 1)):  # 9 and 4 K steps
        check_binary_conv(target, case, configs)
        cuda.set_emulator(faulty)
        try:
            for tile, ksplit in configs:
                with pytest.raises(AssertionError, match=f"tile={tile} "):
                    check_binary_conv(target, case, [(tile, ksplit)])
        finally:
            cuda.set_emulator(normal)


@pytest.mark.parametrize("tile", [2, 3])
def test_binary_conv_weight_stationary_walks_several_pixel_tiles(target, tile):
    """The persistent grid: more pixel tiles than resident blocks, so blocks loop over tiles (emulator: 4 SMs)."""
    n, c, o, h, w = (3, 64, 40, 10, 10) if small(target) else (64, 256, 200, 16, 16)
    g = gen(tile)
    x, wt = torch.randn(n, c, h, w, generator=g), torch.randn(o, c, 3, 3, generator=g)
    scale, bias = torch.rand(o, generator=g), torch.randn(o, generator=g)
    pw, pa = PackedWeight.from_signs(wt), pack_activations_ref(x, 1)
    ref = binary_conv2d_ref(pa, pw, scale, bias, (1, 1), (1, 1))
    ref_packed = binary_conv2d_ref(pa, pw, scale, bias, (1, 1), (1, 1), pack_output=True).words
    out = poison(ref.shape, torch.float32, target)
    cuda.bconv_cuda(pa.words.to(target), c, pw.to(target), scale, bias, (1, 1), (1, 1), tile=tile, out=out)
    assert torch.equal(out.cpu(), ref)
    outp = poison(ref_packed.shape, torch.int32, target)
    cuda.bconv_cuda(
        pa.words.to(target), c, pw.to(target), scale, bias, (1, 1), (1, 1), tile=tile, pack_output=True, out=outp
    )
    assert torch.equal(outp.cpu(), ref_packed)


def test_binary_conv_a_fragments_in_registers(target):
    """Tile 4: tile 3 with the A fragments of all K = 9 steps in registers (unrolled K loop), on 3x3 x 256
    channels (16-byte copies; more pixel tiles than resident blocks) and 2x2 x 520 channels (Cw = 17, 4-byte
    copies); float and packed outputs bit for bit."""
    cases = [(1, 256, 40, 12, 12, 3, 1, 1), (1, 520, 24, 4, 4, 2, 1, 1)]
    if not small(target):
        cases = [(64, 256, 256, 16, 16, 3, 1, 1), (2, 520, 24, 9, 9, 2, 1, 1)]
    for case in cases:
        check_binary_conv(target, case, [(4, 1)])


def test_binary_conv_large_k_falls_back_from_weight_stationary(target):
    """Weight rows beyond the shared-memory limit: tile 3 silently streams the weights (tile 0) instead."""
    g = gen(21)
    c, o = 1024, 40  # 5x5 x 1024 channels: 256 rows x 804 words = 823 KB, far over any SM
    x, wt = torch.randn(1, c, 3, 3, generator=g), torch.randn(o, c, 5, 5, generator=g)
    pw, pa = PackedWeight.from_signs(wt), pack_activations_ref(x, 1)
    ref = binary_conv2d_ref(pa, pw, None, None, (1, 1), (2, 2))
    out = cuda.bconv_cuda(pa.words.to(target), c, pw.to(target), None, None, (1, 1), (2, 2), tile=3)
    assert torch.equal(out.cpu(), ref)


# ------------------------------------------------------------------------ packed weights x float activations
PW_CASES = [BCONV_CASES[i] for i in (0, 2, 3, 5, 6, 7)]


def pwconv_bound(op, x, signs, scale, bias):
    """Bound on |pwconv - exact| for ``op`` (conv or linear) of ``x`` with the +-1 ``signs``, then scale, bias.

    The kernel feeds fp16/bf16 x to the tensor cores as is and splits fp32 x exactly into three bf16 planes
    (x = hi + mid + lo, |hi| + |mid| + |lo| <= (1 + 2^-7) |x|); every product with +-1 is exact. The fp32
    accumulation may not round to nearest: a tensor-core mma aligns each block of 16 products to its largest
    term and truncates (~2(k+1)u of that term per block; Fasi, Higham, Mikaitis & Pranesh 2021), the emulator
    and split-K partials add in any order. 4u per term covers it: a sum of planes * K terms with u taken 4x
    (n = 4 (planes K + 2), the fp32 epilogue's 2 roundings included), then the rounding to the output dtype
    x.dtype. The reference is float64.
    """
    planes = 3 if x.dtype == torch.float32 else 1
    k = signs[0].numel()
    mag = magnitude(op, x, signs, scale, bias, channel_dim=1 if signs.dim() == 4 else -1) * (1 + 2.0**-7)
    out_dtype = None if x.dtype == torch.float32 else x.dtype
    return rounding_bound(mag, 4 * (planes * k + 2), torch.float32, ref_n=k + 2, out_dtype=out_dtype)


@pytest.mark.parametrize("case", PW_CASES, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_packed_weight_conv(target, case, dtype):
    n, c, o, h, w, k, s, p = _shrink(case, target)
    if small(target) and c >= 256 and dtype != torch.bfloat16:
        pytest.skip("emulator time budget: 256-channel shapes in bf16 only (every dtype runs on smaller shapes)")
    g = gen(sum(case) + 1)
    x, wt = torch.randn(n, c, h, w, generator=g).to(dtype), torch.randn(o, c, k, k, generator=g)
    scale, bias = torch.rand(o, generator=g) + 0.1, torch.randn(o, generator=g)
    pw = PackedWeight.from_signs(wt)
    ref = F.conv2d(x.double(), pw.signs().double() * scale.double().view(-1, 1, 1, 1), bias.double(), s, p)
    bound = pwconv_bound(lambda a, w: F.conv2d(a, w, None, s, p), x, pw.signs(), scale, bias)
    pwd = pw.to(target)
    # Both input layouts (NCHW is copied to channels-last first); the emulator checks one per launch config.
    layouts = [torch.contiguous_format, torch.channels_last]
    for i, (tile, ksplit) in enumerate(launch_configs(target)):
        for layout in layouts[i % 2 : i % 2 + 1] if small(target) else layouts:
            out = poison(ref.shape, dtype, target)
            xx = x.to(target).contiguous(memory_format=layout)
            cuda.pwconv_cuda(xx, pwd, scale, bias, (s, s), (p, p), tile=tile, ksplit=ksplit, out=out)
            got = out.cpu()
            assert not got.isnan().any(), "unwritten outputs"
            assert_within(got, ref, bound, f"tile={tile} ksplit={ksplit} {layout}")


# ----------------------------------------------------------------------------- ops and models end to end
@pytest.fixture
def kernels_on_target(target, monkeypatch):
    """dbgen.kernels ops dispatch to the kernels for the target's tensors (CPU tensors -> emulator)."""
    if target == "cpu":
        monkeypatch.setattr(kops, "backend", lambda device: "cuda")
    return target


def test_linear_ops_through_kernels(kernels_on_target):
    dev = kernels_on_target
    g = gen(11)
    x, wt = torch.randn(3, 4, 70, generator=g), torch.randn(33, 70, generator=g)
    scale, bias = torch.rand(33, generator=g), torch.randn(33, generator=g)
    pw = PackedWeight.from_signs(wt)
    sx = torch.where(x >= 0, 1.0, -1.0)
    exact = F.linear(sx.double(), pw.signs().double())
    got = K.binary_act_linear(x.to(dev), pw.to(dev))
    assert got.shape == (3, 4, 33) and torch.equal(got.cpu().double(), exact)
    y = K.binary_act_linear(x.to(dev), pw.to(dev), scale, bias).cpu()
    # Exact integer dot, then the fp32 epilogue's two roundings; the reference in float64.
    ref = F.linear(sx.double(), pw.signs().double() * scale.double()[:, None], bias.double())
    assert_within(y, ref, linear_bound(sx, pw.signs(), scale, bias, exact_sum=True), "binary linear")
    packed = K.binary_act_linear(x.to(dev), pw.to(dev), scale, bias, pack_output=True)
    assert torch.equal(packed.words.cpu(), pack_activations_ref(y, -1).words)
    yf = K.packed_weight_linear(x.to(dev), pw.to(dev), scale, bias).cpu()
    ref_f = F.linear(x.double(), pw.signs().double() * scale.double()[:, None], bias.double())
    assert_within(yf, ref_f, pwconv_bound(F.linear, x, pw.signs(), scale, bias), "packed weight linear")


def test_to_packed_stack_through_kernels(kernels_on_target):
    dev = kernels_on_target
    torch.manual_seed(0)
    g = gen(12)
    c = 40
    model = nn.Sequential(
        dnn.WNConv2d(3, c, 3, padding=1),
        dnn.BinaryActivation(),
        dnn.BinaryConv2d(c, c, 3, padding=1),
        dnn.BinaryActivation(),
        dnn.BinaryConv2d(c, c, 1),
        nn.ELU(),
        dnn.BinaryConv2d(c, 7, 3, padding=1),
    )
    x = torch.randn(2, 3, 6, 5, generator=g)
    dnn.data_dependent_init(model, x)
    with torch.no_grad():
        for _, m in dnn.binary_layers(model):
            m.gain.copy_(0.5 + torch.rand(m.gain.shape, generator=g))
    model.eval()
    with torch.no_grad():
        expected = model(x)
        # fp32 roundings of both evaluations, layer by layer (on a GPU the first conv runs there too); the
        # kernels' side of a float-input layer as in pwconv_bound: 3 planes, u taken 4x, (1 + 2^-7) |x|.
        bound, signs = stack_bound(
            model, x, same_float_layers=dev == "cpu", other_n=lambda k: math.ceil((1 + 2.0**-7) * 4 * (3 * k + 2))
        )
        K.to_packed(model.to(dev))
        seen = []
        hooks = [model[i].register_forward_hook(lambda mod, i, o: seen.append(o)) for i in (1, 3)]
        got = model(x.to(dev)).cpu()
        for h in hooks:
            h.remove()
    assert isinstance(model[1], K.SignPack) and model[2].pack_output
    # The sign activations agree bit for bit (no sign of this seed sits within rounding of 0), so the outputs
    # differ only by the fp32 roundings of the last two binary layers, carried through ELU.
    for packed, ref_signs in zip(seen, signs, strict=True):
        assert torch.equal(packed.words.cpu(), pack_activations_ref(ref_signs, 1).words)
    assert_within(got, expected, bound, "packed stack")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU, cc>=8.0")
def test_packed_weight_conv_allocates_no_dequantized_weight():
    dev = torch.device("cuda")
    o, c, k = 256, 256, 3
    pw = PackedWeight.from_signs(torch.randn(o, c, k, k)).to(dev)
    x = torch.randn(1, c, 16, 16, device=dev, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    scale = torch.rand(o, device=dev)
    cuda.pwconv_cuda(x, pw, scale, None, (1, 1), (1, 1))  # warm up: tables, library
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = cuda.pwconv_cuda(x, pw, scale, None, (1, 1), (1, 1))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # Output + the fp32 split-K workspace of the split chosen for this device's multiprocessor count (H200: 132
    # SMs -> split 5, 1.3 MB); a bf16 copy of the +-1 weight would add 1.2 MB more.
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    _, ksplit, _ = cuda.pwconv_launch(out.numel() // o, o, pw.transposed_words().shape[0], x.dtype, sms)
    workspace = out.numel() * 4 * ksplit if ksplit > 1 else 0
    extra_bound = out.numel() * out.element_size() + workspace + 64 * 1024
    assert extra <= extra_bound, (extra, extra_bound, ksplit)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU, cc>=8.0")
@pytest.mark.parametrize(
    "config_name", ["rvae_binary_act_tiny.yaml", "rvae_binary_tiny.yaml", "flowpp_binary_act_tiny.yaml"]
)
def test_real_model_packed_on_gpu_matches_training_path(config_name):
    """A tiny model on the GPU: bits/dim of the float training path = packed execution through the kernels."""
    from dbgen.models import build

    model = build(Path(__file__).resolve().parents[1] / "configs" / config_name)  # a missing preset fails
    g = gen(13)
    x = torch.randint(0, 256, (4, 3, 32, 32), generator=g, dtype=torch.uint8)
    dnn.data_dependent_init(model, x)
    with torch.no_grad():
        for _, m in dnn.binary_layers(model):
            m.gain.copy_(0.5 + torch.rand(m.gain.shape, generator=g))
    model.eval()
    packed = K.to_packed(copy.deepcopy(model)).cuda()
    model.cuda()
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the float reference in true fp32
    try:
        with torch.no_grad():
            torch.manual_seed(4)  # same CUDA noise for both runs
            expected = model.log_likelihood_bpd(x.cuda())
            torch.manual_seed(4)
            got = packed.log_likelihood_bpd(x.cuda())
            samples = packed.sample(2)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert samples.shape == (2, 3, 32, 32) and samples.dtype == torch.uint8
    # A product requirement, not a rounding bound: packed execution reports the training path's bits/dim to
    # 1e-3 (as on the CPU, tests/test_kernels.py); a wrong layer moves bits/dim by far more.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-3)


@pytest.mark.skipif(not CAN_EMULATE, reason="needs g++ and CUDA headers")
def test_benchmark_gpu_code_path_on_emulator(tmp_path, monkeypatch):
    """benchmarks/bench_kernels.py's GPU branch (everything but the CUDA-graph timer) runs and checks itself."""
    import importlib.util
    import json

    monkeypatch.setattr(kops, "backend", kops.backend)  # restored afterwards: --emulate reroutes both
    monkeypatch.setattr(cuda, "_emulator", cuda._emulator)
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--emulate", "--batches", "1", "--cases", "flowpp_gate1x1", "--no-sweep", "--json", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    # The bench reports ||y - ref|| / ||ref|| of bf16 outputs against fp32 references: the final bf16 rounding
    # alone is up to 2^-8 = 3.9e-3 of ||y||, the fp32 accumulation (K = 240) well under 1e-3 more; 1e-2 checks
    # the bench's own comparison (the kernels are checked against bounds above), a wrong kernel is O(1) off.
    assert row["binary_bits_exact"] and row["binary_err"] < 1e-2 and row["packed_w_err"] < 1e-2
    assert row["timing"] == "emulated" and row["binary_us"] > 0
