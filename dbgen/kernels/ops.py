"""The public ops: CUDA kernels for CUDA tensors, the bitwise CPU kernels for CPU tensors, and the exact
pure-PyTorch reference, which every kernel matches.

``DBGEN_KERNELS`` (:func:`backend`): ``auto`` (default) uses the CUDA kernels for CUDA tensors (raising
:class:`~dbgen.kernels.sources.KernelUnavailable` with what is missing if they cannot be built) and the CPU
kernels for CPU tensors where they build (else one warning, then the reference); ``cpu`` forces the CPU
kernels for CPU tensors (raising if they cannot be had); ``reference`` forces the reference everywhere. On the
CPU (:mod:`dbgen.kernels.cpu`) the fully binary ops run whole in the kernels (window gather, AND-popcount
product, epilogue, output sign packing) and so does sign packing; the packed-weight ops (float activations)
expand the bits into a float weight for oneDNN's conv, one layer at a time.
"""

from __future__ import annotations

import logging
import os

import torch
from torch.nn.modules.utils import _pair

from ..nn.packing import pack_signs as _pack_signs_torch
from . import reference as ref
from .packing import PackedActivation, PackedWeight

__all__ = [
    "backend",
    "kernels_missing",
    "binary_act_conv2d",
    "binary_act_linear",
    "pack_activations",
    "pack_signs",
    "packed_weight_conv2d",
    "packed_weight_linear",
]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CHOICES = ("auto", "reference", "cuda", "cpu")

log = logging.getLogger(__name__)
_cpu_missing: list[str | None] = []  # why the CPU kernels cannot be had (None: they can), found once per process


def backend(device: torch.device | str) -> str:
    """ "cuda", "cpu" (the kernels) or "reference" for tensors on ``device`` (see the module docstring)."""
    device = torch.device(device)
    choice = os.environ.get("DBGEN_KERNELS", "auto")
    if choice not in _CHOICES:
        raise ValueError(f"DBGEN_KERNELS={choice!r}: expected one of {', '.join(_CHOICES)}")
    if choice == "reference":
        return "reference"
    if device.type == "cuda":
        return "cuda"
    if device.type != "cpu" or choice == "cuda":
        return "reference"
    if not _cpu_missing:
        try:
            _cpu().library()
            _cpu_missing.append(None)
        except _cpu().KernelUnavailable as e:
            _cpu_missing.append(str(e))
            if choice == "auto":
                log.warning("the CPU kernels cannot be built (%s): using the PyTorch reference", e)
    if _cpu_missing[0] is None:
        return "cpu"
    if choice == "cpu":
        raise _cpu().KernelUnavailable(f"DBGEN_KERNELS=cpu: {_cpu_missing[0]}")
    return "reference"


def kernels_missing(device: torch.device | str) -> str | None:
    """Why the packed ops cannot run on ``device`` now, or None when they can. The reference (and with it every
    CPU tensor under ``DBGEN_KERNELS=auto``: the CPU kernels, or the reference where they do not build) always
    can; on CUDA the kernel library must build (nvcc, on first use, cached) and load for the device's
    architecture (sm_80 or newer); ``DBGEN_KERNELS=cpu`` needs the CPU kernels."""
    device = torch.device(device)
    try:
        if backend(device) != "cuda":
            return None
    except _cpu().KernelUnavailable as e:  # DBGEN_KERNELS=cpu without the CPU kernels
        return str(e)
    cuda = _cuda()
    try:
        cuda.library(device)
    except cuda.KernelUnavailable as e:
        return str(e)
    return None


def _cpu():
    from . import cpu  # imported lazily: builds nothing until a CPU tensor reaches a packed op

    return cpu


def _cuda():
    from . import cuda  # imported lazily: nothing CUDA-related is touched on CPU-only runs

    return cuda


def pack_signs(t: torch.Tensor) -> torch.Tensor:
    """:func:`dbgen.nn.pack_signs` (same bytes), with a GPU kernel for float CUDA tensors."""
    if backend(t.device) == "cuda" and t.dtype in _KERNEL_DTYPES:
        return _cuda().pack_signs_cuda(t)
    return _pack_signs_torch(t)


