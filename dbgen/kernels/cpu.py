"""The bitwise CPU kernels (``kernels/cpu_bitwise.cpp``): their build on first use, and the packed ops on them.

The fully binary conv and linear run whole in C++ (window gather, AND-popcount, epilogue, output signs), as does
sign packing; the packed-weight ops expand the bits into a float weight that oneDNN's conv takes (see
:func:`signed_weight`). Every op gives the reference's integers, floats and bits (``tests/test_kernels_cpu.py``).

The source is compiled by ``g++`` into a plain shared library: no torch headers and no C++-extension ABI, so
it builds in about two seconds (a torch extension's translation unit takes ~45 s on 2 cores) and one build serves
every torch version. It is cached under ``$DBGEN_KERNEL_CACHE`` by a hash of the source, the compiler's version
and the flags; the build writes a temporary name and renames it, so concurrent processes at worst build twice.

One library holds every instruction-set path (:data:`ISAS`); the fastest this CPU runs is chosen once per
process, or ``DBGEN_CPU_ISA=avx512|avx2|scalar`` forces one (an error when the CPU lacks it). ``avx512`` is
VPOPCNTDQ where the CPU has it, else AVX-512BW's nibble lookup. The kernels run on ``torch.get_num_threads()``
threads, so ``torch.set_num_threads`` governs them as it does torch's own ops.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from . import sources
from .packing import PackedActivation, PackedWeight
from .sources import KernelUnavailable

__all__ = [
    "ISAS",
    "and_popcount_matmul",
    "binary_conv2d",
    "binary_linear",
    "build_library",
    "isa",
    "library",
    "pack_activations",
    "packed_weight_conv2d",
    "packed_weight_linear",
    "signed_weight",
    "supported_isas",
]

SOURCE_NAME = "cpu_bitwise.cpp"
ABI_VERSION = 3
# The library's paths, slowest first: the name DBGEN_CPU_ISA takes and the codes the library knows it by.
ISAS = {"scalar": (0,), "avx2": (1,), "avx512": (3, 2)}  # avx512: VPOPCNTDQ, else the AVX-512BW nibble lookup
ISA_CODES = {"scalar": 0, "avx2": 1, "avx512bw": 2, "avx512vpopcntdq": 3}
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-ffp-contract=off"]  # no fused multiply-add

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_scratch = threading.local()  # per thread: the float weight signed_weight expands into (one layer at a time)


def build_library(out_dir: Path | None = None, cxx: str | None = None) -> Path:
    """Compile the CPU kernels into a shared library; returns its path (cached)."""
    cxx = cxx or os.environ.get("CXX") or shutil.which("g++")
    if not cxx:
        raise KernelUnavailable("g++ not found (set CXX): it builds dbgen's CPU kernels on first use")
    src = sources.kernel_source(SOURCE_NAME)
    return sources.build_shared_library(cxx, FLAGS, src, "libdbgen_cpu.so", "cpu", out_dir)[0]


def library() -> ctypes.CDLL:
    """The CPU kernel library, built on first use (raises :class:`KernelUnavailable` saying why not)."""
    global _lib
    with _lock:
        if _lib is None:
            lib = ctypes.CDLL(str(build_library()))
            lib.dbgen_cpu_abi_version.restype = ctypes.c_int
            lib.dbgen_cpu_isas.restype = ctypes.c_int
            p, ll, i = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int
            signatures = {
                "dbgen_and_popcount_matmul": [p, p, p, ll, ll, ll, i, i],
                "dbgen_binary_conv2d": [p, *[ll] * 4, p, *[ll] * 7, p, p, p, p, p, i, i],
                "dbgen_pack_signs_nchw": [p, ll, ll, ll, p, i],
                "dbgen_pack_signs_rows": [p, ll, ll, p, i],
                "dbgen_unpack_weight": [p, ll, ll, ll, ll, p, p, i, i],
            }
            for name, argtypes in signatures.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = i, argtypes
            if lib.dbgen_cpu_abi_version() != ABI_VERSION:
                raise KernelUnavailable(f"CPU kernel library ABI {lib.dbgen_cpu_abi_version()} != {ABI_VERSION}")
            _lib = lib
        return _lib


@functools.cache
def supported_isas() -> tuple[str, ...]:
    """The library's paths this CPU runs (``scalar`` always), by their codes' names, slowest first (detected
    once per process)."""
    mask = library().dbgen_cpu_isas()
    return tuple(name for name, code in ISA_CODES.items() if mask >> code & 1)


def isa(name: str | None = None) -> str:
    """The path the kernels take: ``name`` (a key of :data:`ISA_CODES`, or ``avx512``), else
    ``$DBGEN_CPU_ISA``, else the fastest this CPU runs. Raises :class:`KernelUnavailable` for a path the CPU
    lacks, and ValueError for an unknown name."""
    have = supported_isas()
    name = name or os.environ.get("DBGEN_CPU_ISA") or None
    if name is None:
        return have[-1]
    if name in ISAS:  # a family: its fastest variant this CPU has
        options = [n for n, code in ISA_CODES.items() if code in ISAS[name] and n in have]
        if not options:
            raise KernelUnavailable(f"DBGEN_CPU_ISA={name}: this CPU lacks it (it runs {', '.join(have)})")
        return max(options, key=ISA_CODES.get)
    if name not in ISA_CODES:
        raise ValueError(f"DBGEN_CPU_ISA={name!r}: expected one of {', '.join(ISAS)}")
    if name not in have:
        raise KernelUnavailable(f"{name}: this CPU lacks it (it runs {', '.join(have)})")
    return name


def _status(err: int, what: str) -> None:
    if err:
        raise RuntimeError(f"{what} failed with code {err} (1: the CPU lacks the path, 2: bad sizes)")


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _per_channel(v, o: int) -> torch.Tensor | None:
    """scale or bias as a contiguous float32 (O,) tensor (None stays None)."""
    return None if v is None else torch.as_tensor(v, dtype=torch.float32).reshape(o).contiguous()


def and_popcount_matmul(a: torch.Tensor, b: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """``out[i, o] = sum_k popc(a[i, k] AND b[o, k])`` for int32 words a (M, K), b (O, K) -> int64 (M, O), on
    the CPU kernels (``path``: see :func:`isa`). The same integers as
    :func:`dbgen.kernels.reference.and_popcount_matmul`."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"and_popcount_matmul: expected (M, K) and (O, K), got {tuple(a.shape)} and {tuple(b.shape)}")
    code = ISA_CODES[isa(path)]
    a, bt = a.to(torch.int32).contiguous(), b.to(torch.int32).t().contiguous()
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.int64)
    err = library().dbgen_and_popcount_matmul(
        a.data_ptr(), bt.data_ptr(), out.data_ptr(), *out.shape, a.shape[1], code, torch.get_num_threads()
    )
    _status(err, "dbgen_and_popcount_matmul")
    return out


