"""Build-on-first-use of the CUDA kernels (``kernels/binary_kernels.cu``) and their ctypes bindings.

The source is compiled by ``nvcc`` into a shared library (no torch headers, no C++ extension ABI: the kernels
take raw device pointers and torch's current stream), cached under ``$DBGEN_KERNEL_CACHE`` (default
``~/.cache/dbgen/kernels``) by a hash of the source, the nvcc version and the target architecture. The build
writes to a temporary name and renames atomically, so concurrent workers at worst build twice.

Requirements, each checked with an error that names what is missing: a CUDA device of compute capability
>= 8.0 (1-bit ``mma.sync`` tensor cores), ``nvcc`` (``$CUDA_HOME/bin/nvcc``, ``/usr/local/cuda/bin/nvcc`` or
on ``PATH``), and the kernel source (``$DBGEN_KERNELS_SRC``, else the repository's ``kernels/`` folder, which
installs with the package as ``dbgen._kernels_src``: a wheel or ``pip install .`` can build the kernels).

For tests without a GPU, :func:`build_emulator` compiles the same source with g++ against
``kernels/host_emulation.h`` (CPU threads; mma and warp primitives emulated) and :func:`set_emulator` routes
the ``*_cuda`` calls for CPU tensors to it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

import torch

from . import sources
from .packing import PackedWeight
from .sources import KernelUnavailable

__all__ = [
    "KernelUnavailable",
    "build_library",
    "find_nvcc",
    "kernel_source",
    "library",
]

log = logging.getLogger(__name__)

MIN_CAPABILITY = (8, 0)
SOURCE_NAME = "binary_kernels.cu"
ABI_VERSION = 3
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_OUT_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
OUT_PACKED = 3

_lock = threading.Lock()
_libs: dict[str, ctypes.CDLL] = {}
_emulator: ctypes.CDLL | None = None
_counters: dict[tuple, torch.Tensor] = {}  # split-K tile counters per (device, stream); kernels leave them zero
EMULATED_SMS = 4  # multiprocessor count the split heuristics assume under emulation


def kernel_source() -> Path:
    """Path of the CUDA source (:func:`dbgen.kernels.sources.kernel_source`)."""
    return sources.kernel_source(SOURCE_NAME)


def find_nvcc() -> str:
    """The nvcc executable: $CUDA_HOME/bin/nvcc, /usr/local/cuda/bin/nvcc, or nvcc on PATH."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "bin" / "nvcc")
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("nvcc")
    if found:
        return found
    raise KernelUnavailable(
        "nvcc not found (looked in $CUDA_HOME/bin, /usr/local/cuda/bin and PATH): the CUDA "
        "toolkit's compiler is needed to build dbgen's kernels on first use; install it or "
        "set DBGEN_KERNELS=reference to run the pure-PyTorch path"
    )


def _arch_flags(arch: str) -> list[str]:
    """``arch`` like "90" or "90a" -> nvcc -gencode flags (SASS for that chip only)."""
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def build_library(arch: str, out_dir: Path | None = None, nvcc: str | None = None, verbose: bool = False) -> Path:
    """Compile the kernels for ``arch`` (e.g. "90") into a shared library; returns its path (cached).

    The ptxas resource report (registers, shared memory, spills) is kept next to it as ``ptxas.log``.
    """
    nvcc = nvcc or find_nvcc()
    src = kernel_source()
    flags = ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-Xptxas", "-v", *_arch_flags(arch)]
    lib_path, report = sources.build_shared_library(nvcc, flags, src, "libdbgen_kernels.so", f"sm{arch}", out_dir)
    if report is not None:  # built now: ptxas wrote its resource report to stderr
        (lib_path.parent / "ptxas.log").write_text(report)
        if verbose:
            log.info("%s", report)
    return lib_path


