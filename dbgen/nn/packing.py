"""1 bit per weight: pack the signs of a tensor into bytes and back.

Bit layout (shared by the CPU path, the CUDA kernels and the wire format): the tensor is flattened in
row-major (C) order; element ``i`` lives in byte ``i // 8`` at bit ``i % 8``, least significant bit first
(numpy's ``bitorder="little"``). Bit 1 means ``t >= 0`` (+1, so ``sign(0) = +1`` and ``-0.0`` packs as +1),
bit 0 means -1. The last byte's unused high bits are 0.
"""

from __future__ import annotations

import math

import torch

__all__ = ["pack_signs", "unpack_signs", "packed_nbytes"]

_SHIFTS = tuple(range(8))


def packed_nbytes(numel: int) -> int:
    """Bytes needed for ``numel`` signs."""
    return (numel + 7) // 8


def pack_signs(t: torch.Tensor) -> torch.Tensor:
    """Pack ``t >= 0`` into a flat uint8 tensor of ``ceil(t.numel() / 8)`` bytes on ``t``'s device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"pack_signs expects a torch.Tensor, got {type(t).__name__}")
    if t.is_complex():
        raise ValueError(f"pack_signs expects a real tensor, got dtype {t.dtype}")
    n = t.numel()
    bits = (t.detach().reshape(-1) >= 0).to(torch.uint8)
    pad = packed_nbytes(n) * 8 - n
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    bits = bits.view(-1, 8)
    # Eight strided column ORs: no int64 intermediates, ~1 byte of temporary memory per weight.
    out = bits[:, 0].clone()
    for k in _SHIFTS[1:]:
        out |= bits[:, k] << k
    return out


def unpack_signs(packed: torch.Tensor, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: a +-1 tensor of ``shape`` and ``dtype`` on ``packed``'s device."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"unpack_signs expects a torch.uint8 tensor, got {got}")
    shape = torch.Size(shape) if not isinstance(shape, int) else torch.Size([shape])
    n = math.prod(shape)
    if packed.numel() != packed_nbytes(n):
        raise ValueError(
            f"unpack_signs: shape {tuple(shape)} holds {n} signs = {packed_nbytes(n)} bytes, "
            f"but {packed.numel()} bytes were given"
        )
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.reshape(-1, 1) >> shifts) & 1  # (nbytes, 8)
    bits = bits.reshape(-1)[:n]
    return (bits.to(dtype) * 2 - 1).reshape(shape)
