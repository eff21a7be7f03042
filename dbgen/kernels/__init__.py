"""Bitwise kernels for packed binary layers, with an exact pure-PyTorch reference.

* Layouts and conversions: :class:`PackedActivation`, :class:`PackedWeight` (:mod:`dbgen.kernels.packing`
  documents the bit layout and the AND-popcount dot product).
* Ops (CUDA kernels on CUDA tensors, the bitwise CPU kernels of :mod:`dbgen.kernels.cpu` on CPU tensors, the
  reference elsewhere; ``DBGEN_KERNELS=reference`` forces it, ``DBGEN_KERNELS=cpu`` the CPU kernels):
  :func:`pack_signs`, :func:`pack_activations`, :func:`binary_act_conv2d`, :func:`binary_act_linear`
  (+-1 x +-1 on 1-bit tensor cores), :func:`packed_weight_conv2d`, :func:`packed_weight_linear`
  (float x packed 1-bit weights).
* Packed execution of a trained model: :func:`to_packed` (:func:`chained_layers` counts the layers that
  hand packed bits to the next).

Nothing is compiled on import; the CUDA kernels build with nvcc on first use (cached), see
:mod:`dbgen.kernels.cuda`, and the CPU kernels with g++ (:mod:`dbgen.kernels.cpu`); :func:`kernels_missing`
says whether they can run on a device, and why not.
"""

from . import sources
from .modules import PackedBinaryConv2d, PackedBinaryLinear, SignPack, chained_layers, to_packed
from .ops import (
    backend,
    binary_act_conv2d,
    binary_act_linear,
    kernels_missing,
    pack_activations,
    pack_signs,
    packed_weight_conv2d,
    packed_weight_linear,
)
from .packing import PackedActivation, PackedWeight

__all__ = [
    "PackedActivation",
    "PackedBinaryConv2d",
    "PackedBinaryLinear",
    "PackedWeight",
    "SignPack",
    "backend",
    "binary_act_conv2d",
    "binary_act_linear",
    "chained_layers",
    "kernels_missing",
    "pack_activations",
    "pack_signs",
    "packed_weight_conv2d",
    "packed_weight_linear",
    "sources",
    "to_packed",
]
