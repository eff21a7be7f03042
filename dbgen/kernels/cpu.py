"""Build-on-first-use of the bitwise CPU kernels (``kernels/cpu_bitwise.cpp``) and their ctypes bindings.

The source is compiled by ``g++`` into a plain shared library: no torch headers and no C++-extension ABI, so
it builds in about a second (a torch extension's translation unit takes ~45 s on 2 cores) and one build serves
every torch version. It is cached under ``$DBGEN_KERNEL_CACHE`` by a hash of the source, the compiler's version
and the flags; the build writes a temporary name and renames it, so concurrent processes at worst build twice.

One library holds every instruction-set path (:data:`ISAS`); the fastest this CPU runs is chosen once per
process, or ``DBGEN_CPU_ISA=avx512|avx2|scalar`` forces one (an error when the CPU lacks it). ``avx512`` is
VPOPCNTDQ where the CPU has it, else AVX-512BW's nibble lookup. The kernels run on ``torch.get_num_threads()``
threads, so ``torch.set_num_threads`` governs them as it does torch's own ops.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import threading
from pathlib import Path

import torch

from . import reference as ref
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
    "supported_isas",
]

SOURCE_NAME = "cpu_bitwise.cpp"
ABI_VERSION = 2
# The library's paths, slowest first: the name DBGEN_CPU_ISA takes and the codes the library knows it by.
ISAS = {"scalar": (0,), "avx2": (1,), "avx512": (3, 2)}  # avx512: VPOPCNTDQ, else the AVX-512BW nibble lookup
ISA_CODES = {"scalar": 0, "avx2": 1, "avx512bw": 2, "avx512vpopcntdq": 3}
K_MULTIPLE = 16  # words per row the kernels take: one 512-bit vector (rows are padded with zero words)
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-ffp-contract=off"]  # no fused multiply-add

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


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
            lib.dbgen_and_popcount_matmul.restype = i
            lib.dbgen_and_popcount_matmul.argtypes = [p, p, p, ll, ll, ll, i, i]
            lib.dbgen_binary_dot_epilogue.restype = i
            lib.dbgen_binary_dot_epilogue.argtypes = [p, p, ll, ll, ll, p, p, ll, p, p, p, i, i]
            if lib.dbgen_cpu_abi_version() != ABI_VERSION:
                raise KernelUnavailable(f"CPU kernel library ABI {lib.dbgen_cpu_abi_version()} != {ABI_VERSION}")
            _lib = lib
        return _lib


def supported_isas() -> list[str]:
    """The library's paths this CPU runs (``scalar`` always), by their codes' names, slowest first."""
    mask = library().dbgen_cpu_isas()
    return [name for name, code in ISA_CODES.items() if mask >> code & 1]


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


def _padded(words: torch.Tensor) -> torch.Tensor:
    """int32 rows padded with zero words to :data:`K_MULTIPLE` (zero words add nothing to an AND-popcount)."""
    return torch.nn.functional.pad(words.to(torch.int32), (0, -words.shape[1] % K_MULTIPLE)).contiguous()


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"and_popcount_matmul: expected (M, K) and (O, K), got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device.type != "cpu" or b.device.type != "cpu":
        raise ValueError(f"the CPU kernels need CPU tensors, got {a.device} and {b.device}")


def _status(err: int, what: str) -> None:
    if err:
        raise RuntimeError(f"{what} failed with code {err} (1: the CPU lacks the path, 2: bad sizes)")


def and_popcount_matmul(a: torch.Tensor, b: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """``out[i, o] = sum_k popc(a[i, k] AND b[o, k])`` for int32 words a (M, K), b (O, K) -> int64 (M, O), on
    the CPU kernels (``path``: see :func:`isa`). The same integers as
    :func:`dbgen.kernels.reference.and_popcount_matmul`."""
    _check(a, b)
    code = ISA_CODES[isa(path)]
    a, b = _padded(a), _padded(b)
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.int64)
    if out.numel():
        err = library().dbgen_and_popcount_matmul(
            a.data_ptr(), b.data_ptr(), out.data_ptr(), *out.shape, a.shape[1], code, torch.get_num_threads()
        )
        _status(err, "dbgen_and_popcount_matmul")
    return out


def _dot_epilogue(a, b, xs, cv, scale, bias, path=None) -> torch.Tensor:
    """float32 (M, O): ``float32(4 popc(a AND b) - 2 xs[i] + cv[o, i % P]) * scale[o] + bias[o]``, each
    operation rounded to float32 (the reference's :func:`~dbgen.kernels.reference._epilogue`)."""
    _check(a, b)
    code = ISA_CODES[isa(path)]
    a, b = _padded(a), _padded(b)
    m, o = a.shape[0], b.shape[0]
    xs = xs.to(torch.int64).contiguous()
    cv = cv.to(torch.int32).contiguous()
    scale = None if scale is None else torch.as_tensor(scale, dtype=torch.float32).reshape(o).contiguous()
    bias = None if bias is None else torch.as_tensor(bias, dtype=torch.float32).reshape(o).contiguous()
    out = torch.empty(m, o, dtype=torch.float32)
    if out.numel():
        err = library().dbgen_binary_dot_epilogue(
            a.data_ptr(),
            b.data_ptr(),
            m,
            o,
            a.shape[1],
            xs.data_ptr(),
            cv.data_ptr(),
            cv.shape[1],
            None if scale is None else scale.data_ptr(),
            None if bias is None else bias.data_ptr(),
            out.data_ptr(),
            code,
            torch.get_num_threads(),
        )
        _status(err, "dbgen_binary_dot_epilogue")
    return out


def binary_conv2d(x: PackedActivation, w: PackedWeight, scale, bias, stride, padding, *, out_dtype, pack_output):
    """:func:`dbgen.kernels.reference.binary_conv2d_ref` with the product and epilogue on the CPU kernels: the
    same floats and bits (the im2col of the words is the reference's)."""
    cols, xs, cv, (n, ho, wo) = ref.conv_operands(x, w, stride, padding)
    y = _dot_epilogue(cols, w.tap_words(), xs, cv, scale, bias)
    return ref.conv_output(y, n, ho, wo, out_dtype, pack_output)


def binary_linear(x: PackedActivation, w: PackedWeight, scale, bias, *, out_dtype, pack_output):
    """:func:`dbgen.kernels.reference.binary_linear_ref` on the CPU kernels (the same floats and bits)."""
    words, xs, cv = ref.linear_operands(x, w)
    y = _dot_epilogue(words, w.tap_words(), xs, cv, scale, bias)
    return ref.linear_output(y, x.words.shape[:-1], out_dtype, pack_output)