def pack_activations(x: torch.Tensor, layout: str | None = None) -> PackedActivation:
    """Signs of ``x`` (``x >= 0`` -> +1) straight into packed words, no float +-1 tensor in between.

    ``layout="conv"``: x (N, C, H, W) -> words (N, H, W, Cw); ``"linear"``: x (..., C) -> (..., Cw).
    Default: conv for 4-d inputs, linear otherwise.
    """
    if isinstance(x, PackedActivation):
        return x
    layout = layout or ("conv" if x.dim() == 4 else "linear")
    if layout not in ("conv", "linear"):
        raise ValueError(f"pack_activations: layout must be 'conv' or 'linear', got {layout!r}")
    if layout == "conv" and x.dim() != 4:
        raise ValueError(f"pack_activations: conv layout needs (N, C, H, W), got shape {tuple(x.shape)}")
    channel_dim = 1 if layout == "conv" else -1
    kind = backend(x.device)
    if kind == "cuda" and x.dtype in _KERNEL_DTYPES:
        return PackedActivation(_cuda().pack_activations_cuda(x, channel_dim), x.shape[channel_dim])
    if kind == "cpu" and x.is_floating_point() and x.shape[channel_dim] > 0:
        return _cpu().pack_activations(x, channel_dim)
    return ref.pack_activations_ref(x, channel_dim)


def _check_weight(w, in_channels: int, device: torch.device, what: str, conv: bool) -> None:
    if not isinstance(w, PackedWeight):
        raise TypeError(
            f"{what}: w_packed must be a PackedWeight (PackedWeight.from_signs(weight) or "
            f".from_pack_signs(bytes, shape)), got {type(w).__name__}"
        )
    if w.words.device != device:
        raise ValueError(
            f"{what}: input is on {device} but the packed weight is on {w.words.device} (use w_packed.to(device))"
        )
    if conv and len(w.shape) != 4:
        raise ValueError(f"{what}: needs a conv weight (O, C, KH, KW), got shape {w.shape}")
    if not conv and w.kernel_size != (1, 1):
        raise ValueError(f"{what}: needs a linear weight (O, C), got shape {w.shape}")
    if w.in_channels != in_channels:
        raise ValueError(f"{what}: input has {in_channels} channels, weight {w.shape} expects {w.in_channels}")


def binary_act_conv2d(
    x,
    w_packed: PackedWeight,
    scale=None,
    bias=None,
    stride=1,
    padding=0,
    *,
    out_dtype: torch.dtype | None = None,
    pack_output: bool = False,
):
    """Fully binary conv: ``conv2d(sign(x), sign(w)) * scale + bias`` per output channel, zero padding.

    ``x``: a :class:`PackedActivation` (N, H, W, Cw) or a float (N, C, H, W) tensor whose signs are taken
    (``x >= 0`` -> +1; a +-1 tensor is used as is). The integer dot product is exact. Returns (N, O, Ho, Wo)
    of ``out_dtype`` (default: x's float dtype, float32 for packed x), or with ``pack_output`` the
    :class:`PackedActivation` of the output's signs (fused: no float tensor is written).
    """
    stride, padding = _pair(stride), _pair(padding)
    if not isinstance(x, PackedActivation):
        if out_dtype is None and x.is_floating_point():
            out_dtype = x.dtype
        x = pack_activations(x, "conv")
    if x.words.dim() != 4:
        raise ValueError(f"binary_act_conv2d: activation words must be (N, H, W, Cw), got {tuple(x.words.shape)}")
    _check_weight(w_packed, x.channels, x.device, "binary_act_conv2d", conv=True)
    out_dtype = out_dtype or torch.float32
    if backend(x.device) == "cuda":
        out = _cuda().bconv_cuda(
            x.words, x.channels, w_packed, scale, bias, stride, padding, out_dtype=out_dtype, pack_output=pack_output
        )
        return PackedActivation(out, w_packed.out_channels) if pack_output else out
    if backend(x.device) == "cpu":
        return _cpu().binary_conv2d(
            x, w_packed, scale, bias, stride, padding, out_dtype=out_dtype, pack_output=pack_output
        )
    return ref.binary_conv2d_ref(
        x, w_packed, scale, bias, stride, padding, out_dtype=out_dtype, pack_output=pack_output
    )


