"""Binary weight-normalized layers, bit packing, data-dependent init, packed state and size accounting."""

from .init import data_dependent_init
from .layers import (
    BinaryActivation,
    BinaryConv2d,
    BinaryConvTranspose2d,
    BinaryLinear,
    WeightNormLayer,
    WNConv2d,
    WNConvTranspose2d,
    WNLinear,
    binary_act,
    binary_latents,
    binary_layers,
    clamp_latents_,
    sign_ste,
)
from .packing import pack_signs, packed_nbytes, unpack_signs
from .state import load_packed_state_dict, packed_state_dict, size_report

__all__ = [
    "BinaryActivation",
    "BinaryConv2d",
    "BinaryConvTranspose2d",
    "BinaryLinear",
    "WNConv2d",
    "WNConvTranspose2d",
    "WNLinear",
    "WeightNormLayer",
    "binary_act",
    "binary_latents",
    "binary_layers",
    "clamp_latents_",
    "data_dependent_init",
    "load_packed_state_dict",
    "pack_signs",
    "packed_nbytes",
    "packed_state_dict",
    "sign_ste",
    "size_report",
    "unpack_signs",
]