def build_emulator(out_dir: Path, cxx: str = "g++", defines: tuple[str, ...] = ()) -> Path:
    """Compile the kernels for the CPU (host emulation, tests only); needs g++ and CUDA's headers.

    ``defines``: extra preprocessor symbols, e.g. the emulation's fault switches (kernels/host_emulation.h).
    """
    src = kernel_source()
    include = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
    if not (include / "cuda_bf16.h").is_file():
        raise KernelUnavailable(f"CUDA headers not found in {include} (set CUDA_HOME)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lib_path = out_dir / "libdbgen_kernels_emu.so"
    cmd = [
        cxx,
        "-std=c++20",
        "-O1",
        "-shared",
        "-fPIC",
        "-pthread",
        "-ffp-contract=off",
        "-DDBGEN_HOST_EMULATION",
        *(f"-D{d}" for d in defines),
        f"-I{include}",
        f"-I{src.parent}",
        "-x",
        "c++",
        str(src),
        "-o",
        str(lib_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise KernelUnavailable(f"{cxx} failed building the host emulation:\n{proc.stderr[-4000:]}")
    return lib_path


def set_emulator(lib: ctypes.CDLL | None) -> None:
    """Route the ``*_cuda`` functions for CPU tensors to a host-emulation library (None: turn off)."""
    global _emulator
    _emulator = lib


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
    lib.dbgen_abi_version.restype = i
    lib.dbgen_error_string.restype = ctypes.c_char_p
    lib.dbgen_error_string.argtypes = [i]
    lib.dbgen_pack_signs.restype = i
    lib.dbgen_pack_signs.argtypes = [p, i, p, ll, i, p]
    lib.dbgen_pack_activations.restype = i
    lib.dbgen_pack_activations.argtypes = [p, i, p, i, i, i, i, ll, ll, ll, ll, i, p]
    lib.dbgen_bconv.restype = i
    lib.dbgen_bconv.argtypes = [p] * 7 + [i, p, p] + [i] * 15 + [p]
    lib.dbgen_pwconv.restype = i
    lib.dbgen_pwconv.argtypes = [p, i, p, p, p, p, p, p] + [i] * 14 + [p]
    if lib.dbgen_abi_version() != ABI_VERSION:
        raise KernelUnavailable(f"kernel library ABI {lib.dbgen_abi_version()} != expected {ABI_VERSION}")
    return lib


def load_library(path: Path) -> ctypes.CDLL:
    """dlopen a built library and declare its entry points (works without a GPU: nothing runs)."""
    return _declare(ctypes.CDLL(str(path)))


def library(device: torch.device) -> ctypes.CDLL:
    """The kernel library for ``device``'s architecture, built on first use (raises KernelUnavailable)."""
    if not torch.cuda.is_available():
        raise KernelUnavailable("no CUDA device: torch.cuda.is_available() is False")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        raise KernelUnavailable(
            f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor}; the "
            f"1-bit tensor-core kernels need >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
            f"(use DBGEN_KERNELS=reference)"
        )
    arch = f"{major}{minor}"
    with _lock:
        if arch not in _libs:
            _libs[arch] = load_library(build_library(arch))
        return _libs[arch]


# ------------------------------------------------------------------------------------------- calls
def _check(lib, err: int, what: str) -> None:
    if err != 0:
        raise RuntimeError(
            f"dbgen kernel {what} failed: CUDA error {err} ({lib.dbgen_error_string(err).decode(errors='replace')})"
        )


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _env(device: torch.device):
    """(library, device index, stream, multiprocessor count) for launching on ``device``."""
    if device.type == "cpu" and _emulator is not None:
        return _emulator, 0, None, EMULATED_SMS
    if device.type != "cuda":
        raise KernelUnavailable(f"the CUDA kernels need CUDA tensors, got a tensor on {device}")
    stream = ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)
    return library(device), device.index, stream, torch.cuda.get_device_properties(device).multi_processor_count


def _aligned(t: torch.Tensor) -> torch.Tensor:
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _float_vec(t: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if t is None else t.detach().to(device=device, dtype=torch.float32).contiguous()


def _dtype_code(dtype: torch.dtype, what: str) -> int:
    if dtype not in _DTYPE_CODE:
        raise ValueError(f"{what}: dtype {dtype} not supported by the CUDA kernels (float32, float16, bfloat16)")
    return _DTYPE_CODE[dtype]


def _out(out: torch.Tensor | None, shape, dtype, device) -> torch.Tensor:
    """A fresh output, or the caller's (tests pass poisoned buffers to catch unwritten elements)."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(
            f"out: expected a contiguous {dtype} tensor of shape {tuple(shape)} on {device}, got "
            f"{out.dtype} {tuple(out.shape)} on {out.device}"
        )
    return out


def pack_signs_cuda(t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``dbgen.nn.pack_signs`` on the GPU (float32/16/bf16): flat uint8 bytes, LSB first, bit 1 = t >= 0."""
    lib, index, stream, _ = _env(t.device)
    t = t.detach().contiguous()
    n = t.numel()
    out = _out(out, ((n + 7) // 8,), torch.uint8, t.device)
    err = lib.dbgen_pack_signs(_ptr(t), _dtype_code(t.dtype, "pack_signs"), _ptr(out), n, index, stream)
    _check(lib, err, "pack_signs")
    return out


def pack_activations_cuda(x: torch.Tensor, channel_dim: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Activation words: (N, C, H, W) -> (N, H, W, Cw) for channel_dim 1; (..., C) -> (..., Cw) for -1."""
    lib, index, stream, _ = _env(x.device)
    x = x.detach()
    if channel_dim == 1:
        if x.dim() != 4:
            raise ValueError(f"pack_activations: expected (N, C, H, W), got {tuple(x.shape)}")
        n, c, h, w = x.shape
        strides = x.stride()
        lead = (n, h, w)
    else:
        c = x.shape[-1]
        x2 = x.reshape(-1, c)
        n, h, w = x2.shape[0], 1, 1
        strides = (x2.stride(0), x2.stride(1), 0, 0)
        lead = tuple(x.shape[:-1])
        x = x2
    cw = (c + 31) // 32
    out = _out(out, (n, h, w, cw), torch.int32, x.device)
    err = lib.dbgen_pack_activations(
        _ptr(x), _dtype_code(x.dtype, "pack_activations"), _ptr(out), n, c, h, w, *strides, index, stream
    )
    _check(lib, err, "pack_activations")
    return out.reshape(*lead, cw)


def _split_buffers(ks: int, n_out: int, tiles: int, dtype: torch.dtype, device, stream):
    """Split-K workspace (ks, n_out), uninitialized, and the zeroed tile counters of this device and stream."""
    if ks <= 1:
        return None, None
    key = (device, getattr(stream, "value", stream))
    counters = _counters.get(key)
    if counters is None or counters.numel() < tiles:
        counters = _counters[key] = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device)
    return torch.empty(ks, n_out, dtype=dtype, device=device), counters


def default_split(blocks: int, ksteps: int, sms: int) -> int:
    """Split K across blocks when the output tiles alone cannot fill the GPU (small batches)."""
    if blocks >= sms or ksteps < 4:
        return 1
    return max(1, min(ksteps // 2, (2 * sms + blocks - 1) // blocks, 16))


def pwconv_launch(
    pixels: int, o: int, k_words: int, dtype: torch.dtype, sms: int, tile: int | None = None, ksplit: int | None = None
) -> tuple[int, int, int]:
    """(tile, ksplit, blocks) of the packed-weight conv for ``pixels`` = N*Ho*Wo outputs of ``o`` channels,
    ``k_words`` = T*Cw weight words per channel, on ``sms`` multiprocessors: tile 0 (64 channels x 64 pixels)
    when it fills the GPU, else tile 1 (32 x 32); split-K when the tiles alone cannot fill it. The fp32
    split-K workspace is ``ksplit * pixels * o`` floats (none for ksplit 1)."""
    if tile is None:
        tile = 0 if ((pixels + 63) // 64) * ((o + 63) // 64) >= sms else 1
    bm = 64 if tile == 0 else 32
    kc = 1 if dtype == torch.float32 else 4  # weight words per K chunk (the kernel's KC)
    blocks = ((pixels + bm - 1) // bm) * ((o + bm - 1) // bm)
    if ksplit is None:
        ksplit = default_split(blocks, (k_words + kc - 1) // kc, sms)
    return tile, ksplit, blocks


STATIONARY_SMEM = 110 * 1024  # weight rows kept in shared memory: at most about half an SM's


def _bconv_tile(np_: int, o: int, kw: int, sms: int, tile: int | None) -> int:
    """Binary conv tile: 1 (32x32, streamed weights, split-K) when 64x64 tiles cannot fill the GPU; else the
    weight-stationary 3 (256 channels x 32 pixels) or 2 (128 x 64) if their weight rows fit, else 0 (64x64)."""
    if tile is not None:
        return tile
    if ((np_ + 63) // 64) * ((o + 63) // 64) < sms:
        return 1
    if o > 128 and 256 * (kw + 4) * 4 <= STATIONARY_SMEM:
        return 3
    if 128 * (kw + 4) * 4 <= STATIONARY_SMEM:
        return 2
    return 0


def bconv_cuda(
    words: torch.Tensor,
    channels: int,
    w: PackedWeight,
    scale,
    bias,
    stride,
    padding,
    *,
    out_dtype: torch.dtype = torch.float32,
    pack_output: bool = False,
    tile: int | None = None,
    ksplit: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fully binary conv on activation words (N, H, W, Cw) -> (N, O, Ho, Wo) or output words (N, Ho, Wo, Ow)."""
    dev = words.device
    lib, index, stream, sms = _env(dev)
    n, h, wd, cw = words.shape
    kh, kw = w.kernel_size
    (sh, sw), (ph, pw) = stride, padding
    ho, wo = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    o = w.out_channels
    cv, wtot = w.valid_tap_tables(h, wd, stride, padding)
    words = _aligned(words.contiguous())  # the kernel reads 16-byte vectors of words
    wwords = _aligned(w.words.contiguous())
    scale, bias = _float_vec(scale, dev), _float_vec(bias, dev)
    if pack_output:
        out = _out(out, (n, ho, wo, (o + 31) // 32), torch.int32, dev)
        mode = OUT_PACKED
    else:
        if out_dtype not in _OUT_CODE:
            raise ValueError(f"binary conv: out_dtype {out_dtype} not supported (float32, float16, bfloat16)")
        out = _out(out, (n, o, ho, wo), out_dtype, dev)
        mode = _OUT_CODE[out_dtype]
    t = _bconv_tile(n * ho * wo, o, wwords.shape[1], sms, tile)
    bm = 32 if t == 1 else 64  # split-K tiles (streamed-weight tiles only)
    blocks = ((n * ho * wo + bm - 1) // bm) * ((o + bm - 1) // bm)
    ks = ksplit if ksplit is not None else default_split(blocks, wwords.shape[1] // 8, sms)
    ks = 1 if t >= 2 else ks
    ws, counters = _split_buffers(ks, n * o * ho * wo, blocks, torch.int32, dev, stream)
    err = lib.dbgen_bconv(
        _ptr(words),
        _ptr(wwords),
        _ptr(cv),
        _ptr(wtot),
        _ptr(scale),
        _ptr(bias),
        _ptr(out),
        mode,
        _ptr(ws),
        _ptr(counters),
        n,
        channels,
        h,
        wd,
        o,
        kh,
        kw,
        sh,
        sw,
        ph,
        pw,
        wwords.shape[1],
        t,
        ks,
        index,
        stream,
    )
    _check(lib, err, "binary conv")
    return out


def pwconv_cuda(
    x: torch.Tensor,
    w: PackedWeight,
    scale,
    bias,
    stride,
    padding,
    *,
    tile: int | None = None,
    ksplit: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float (N, C, H, W) x packed weights -> (N, O, Ho, Wo) of x.dtype (input read channels-last)."""
    dev = x.device
    lib, index, stream, sms = _env(dev)
    code = _dtype_code(x.dtype, "packed-weight conv")
    n, c, h, wd = x.shape
    kh, kw = w.kernel_size
    (sh, sw), (ph, pw) = stride, padding
    ho, wo = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    o = w.out_channels
    xl = x.detach().permute(0, 2, 3, 1).contiguous()  # (N, H, W, C); free if x is channels_last already
    wT = w.transposed_words()
    scale, bias = _float_vec(scale, dev), _float_vec(bias, dev)
    out = _out(out, (n, o, ho, wo), x.dtype, dev)
    t, ks, blocks = pwconv_launch(n * ho * wo, o, wT.shape[0], x.dtype, sms, tile, ksplit)
    ws, counters = _split_buffers(ks, n * o * ho * wo, blocks, torch.float32, dev, stream)
    err = lib.dbgen_pwconv(
        _ptr(xl),
        code,
        _ptr(wT),
        _ptr(scale),
        _ptr(bias),
        _ptr(out),
        _ptr(ws),
        _ptr(counters),
        n,
        c,
        h,
        wd,
        o,
        kh,
        kw,
        sh,
        sw,
        ph,
        pw,
        t,
        ks,
        index,
        stream,
    )
    _check(lib, err, "packed-weight conv")
    return out
