"""The bitwise CPU kernels (kernels/cpu_bitwise.cpp, dbgen.kernels.cpu): built with g++ on first use, one path per
instruction set, every path bit-identical to the PyTorch reference (integer results compared exactly).

Paths this CPU lacks are skipped with the reason; ``DBGEN_CPU_ISA`` forces a family (avx512, avx2, scalar) and
the library's codes reach every variant (AVX-512: VPOPCNTDQ and the AVX-512BW nibble lookup).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dbgen.kernels as K
from dbgen.kernels import cpu
from dbgen.kernels import reference as ref
from dbgen.kernels.packing import PackedWeight

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = list(cpu.ISA_CODES)  # scalar, avx2, avx512bw, avx512vpopcntdq


def _words(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**31), 2**31, shape, generator=g, dtype=torch.int64).to(torch.int32)


def _have(variant):
    if variant not in cpu.supported_isas():
        pytest.skip(f"this CPU lacks {variant} (it runs {', '.join(cpu.supported_isas())})")


@pytest.mark.parametrize("variant", VARIANTS)
def test_and_popcount_matmul_is_exact_on_every_path(variant):
    """Every shape class: one row or column, K of 1 word, K not a multiple of the vector width, O not a multiple
    of the 4-row output block, long K (the byte accumulators' periodic flush), all-ones words."""
    _have(variant)
    shapes = [(1, 1, 1), (3, 5, 2), (7, 4, 16), (9, 6, 17), (33, 17, 72), (2, 3, 600), (65, 9, 40)]
    for i, (m, o, k) in enumerate(shapes):
        a, b = _words((m, k), 2 * i), _words((o, k), 2 * i + 1)
        assert torch.equal(cpu.and_popcount_matmul(a, b, variant), ref.and_popcount_matmul(a, b)), (m, o, k)
    ones = torch.full((3, 600), -1, dtype=torch.int32)  # every bit set: 19,200 per entry
    assert cpu.and_popcount_matmul(ones, ones, variant).unique().tolist() == [600 * 32]
    empty = cpu.and_popcount_matmul(_words((0, 5), 0), _words((3, 5), 1), variant)
    assert empty.shape == (0, 3)


def test_thread_count_changes_no_number():
    a, b = _words((257, 72), 3), _words((37, 72), 4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.and_popcount_matmul(a, b)
        torch.set_num_threads(2)
        two = cpu.and_popcount_matmul(a, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and torch.equal(one, ref.and_popcount_matmul(a, b))


# (N, C, H, W, O, k, stride, padding): odd sizes, channels not multiples of 32 (nor of the 8 or 16 output channels
# a vector holds), batch 1 and 64, pixel counts not multiples of the 16-pixel block, windows of more than 31
# words (the nibble-lookup paths' byte counters are widened every 31 words).
CONV_CASES = [
    (1, 3, 5, 7, 4, 3, 1, 1),
    (2, 70, 9, 9, 37, 3, 2, 1),
    (64, 33, 6, 5, 5, 3, 1, 0),
    (3, 256, 8, 8, 16, 1, 1, 0),
    (1, 97, 11, 4, 6, 5, 2, 2),
    (5, 64, 7, 9, 40, 1, 2, 0),
    (1, 130, 6, 6, 33, 3, 1, 1),
]


@pytest.mark.parametrize("family", list(cpu.ISAS))
def test_binary_ops_on_the_cpu_kernels_equal_the_reference(family, monkeypatch):
    """binary_act_conv2d / binary_act_linear through DBGEN_KERNELS=cpu on each path: the same floats and the
    same packed output bits as DBGEN_KERNELS=reference."""
    try:
        cpu.isa(family)
    except K.sources.KernelUnavailable as e:
        pytest.skip(str(e))
    monkeypatch.setenv("DBGEN_CPU_ISA", family)
    g = torch.Generator().manual_seed(5)
    for n, c, h, w, o, k, s, p in CONV_CASES:
        x = torch.randn(n, c, h, w, generator=g)
        wt = PackedWeight.from_signs(torch.randn(o, c, k, k, generator=g))
        scale, bias = torch.rand(o, generator=g) + 0.1, torch.randn(o, generator=g)
        out = {}
        for kernels in ("reference", "cpu"):
            monkeypatch.setenv("DBGEN_KERNELS", kernels)
            assert K.backend("cpu") == kernels
            y = K.binary_act_conv2d(x, wt, scale, bias, s, p)
            bits = K.binary_act_conv2d(x, wt, scale, bias, s, p, pack_output=True).words
            # no scale or bias: an even fan-in gives dot = 0 often, where the sign convention (0 -> +1) decides
            bare = K.binary_act_conv2d(x, wt, None, None, s, p, pack_output=True).words
            lin_w = PackedWeight.from_signs(torch.randn(o, c, generator=torch.Generator().manual_seed(o)))
            lin = K.binary_act_linear(x.permute(0, 2, 3, 1), lin_w, scale, bias)
            out[kernels] = (y, bits, bare, lin)
        names = ("conv", "packed conv", "packed conv, dot only", "linear")
        for name, a, b in zip(names, out["reference"], out["cpu"], strict=True):
            assert torch.equal(a, b), (name, n, c, h, w, o, k, s, p)


def _families():
    found = []
    for family in cpu.ISAS:
        try:
            cpu.isa(family)
            found.append(family)
        except K.sources.KernelUnavailable:
            pass
    return found


def test_a_conv_split_over_threads_gives_the_same_bits():
    """Big enough to run on 2 threads (each thread takes a range of output pixels): the same floats as 1."""
    g = torch.Generator().manual_seed(8)
    x = K.pack_activations(torch.randn(8, 96, 12, 12, generator=g))
    w = PackedWeight.from_signs(torch.randn(80, 96, 3, 3, generator=g))
    threads = torch.get_num_threads()
    try:
        got = []
        for n in (1, 2):
            torch.set_num_threads(n)
            got.append(cpu.binary_conv2d(x, w, None, None, (1, 1), (1, 1), out_dtype=torch.float32, pack_output=False))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got[0], got[1])
    assert torch.equal(got[0], ref.binary_conv2d_ref(x, w, None, None, (1, 1), (1, 1)))


def test_sign_packing_on_the_cpu_kernels_is_the_reference(monkeypatch):
    """Both layouts, channels not multiples of 32, half-precision inputs, and the sign conventions (0 and -0
    -> +1, NaN -> -1, as pack_signs): the same words."""
    g = torch.Generator().manual_seed(6)
    special = torch.tensor([0.0, -0.0, -1e-30, 1e-30, -3.0, float("nan"), float("inf"), -float("inf")])
    cases = [
        (torch.randn(3, 70, 5, 7, generator=g), 1),
        (torch.randn(2, 33, 1, 1, generator=g), 1),
        (torch.randn(0, 40, 4, 4, generator=g), 1),
        (torch.randn(4, 6, 70, generator=g), -1),
        (torch.randn(9, 32, generator=g).half(), -1),
        (torch.randn(2, 64, 3, 3, generator=g).bfloat16(), 1),
        (special.repeat(5).view(1, 40, 1, 1), 1),
        (special.view(1, 8), -1),
    ]
    monkeypatch.setenv("DBGEN_KERNELS", "cpu")
    for x, dim in cases:
        got = cpu.pack_activations(x, dim)
        want = ref.pack_activations_ref(x, dim)
        assert got.channels == want.channels and torch.equal(got.words, want.words), (tuple(x.shape), x.dtype)
    assert K.pack_activations(special.view(1, 8)).unpack().tolist() == [[1, 1, -1, 1, -1, -1, 1, -1]]


@pytest.mark.parametrize("family", list(cpu.ISAS))
def test_packed_weight_ops_expand_the_bits_exactly_and_convolve_within_the_bound(family, monkeypatch):
    """The float weight the packed-weight ops convolve with is exactly +-scale (on each path), and the ops
    are within the rounding bound of the float64 conv (a flipped weight sign lands far outside it:
    tests/test_kernels.py::test_bound_catches_one_flipped_weight_sign)."""
    from bounds import assert_within, conv2d_bound, linear_bound

    if family not in _families():
        pytest.skip(f"this CPU lacks {family}")
    monkeypatch.setenv("DBGEN_KERNELS", "cpu")
    monkeypatch.setenv("DBGEN_CPU_ISA", family)
    g = torch.Generator().manual_seed(7)
    for shape in [(37, 70, 3, 3), (5, 33, 1, 1), (16, 256, 5, 5), (12, 64), (3, 100)]:
        wt = torch.randn(*shape, generator=g)
        pw = PackedWeight.from_signs(wt)
        scale = torch.rand(shape[0], generator=g) + 0.1
        sign = torch.where(wt >= 0, 1.0, -1.0)
        assert torch.equal(cpu.signed_weight(pw, scale), sign * scale.reshape(-1, *[1] * (wt.dim() - 1)))
        assert torch.equal(cpu.signed_weight(pw, None), sign)
    for n, c, h, w, o, k, s, p in CONV_CASES:
        x = torch.randn(n, c, h, w, generator=g)
        wt = torch.randn(o, c, k, k, generator=g)
        sign = torch.where(wt >= 0, 1.0, -1.0)
        scale, bias = torch.rand(o, generator=g) + 0.1, torch.randn(o, generator=g)
        y = K.packed_weight_conv2d(x, PackedWeight.from_signs(wt), scale, bias, s, p)
        exact = (
            F.conv2d(x.double(), sign.double(), None, s, p) * scale.double()[:, None, None]
            + bias.double()[:, None, None]
        )
        assert y.dtype == torch.float32
        assert_within(y, exact, conv2d_bound(x, sign, scale, bias, s, p, ref_dtype=None), "packed-weight conv")
        yh = K.packed_weight_conv2d(x.bfloat16(), PackedWeight.from_signs(wt), scale, bias, s, p)
        assert yh.dtype == torch.bfloat16
        bound = conv2d_bound(x.bfloat16(), sign, scale, bias, s, p, ref_dtype=None, out_dtype=torch.bfloat16)
        assert_within(
            yh,
            F.conv2d(x.bfloat16().double(), sign.double(), None, s, p) * scale.double()[:, None, None]
            + bias.double()[:, None, None],
            bound,
            "packed-weight conv, bf16 input",
        )
        lw = torch.randn(o, c, generator=g)
        lsign = torch.where(lw >= 0, 1.0, -1.0)
        xl = x.permute(0, 2, 3, 1)
        yl = K.packed_weight_linear(xl, PackedWeight.from_signs(lw), scale, bias)
        exact_l = xl.double() @ lsign.double().t() * scale.double() + bias.double()
        assert_within(yl, exact_l, linear_bound(xl, lsign, scale, bias, ref_dtype=None), "packed-weight linear")


@pytest.mark.parametrize("family", list(cpu.ISAS))
def test_a_packed_one_one_rvae_samples_and_evaluates_as_on_the_reference(family, monkeypatch):
    """The tiny 1/1 RVAE on the packed engine, on each path: the same samples for a seed and the same bits/dim
    as with the reference, bit for bit (the CPU kernels change only how the integers are counted)."""
    if family not in _families():
        pytest.skip(f"this CPU lacks {family}")
    monkeypatch.setenv("DBGEN_CPU_ISA", family)
    from dbgen.config import load_config
    from dbgen.eval_loop import use_engine
    from dbgen.models import build

    cfg = load_config(ROOT / "configs" / "rvae_binary_act_tiny.yaml")
    torch.manual_seed(0)
    model = use_engine(build(cfg.model).eval(), "packed")
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    got = {}
    for kernels in ("reference", "cpu"):
        monkeypatch.setenv("DBGEN_KERNELS", kernels)
        torch.manual_seed(3)
        samples = model.sample(4)
        torch.manual_seed(4)
        bpd = model.log_likelihood_bpd(x)
        got[kernels] = (samples, bpd)
    assert torch.equal(got["reference"][0], got["cpu"][0]) and torch.equal(got["reference"][1], got["cpu"][1])


def test_choosing_a_path(monkeypatch):
    have = cpu.supported_isas()
    assert have[0] == "scalar" and cpu.isa() == have[-1]  # the fastest by default
    monkeypatch.setenv("DBGEN_CPU_ISA", "scalar")
    assert cpu.isa() == "scalar"
    monkeypatch.setenv("DBGEN_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="DBGEN_CPU_ISA='sse9': expected one of scalar, avx2, avx512"):
        cpu.isa()
    missing = [family for family, codes in cpu.ISAS.items() if not any(cpu.ISA_CODES[v] in codes for v in have)]
    for family in missing:  # e.g. avx512 on an AVX2-only machine
        monkeypatch.setenv("DBGEN_CPU_ISA", family)
        with pytest.raises(K.sources.KernelUnavailable, match=f"DBGEN_CPU_ISA={family}: this CPU lacks it"):
            cpu.isa()


def test_a_failed_build_falls_back_to_the_reference_or_is_an_error_when_forced(tmp_path):
    """A fresh process whose compiler fails: DBGEN_KERNELS=auto logs one line and runs the reference;
    DBGEN_KERNELS=cpu exits with what is missing."""
    script = (
        "import torch, dbgen.kernels as K\n"
        "print(K.backend('cpu'))\n"
        "w = K.PackedWeight.from_signs(torch.randn(4, 8, 3, 3))\n"
        "print(K.binary_act_conv2d(torch.randn(1, 8, 5, 5), w, padding=1).shape)\n"
    )
    env = {**os.environ, "CXX": "/bin/false", "DBGEN_KERNEL_CACHE": str(tmp_path / "cache")}
    auto = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert auto.stdout.split("\n")[:2] == ["reference", "torch.Size([1, 4, 5, 5])"]
    warnings = [line for line in auto.stderr.splitlines() if "CPU kernels cannot be built" in line]
    assert len(warnings) == 1 and "/bin/false failed building" in warnings[0], auto.stderr[-3000:]
    forced = subprocess.run(
        [sys.executable, "-c", script], env={**env, "DBGEN_KERNELS": "cpu"}, capture_output=True, text=True, timeout=300
    )
    assert (
        forced.returncode != 0 and "KernelUnavailable: DBGEN_KERNELS=cpu: /bin/false failed building" in forced.stderr
    )


def test_bench_kernels_cli_writes_one_row_per_op_shape_path_and_thread_count(tmp_path):
    """``python -m dbgen.bench kernels --device cpu`` (in-process, one small shape): the JSON the issue names."""
    import json

    from dbgen.bench.__main__ import main

    out = tmp_path / "kernels.json"
    argv = ["kernels", "--device", "cpu", "--shapes", "rvae-1x1-8", "--batches", "1", "--threads", "1", "2"]
    assert main([*argv, "--repeats", "1", "--json-out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["cpu"] and res["date"] and res["torch"] == torch.__version__
    families = [f for f in cpu.ISAS if any(cpu.ISA_CODES[v] in cpu.ISAS[f] for v in cpu.supported_isas())]
    expected = {
        (op, path, threads)
        for threads in (1, 2)
        for path in ["reference", *families]
        for op in ("binary_act_conv2d", "binary_act_conv2d->bits", "packed_weight_conv2d")
    }
    assert {(r["op"], r["isa"], r["threads"]) for r in res["results"]} == expected
    for r in res["results"]:
        assert r["shape"] == "rvae-1x1-8" and r["batch"] == 1 and r["us"] > 0 and r["float_us"] > 0, r
    assert os.environ.get("DBGEN_KERNELS") is None and os.environ.get("DBGEN_CPU_ISA") is None  # restored