def _binary(words, w: PackedWeight, scale, bias, stride, padding, out_dtype, pack_output):
    """The fully binary conv of ``words`` (N, H, W, Cw) on the kernels: float32 (N, O, Ho, Wo) cast to
    ``out_dtype``, or the packed signs (N, Ho, Wo, Ow)."""
    n, h, wd, cw = words.shape
    kh, kw = w.kernel_size
    (sh, sw), (ph, pw) = stride, padding
    ho, wo = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    o = w.out_channels
    words = words.contiguous()
    wt = w.transposed_words()  # (K, O), cached on the weight
    tap_corr = w.tap_corr.t().contiguous()  # (T, O): the kernel sums the taps inside the image per pixel
    scale, bias = _per_channel(scale, o), _per_channel(bias, o)
    if pack_output:
        out = torch.empty(n, ho, wo, (o + 31) // 32, dtype=torch.int32)
    else:
        out = torch.empty(n, o, ho, wo, dtype=torch.float32)
    if out.numel():
        err = library().dbgen_binary_conv2d(
            words.data_ptr(), n, h, wd, cw, wt.data_ptr(), o, kh, kw, sh, sw, ph, pw,
            tap_corr.data_ptr(), _ptr(scale), _ptr(bias),
            None if pack_output else out.data_ptr(), out.data_ptr() if pack_output else None,
            ISA_CODES[isa()], torch.get_num_threads(),
        )  # fmt: skip
        _status(err, "dbgen_binary_conv2d")
    if pack_output:
        return PackedActivation(out, o)
    return out if out_dtype == torch.float32 else out.to(out_dtype)


def binary_conv2d(x: PackedActivation, w: PackedWeight, scale, bias, stride, padding, *, out_dtype, pack_output):
    """:func:`dbgen.kernels.reference.binary_conv2d_ref` on the CPU kernels: the same floats and bits."""
    return _binary(x.words, w, scale, bias, stride, padding, out_dtype, pack_output)


def binary_linear(x: PackedActivation, w: PackedWeight, scale, bias, *, out_dtype, pack_output):
    """:func:`dbgen.kernels.reference.binary_linear_ref` on the CPU kernels (the same floats and bits): a 1x1
    conv over the rows."""
    lead = x.words.shape[:-1]
    words = x.words.reshape(-1, 1, 1, x.words.shape[-1])
    y = _binary(words, w, scale, bias, (1, 1), (0, 0), out_dtype, pack_output)
    if pack_output:
        return PackedActivation(y.words.reshape(*lead, y.words.shape[-1]), y.channels)
    return y.reshape(*lead, w.out_channels)


def pack_activations(x: torch.Tensor, channel_dim: int) -> PackedActivation:
    """:func:`dbgen.kernels.reference.pack_activations_ref` on the CPU kernels (the same words)."""
    x = x.detach()
    if x.dtype != torch.float32:
        x = x.float()  # exact: the sign (and NaN) survive the cast
    c = x.shape[channel_dim]
    if channel_dim == 1 and x.dim() == 4:  # conv layout (NCHW)
        n, _, h, wd = x.shape
        x = x.contiguous()
        words = torch.empty(n, h, wd, (c + 31) // 32, dtype=torch.int32)
        err = library().dbgen_pack_signs_nchw(x.data_ptr(), n, c, h * wd, words.data_ptr(), torch.get_num_threads())
    else:
        rows = torch.movedim(x, channel_dim, -1).contiguous()
        words = torch.empty(*rows.shape[:-1], (c + 31) // 32, dtype=torch.int32)
        err = library().dbgen_pack_signs_rows(
            rows.data_ptr(), rows.numel() // max(c, 1), c, words.data_ptr(), torch.get_num_threads()
        )
    _status(err, "dbgen_pack_signs")
    return PackedActivation(words, c)


def signed_weight(w: PackedWeight, scale, path: str | None = None) -> torch.Tensor:
    """The float32 weight ``+-scale[o]`` (``+-1`` without scale) of ``w``, contiguous in its shape, expanded
    from the bits by the kernels. It lives in a per-thread scratch buffer that the next call overwrites (sized
    to the largest layer and reused: a fresh 2 MB tensor per layer costs page faults worth more than the
    expansion), so the model stays resident as bits: use the result before the next call."""
    o, c = w.out_channels, w.in_channels
    scale = _per_channel(scale, o)
    weight = w.words.contiguous()
    numel = o * c * w.taps
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _scratch.buf = torch.empty(numel, dtype=torch.float32)
    out = buf[:numel].view(w.shape)
    err = library().dbgen_unpack_weight(
        weight.data_ptr(),
        o,
        weight.shape[1],
        c,
        w.taps,
        _ptr(scale),
        out.data_ptr(),
        ISA_CODES[isa(path)],
        torch.get_num_threads(),
    )
    _status(err, "dbgen_unpack_weight")
    return out


def packed_weight_conv2d(x: torch.Tensor, w: PackedWeight, scale, bias, stride, padding) -> torch.Tensor:
    """Float activations x packed weights: ``conv2d(x, +-scale) + bias`` by oneDNN on the weight the kernels
    expand from the bits (:func:`signed_weight`), in float32, cast to ``x.dtype``. The training path's own
    product (``sign(v) * scale``), so within a fan-in's rounding of the reference."""
    b = _per_channel(bias, w.out_channels)
    y = F.conv2d(x.float(), signed_weight(w, scale), b, tuple(stride), tuple(padding))
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def packed_weight_linear(x: torch.Tensor, w: PackedWeight, scale, bias) -> torch.Tensor:
    """Float activations x packed weights, linear: ``x @ (+-scale).T + bias`` (see :func:`packed_weight_conv2d`)."""
    y = F.linear(x.float(), signed_weight(w, scale), _per_channel(bias, w.out_channels))
    return y if x.dtype == torch.float32 else y.to(x.dtype)
