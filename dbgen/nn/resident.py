"""A binary layer's signs kept as bits of a shared word buffer: 1 bit per weight, resident between uses.

Why: a BWN layer needs only ``sign(v)`` in its forward pass. When the latents live elsewhere (the packed modes
shard them over the ranks, :class:`dbgen.sync.PackedSync`), a +-1 fp32 copy of them would cost every worker
4 bytes per binary weight for information worth 1 bit. :class:`ResidentSigns` is the layer's view of bits
``[offset, offset + numel)`` of a flat uint8 buffer in :mod:`dbgen.nn.packing`'s layout (the same words the
sign all-gather fills); the layer expands them into its float operand only while it computes
(:meth:`dbgen.nn.WeightNormLayer.keep_signs_resident`).
"""

from __future__ import annotations

import math

import torch

from .packing import pack_signs

__all__ = ["ResidentSigns"]


class ResidentSigns:
    """Signs of a tensor of ``shape``: bits ``[offset, offset + numel)`` of ``words`` ((nbytes,) uint8, element
    ``i`` of the flat buffer in byte ``i // 8`` at bit ``i % 8``; bit 1 is +1). ``words`` is shared, not
    copied: whoever fills it (the sign all-gather) updates the layer. ``channels_last``: masks come out in
    that memory format (the layout the layer's weight had, so its operand keeps it)."""

    def __init__(self, words: torch.Tensor, offset: int, shape, channels_last: bool = False):
        if words.dtype != torch.uint8 or words.dim() != 1:
            got = f"{words.dtype} {tuple(words.shape)}"
            raise ValueError(f"ResidentSigns: words must be a flat torch.uint8 tensor, got {got}")
        self.shape = torch.Size(shape)
        self.numel, self.offset = math.prod(self.shape), int(offset)
        if self.offset < 0 or self.offset + self.numel > 8 * words.numel():
            raise ValueError(
                f"ResidentSigns: bits [{self.offset}, {self.offset + self.numel}) do not fit in {words.numel()} bytes"
            )
        self.words = words
        self.channels_last = channels_last and len(self.shape) == 4
        self._lo, self._hi = self.offset // 8, (self.offset + self.numel + 7) // 8  # the bytes holding the bits
        self._shifts = torch.arange(8, dtype=torch.uint8, device=words.device)

    def _byte_bits(self) -> torch.Tensor:
        """(8 * bytes,) uint8 0/1: every bit of the bytes holding this tensor's bits (neighbours' included)."""
        return ((self.words[self._lo : self._hi, None] >> self._shifts) & 1).view(-1)

    def _bits(self) -> torch.Tensor:
        """(numel,) uint8 0/1: this tensor's bits, in order."""
        skip = self.offset - 8 * self._lo
        return self._byte_bits()[skip : skip + self.numel]

    def mask(self) -> torch.Tensor:
        """(shape) bool: True where the sign is +1."""
        m = self._bits().view(torch.bool).view(self.shape)
        return m.contiguous(memory_format=torch.channels_last) if self.channels_last else m

    def signs(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(shape) +-1 in ``dtype``, contiguous: what a layer holding its signs as floats would hold."""
        return self._bits().to(dtype).mul_(2).sub_(1).view(self.shape)

    @torch.no_grad()
    def write(self, t: torch.Tensor) -> None:
        """Set the bits to ``t >= 0`` (``t`` of ``shape``); the neighbours' bits in the shared edge bytes stay."""
        if t.shape != self.shape:
            raise ValueError(f"ResidentSigns.write: expected shape {tuple(self.shape)}, got {tuple(t.shape)}")
        skip = self.offset - 8 * self._lo
        bits = self._byte_bits().float().mul_(2).sub_(1)
        bits[skip : skip + self.numel] = t.detach().reshape(-1).to(bits.device, torch.float32)
        self.words[self._lo : self._hi] = pack_signs(bits)