def binary_act_linear(
    x, w_packed: PackedWeight, scale=None, bias=None, *, out_dtype: torch.dtype | None = None, pack_output: bool = False
):
    """Fully binary linear: ``sign(x) @ sign(w).T * scale + bias``; x (..., C) float or packed (..., Cw)."""
    if not isinstance(x, PackedActivation):
        if out_dtype is None and x.is_floating_point():
            out_dtype = x.dtype
        x = pack_activations(x, "linear")
    _check_weight(w_packed, x.channels, x.device, "binary_act_linear", conv=False)
    out_dtype = out_dtype or torch.float32
    if backend(x.device) == "cuda":
        lead = x.words.shape[:-1]
        words = x.words.reshape(-1, 1, 1, x.words.shape[-1])  # linear = 1x1 conv over M "pixels"
        out = _cuda().bconv_cuda(
            words, x.channels, w_packed, scale, bias, (1, 1), (0, 0), out_dtype=out_dtype, pack_output=pack_output
        )
        if pack_output:
            return PackedActivation(out.reshape(*lead, out.shape[-1]), w_packed.out_channels)
        return out.reshape(*lead, w_packed.out_channels)
    if backend(x.device) == "cpu":
        return _cpu().binary_linear(x, w_packed, scale, bias, out_dtype=out_dtype, pack_output=pack_output)
    return ref.binary_linear_ref(x, w_packed, scale, bias, out_dtype=out_dtype, pack_output=pack_output)


def packed_weight_conv2d(x: torch.Tensor, w_packed: PackedWeight, scale=None, bias=None, stride=1, padding=0):
    """Float activations x binary weights: ``conv2d(x, sign(w)) * scale + bias``, output in x.dtype.

    On CUDA the kernel reads the packed weight bits and makes +-1 tensor-core operands in registers: no
    dequantized weight tensor is written to device memory.
    """
    stride, padding = _pair(stride), _pair(padding)
    if x.dim() != 4:
        raise ValueError(f"packed_weight_conv2d: expected x (N, C, H, W), got shape {tuple(x.shape)}")
    _check_weight(w_packed, x.shape[1], x.device, "packed_weight_conv2d", conv=True)
    kind = backend(x.device)
    if kind == "cuda" and x.dtype in _KERNEL_DTYPES:
        return _cuda().pwconv_cuda(x, w_packed, scale, bias, stride, padding)
    if kind == "cpu":
        return _cpu().packed_weight_conv2d(x, w_packed, scale, bias, stride, padding)
    return ref.packed_weight_conv2d_ref(x, w_packed, scale, bias, stride, padding)


def packed_weight_linear(x: torch.Tensor, w_packed: PackedWeight, scale=None, bias=None):
    """Float activations x binary weights: ``x @ sign(w).T * scale + bias``, x (..., C), output in x.dtype."""
    _check_weight(w_packed, x.shape[-1], x.device, "packed_weight_linear", conv=False)
    kind = backend(x.device)
    if kind == "cuda" and x.dtype in _KERNEL_DTYPES:
        lead = x.shape[:-1]
        x4 = x.reshape(-1, x.shape[-1], 1, 1)
        out = _cuda().pwconv_cuda(x4, w_packed, scale, bias, (1, 1), (0, 0))
        return out.reshape(*lead, w_packed.out_channels)
    if kind == "cpu":
        return _cpu().packed_weight_linear(x, w_packed, scale, bias)
    return ref.packed_weight_linear_ref(x, w_packed, scale, bias)
