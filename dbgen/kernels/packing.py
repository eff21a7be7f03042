"""Kernel bit layouts: packed activations and packed weights in 32-bit words along the channel axis.

``dbgen.nn.pack_signs`` stores a whole tensor as one flat bit string (element ``i`` -> byte ``i // 8`` bit
``i % 8``, LSB first, bit 1 = ``t >= 0``). A convolution needs the bits of one pixel's channels together, so
the kernels use the same bit convention in a different order:

* **Activations** (:class:`PackedActivation`): a conv input (N, C, H, W) becomes ``words`` (N, H, W, Cw) int32,
  ``Cw = ceil(C / 32)``: channel ``c`` of a pixel is bit ``c % 32`` of word ``c // 32``; the last word's unused
  high bits are 0. A linear input (..., C) becomes (..., Cw). For C a multiple of 32 this is exactly
  ``pack_signs(x.permute(0, 2, 3, 1))`` viewed as little-endian int32 words.
* **Weights** (:class:`PackedWeight`): a conv weight (O, C, KH, KW) becomes ``words`` (O, Kw) int32 with K
  ordered (tap, channel word): word ``t * Cw + j`` of row ``o`` holds channels ``32j .. 32j+31`` of tap
  ``t = ky * KW + kx`` (each tap's channels padded with 0 bits to ``Cw`` words), and the row zero-padded to
  ``Kw = ceil(T * Cw / 8) * 8`` words (whole 256-bit tensor-core K steps). A linear weight (O, C) is the
  1x1 case. :meth:`PackedWeight.from_pack_signs` converts from the ``pack_signs`` bytes of the latent
  weight (what :func:`dbgen.nn.packed_state_dict` stores) and :meth:`PackedWeight.to_pack_signs` back.

The +-1 dot product over the valid (non-padding) positions is computed from AND-popcounts (bit 1 = +1):

    dot = sum_valid (2w-1)(2x-1) = 4 * P - 2 * X + Cv,
    P  = sum_t popc(w_t AND x_t)            (the tensor-core product; zero padding bits contribute nothing)
    X  = sum_valid popc(x_t)                 (+1 inputs in the receptive field; padded pixels are 0 words)
    Cv = sum_valid (C - 2 popc(w_t))         (``tap_corr`` summed over the taps inside the image)

so a padded position contributes exactly 0, as ``F.conv2d`` on a +-1 input with zero padding does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..nn.packing import pack_signs, unpack_signs

__all__ = [
    "PackedActivation",
    "PackedWeight",
    "pack_bits_lastdim",
    "popcount32",
    "unpack_bits_lastdim",
]


def _shifts(device) -> torch.Tensor:
    return torch.arange(32, device=device, dtype=torch.int64)


def pack_bits_lastdim(bits: torch.Tensor) -> torch.Tensor:
    """Bool (..., C) -> int32 (..., ceil(C/32)): bit ``c % 32`` of word ``c // 32``, zero padding bits."""
    c = bits.shape[-1]
    cw = (c + 31) // 32
    if cw * 32 != c:
        bits = F.pad(bits, (0, cw * 32 - c))
    b = bits.reshape(*bits.shape[:-1], cw, 32).to(torch.int64)
    words = (b << _shifts(bits.device)).sum(dim=-1)  # (..., cw) in [0, 2^32)
    # Reinterpret as int32 two's complement (torch has no uint32 bitwise arithmetic on every device).
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_bits_lastdim(words: torch.Tensor, c: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits_lastdim`: int32 (..., Cw) -> bool (..., c)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    bits = ((w.unsqueeze(-1) >> _shifts(words.device)) & 1).bool()  # (..., Cw, 32)
    return bits.reshape(*words.shape[:-1], -1)[..., :c]


def popcount32(words: torch.Tensor) -> torch.Tensor:
    """Population count of each int32 word, as int64 (SWAR bit tricks; works on any device)."""
    v = words.to(torch.int64) & 0xFFFFFFFF
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return (v + (v >> 8) + (v >> 16) + (v >> 24)) & 0x3F


@dataclass
class PackedActivation:
    """Signs of an activation tensor, packed along channels (see the module docstring).

    ``words``: int32 (N, H, W, Cw) for a conv input or (..., Cw) for a linear input; ``channels``: the true C.
    """

    words: torch.Tensor
    channels: int

    def __post_init__(self):
        if self.words.dtype != torch.int32:
            raise ValueError(f"PackedActivation.words must be int32, got {self.words.dtype}")
        cw = (self.channels + 31) // 32
        if self.words.dim() < 1 or self.words.shape[-1] != cw:
            raise ValueError(
                f"PackedActivation: {self.channels} channels need {cw} words in the last dim, "
                f"got words of shape {tuple(self.words.shape)}"
            )

    @property
    def device(self) -> torch.device:
        return self.words.device

    def unpack(self, dtype: torch.dtype = torch.float32, layout: str = "auto") -> torch.Tensor:
        """The +-1 tensor: (N, C, H, W) for 4-d words (``layout="nchw"``), (..., C) otherwise."""
        x = unpack_bits_lastdim(self.words, self.channels).to(dtype) * 2 - 1
        if layout == "nchw" or (layout == "auto" and self.words.dim() == 4):
            return x.permute(0, 3, 1, 2).contiguous()
        return x

    def pixel_popcount(self) -> torch.Tensor:
        """Number of +1 channels per pixel, int64 of ``words.shape[:-1]``."""
        return popcount32(self.words).sum(dim=-1)


@dataclass
class PackedWeight:
    """Signs of a conv (O, C, KH, KW) or linear (O, C) weight in the kernels' layout (module docstring)."""

    words: torch.Tensor  # int32 (O, Kw), K ordered (tap, channel word), zero padded
    shape: tuple[int, ...]
    tap_corr: torch.Tensor  # int32 (O, T): C - 2 * popc(w_tap), the +-1 sum of -w over one tap
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # ---------------------------------------------------------------------------------- construction
    @classmethod
    def from_signs(cls, w: torch.Tensor) -> PackedWeight:
        """Pack ``w >= 0`` of a float weight (any values; only the signs are kept)."""
        return cls._from_bits(w.detach() >= 0, tuple(w.shape))

    @classmethod
    def from_pack_signs(cls, packed: torch.Tensor, shape) -> PackedWeight:
        """From the :func:`dbgen.nn.pack_signs` bytes of a weight of ``shape``."""
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (2, 4):
            raise ValueError(f"PackedWeight: expected a linear (O, C) or conv (O, C, KH, KW) shape, got {shape}")
        return cls._from_bits(unpack_signs(packed, shape, torch.float32) > 0, shape)

    @classmethod
    def _from_bits(cls, bits: torch.Tensor, shape: tuple[int, ...]) -> PackedWeight:
        return cls.from_tap_words(pack_bits_lastdim(cls.tap_view(bits.reshape(shape))), shape)

    @staticmethod
    def tap_view(w: torch.Tensor) -> torch.Tensor:
        """A conv (O, C, KH, KW) or linear (O, C) weight (or its signs) as (O, T, C), tap ``t = ky * KW + kx``:
        the order of the kernel layout (a view)."""
        return w.reshape(w.shape[0], w.shape[1], -1).transpose(1, 2)

    @classmethod
    def from_tap_words(cls, tap_words: torch.Tensor, shape) -> PackedWeight:
        """From each tap's packed channel signs, int32 (O, T, Cw): :func:`pack_bits_lastdim` of :meth:`tap_view`
        (what :func:`dbgen.kernels.pack_activations` makes of the taps in the linear layout)."""
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (2, 4):
            raise ValueError(f"PackedWeight: expected a linear (O, C) or conv (O, C, KH, KW) weight, got {shape}")
        o, c = shape[0], shape[1]
        tap_corr = (c - 2 * popcount32(tap_words).sum(dim=-1)).to(torch.int32)  # (O, T)
        flat = tap_words.reshape(o, -1)
        words = F.pad(flat, (0, -flat.shape[1] % 8)).contiguous()
        return cls(words=words, shape=shape, tap_corr=tap_corr.contiguous())

    def to_pack_signs(self) -> torch.Tensor:
        """The :func:`dbgen.nn.pack_signs` bytes of the +-1 weight (inverse of :meth:`from_pack_signs`)."""
        return pack_signs(self.signs())

    def to(self, device) -> PackedWeight:
        return PackedWeight(self.words.to(device), self.shape, self.tap_corr.to(device))

    # ------------------------------------------------------------------------------------- geometry
    @property
    def out_channels(self) -> int:
        return self.shape[0]

    @property
    def in_channels(self) -> int:
        return self.shape[1]

    @property
    def kernel_size(self) -> tuple[int, int]:
        return (self.shape[2], self.shape[3]) if len(self.shape) == 4 else (1, 1)

    @property
    def taps(self) -> int:
        return math.prod(self.kernel_size)

    @property
    def channel_words(self) -> int:
        return (self.in_channels + 31) // 32

    @property
    def fan_in(self) -> int:
        return self.in_channels * self.taps

    def tap_words(self) -> torch.Tensor:
        """int32 (O, T * Cw): the rows without the K padding."""
        return self.words[:, : self.taps * self.channel_words]

    def signs(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The +-1 weight in its original shape (for references and tests)."""
        o, c = self.shape[0], self.shape[1]
        kh, kw = self.kernel_size
        bits = unpack_bits_lastdim(self.tap_words().reshape(o, kh * kw, self.channel_words), c)  # (O, T, C)
        w = bits.reshape(o, kh, kw, c).permute(0, 3, 1, 2).to(dtype) * 2 - 1
        return w.reshape(self.shape).contiguous()

    def transposed_words(self) -> torch.Tensor:
        """int32 (T * Cw, O) contiguous: the layout of the packed-weight x float kernel (cached)."""
        key = ("wT", self.words.device)
        if key not in self._cache:
            self._cache[key] = self.tap_words().t().contiguous()
        return self._cache[key]

    def valid_tap_tables(self, h: int, w: int, stride, padding) -> tuple[torch.Tensor, torch.Tensor]:
        """``Cv`` (O, Ho, Wo) int32 and its interior value ``wtot`` (O,) int32 for an H x W input (cached).

        ``Cv[o, y, x] = sum over the taps of output pixel (y, x) that fall inside the input of tap_corr[o, t]``,
        i.e. a zero-padded conv of an all-ones image with ``tap_corr`` (exact in float: |values| < 2^24).
        """
        key = ("cv", h, w, tuple(stride), tuple(padding), self.tap_corr.device)
        if key not in self._cache:
            kh, kw = self.kernel_size
            ones = torch.ones(1, 1, h, w, device=self.tap_corr.device, dtype=torch.float64)
            kern = self.tap_corr.to(torch.float64).reshape(self.out_channels, 1, kh, kw)
            cv = F.conv2d(ones, kern, stride=tuple(stride), padding=tuple(padding))[0]  # (O, Ho, Wo)
            wtot = self.tap_corr.to(torch.int64).sum(dim=1).to(torch.int32)
            self._cache[key] = (cv.round().to(torch.int32).contiguous(), wtot.contiguous())
        return self._cache[key]
