"""Pure-PyTorch reference of every kernel, bit-for-bit on the fully binary path; used automatically without CUDA.

Vectorized torch ops only (no Python loops over elements), so it runs on any device. The fully binary conv
works on the packed words themselves: im2col of the words (zero words for padded pixels), AND with the
weight rows, popcount, then the exact integer correction of :mod:`dbgen.kernels.packing`. The epilogue is
``y = float32(dot) * scale + bias`` rounded op by op (the CUDA kernel uses the same ``__fmul_rn``/``__fadd_rn``),
so the float outputs and the fused sign bits match the kernels exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .packing import PackedActivation, PackedWeight, pack_bits_lastdim, popcount32

__all__ = [
    "and_popcount_matmul",
    "binary_conv2d_ref",
    "binary_linear_ref",
    "pack_activations_ref",
    "packed_weight_conv2d_ref",
    "packed_weight_linear_ref",
]

# Elements of the (rows, O, K) intermediate of the AND-popcount product per chunk: 128 KB of int64 stays in
# cache and under torch's intra-op parallel grain (measured ~5x faster than big chunks on 2 shared cores).
_CHUNK_ELEMENTS = 1 << 14


def pack_activations_ref(x: torch.Tensor, channel_dim: int) -> PackedActivation:
    """Signs of ``x`` packed along ``channel_dim`` (1 for NCHW conv inputs, -1 for linear inputs)."""
    c = x.shape[channel_dim]
    bits = torch.movedim(x.detach() >= 0, channel_dim, -1)
    return PackedActivation(pack_bits_lastdim(bits).contiguous(), c)


def _popcount64_(v: torch.Tensor) -> torch.Tensor:
    """In-place popcount of int64 words (two's complement bit patterns; all shifts are masked)."""
    v.sub_((v >> 1) & 0x5555555555555555)
    v.copy_((v & 0x3333333333333333) + ((v >> 2) & 0x3333333333333333))
    v.add_(v >> 4).bitwise_and_(0x0F0F0F0F0F0F0F0F)
    v.add_(v >> 8).add_(v >> 16).add_(v >> 32)
    return v.bitwise_and_(0x7F)


def and_popcount_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out[i, o] = sum_k popc(a[i, k] AND b[o, k])`` for int32 words a (M, K), b (O, K) -> int64 (M, O)."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"and_popcount_matmul: K mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.shape[1] % 2:  # pair words into int64 (any fixed pairing works: both sides use the same one)
        a, b = F.pad(a, (0, 1)), F.pad(b, (0, 1))
    a64 = a.contiguous().view(torch.int64)  # (M, K/2)
    b64 = b.contiguous().view(torch.int64)  # (O, K/2)
    m, o, k = a64.shape[0], b64.shape[0], a64.shape[1]
    out = torch.empty(m, o, dtype=torch.int64, device=a.device)
    rows = max(1, _CHUNK_ELEMENTS // max(1, o * k))
    for i in range(0, m, rows):  # chunks of rows bound the memory; the work inside is vectorized
        t = a64[i : i + rows, None, :] & b64[None, :, :]  # (rows, O, K/2)
        out[i : i + rows] = _popcount64_(t).sum(dim=-1)
    return out


def _epilogue(dot: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """float32(dot) * scale + bias, each op rounded to float32 (dot has channels last)."""
    y = dot.to(torch.float32)
    if scale is not None:
        y = y * scale.to(torch.float32)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y


def _conv_operands(x: PackedActivation, w: PackedWeight, stride, padding):
    """What the fully binary conv's integer dot product is made of: ``(cols, xs, cv, (n, ho, wo))`` with
    ``cols`` (N*Ho*Wo, KH*KW*Cw) the im2col of the activation words (zero words in the padding, so padded
    pixels have no +1 bits at all), ``xs`` (N*Ho*Wo,) int64 the +1 bits under each output pixel's window and
    ``cv`` (O, Ho*Wo) int32 the valid-tap correction; then ``dot = 4 popc(cols AND w) - 2 xs + cv``."""
    n, h, wd, cw = x.words.shape
    kh, kw = w.kernel_size
    (sh, sw), (ph, pw) = stride, padding
    ho, wo = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    xp = F.pad(x.words, (0, 0, pw, pw, ph, ph))  # (N, H+2ph, W+2pw, Cw)
    cols = xp.unfold(1, kh, sh).unfold(2, kw, sw)  # (N, Ho, Wo, Cw, KH, KW)
    cols = cols.permute(0, 1, 2, 4, 5, 3).reshape(n * ho * wo, kh * kw * cw)  # K = (tap, word)
    pc = F.pad(x.pixel_popcount(), (pw, pw, ph, ph))  # (N, H+2ph, W+2pw)
    xs = pc.unfold(1, kh, sh).unfold(2, kw, sw).sum(dim=(-1, -2)).reshape(-1)  # (N*Ho*Wo,)
    cv, _ = w.valid_tap_tables(h, wd, stride, padding)  # (O, Ho, Wo)
    return cols, xs.to(torch.int64), cv.reshape(w.out_channels, ho * wo), (n, ho, wo)


def _conv_output(y: torch.Tensor, n: int, ho: int, wo: int, out_dtype: torch.dtype, pack_output: bool):
    """The conv's result from ``y`` (N*Ho*Wo, O) float32: (N, O, Ho, Wo) of ``out_dtype``, or the
    :class:`PackedActivation` of its signs."""
    y = y.reshape(n, ho, wo, y.shape[-1])
    if pack_output:
        return PackedActivation(pack_bits_lastdim(y >= 0).contiguous(), y.shape[-1])
    return y.permute(0, 3, 1, 2).to(out_dtype).contiguous()


def binary_conv2d_ref(
    x: PackedActivation,
    w: PackedWeight,
    scale,
    bias,
    stride,
    padding,
    *,
    out_dtype: torch.dtype = torch.float32,
    pack_output: bool = False,
):
    """Fully binary conv: conv2d(+-1 x, +-1 w) * scale + bias (per output channel), exact integer dot.

    Returns a (N, O, Ho, Wo) tensor of ``out_dtype``, or with ``pack_output`` the :class:`PackedActivation`
    of its signs (the fused sign of the next binary layer's input).
    """
    cols, xs, cv, (n, ho, wo) = _conv_operands(x, w, stride, padding)
    p = and_popcount_matmul(cols, w.tap_words())  # (N*Ho*Wo, O)
    dot = 4 * p - 2 * xs[:, None] + cv.to(torch.int64).t().repeat(n, 1)
    return _conv_output(_epilogue(dot, scale, bias), n, ho, wo, out_dtype, pack_output)


def _linear_operands(x: PackedActivation, w: PackedWeight):
    """``(words, xs, cv)`` of the fully binary linear, as :func:`_conv_operands` (one "pixel": cv (O, 1))."""
    words = x.words.reshape(-1, x.words.shape[-1])
    xs = popcount32(words).sum(dim=-1).to(torch.int64)  # (M,)
    return words, xs, w.tap_corr[:, :1].contiguous()


def binary_linear_ref(
    x: PackedActivation,
    w: PackedWeight,
    scale,
    bias,
    *,
    out_dtype: torch.dtype = torch.float32,
    pack_output: bool = False,
):
    """Fully binary linear: (+-1 x) @ (+-1 w).T * scale + bias; x words (..., Cw)."""
    words, xs, cv = _linear_operands(x, w)
    p = and_popcount_matmul(words, w.tap_words())  # (M, O)
    y = _epilogue(4 * p - 2 * xs[:, None] + cv.to(torch.int64)[:, 0], scale, bias)
    return _linear_output(y, x.words.shape[:-1], out_dtype, pack_output)


def _linear_output(y: torch.Tensor, lead, out_dtype: torch.dtype, pack_output: bool):
    """The linear's result from ``y`` (M, O) float32: (..., O) of ``out_dtype``, or its packed signs."""
    y = y.reshape(*lead, y.shape[-1])
    if pack_output:
        return PackedActivation(pack_bits_lastdim(y >= 0).contiguous(), y.shape[-1])
    return y.to(out_dtype)


def packed_weight_conv2d_ref(x: torch.Tensor, w: PackedWeight, scale, bias, stride, padding) -> torch.Tensor:
    """Float activations x binary weights: conv2d(x, +-1 w) * scale + bias in float32, cast to ``x.dtype``."""
    y = F.conv2d(x.float(), w.signs(torch.float32).to(x.device), None, tuple(stride), tuple(padding))
    y = _epilogue(y.permute(0, 2, 3, 1), scale, bias).permute(0, 3, 1, 2)
    return y.to(x.dtype).contiguous()


def packed_weight_linear_ref(x: torch.Tensor, w: PackedWeight, scale, bias) -> torch.Tensor:
    y = F.linear(x.float(), w.signs(torch.float32).to(x.device))
    return _epilogue(y, scale, bias).to(x.dtype)
