"""Packed state dicts (binary latents as 1-bit signs) and model size accounting."""

from __future__ import annotations

import torch
from torch import nn

from .layers import binary_layers
from .packing import pack_signs, packed_nbytes, unpack_signs

__all__ = ["packed_state_dict", "load_packed_state_dict", "size_report"]

PACKED_SUFFIX = ".packed_signs"


def _binary_weight_names(model: nn.Module) -> set[str]:
    return {f"{name}.weight" if name else "weight" for name, _ in binary_layers(model)}


def packed_state_dict(model: nn.Module, float_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's state with each binary layer's latent weight replaced by its packed signs.

    Keys: ``<layer>.weight.packed_signs`` (uint8, layout of :func:`dbgen.nn.pack_signs`) for binary
    latents, the usual names for everything else (cast to ``float_dtype`` if given, e.g. fp16 for export).
    Shapes come from the model on load, so the dict holds tensors only.
    """
    binary = _binary_weight_names(model)
    out = {}
    for name, t in model.state_dict().items():
        if name in binary:
            out[name + PACKED_SUFFIX] = pack_signs(t).cpu()
        elif float_dtype is not None and t.is_floating_point():
            out[name] = t.detach().to(float_dtype).cpu()
        else:
            out[name] = t.detach().cpu()
    return out


def load_packed_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a :func:`packed_state_dict`; binary latents become +-1 (same signs, so the same outputs)."""
    binary = _binary_weight_names(model)
    own = model.state_dict()
    expected = {n + PACKED_SUFFIX if n in binary else n for n in own}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"packed state does not match the model: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    full = {}
    for name, ref in own.items():
        if name in binary:
            full[name] = unpack_signs(state[name + PACKED_SUFFIX], ref.shape, ref.dtype)
        else:
            t = state[name]
            if t.shape != ref.shape:
                raise ValueError(f"packed state: {name} has shape {tuple(t.shape)}, model expects {tuple(ref.shape)}")
            full[name] = t.to(ref.dtype)
    model.load_state_dict(full)


def size_report(model: nn.Module) -> dict:
    """Parameter counts and stored sizes: fp32, and packed (binary at 1 bit, the rest at fp32 / fp16)."""
    binary_ids = {id(m.weight) for _, m in binary_layers(model)}
    params = sum(p.numel() for p in model.parameters())
    binary = sum(p.numel() for p in model.parameters() if id(p) in binary_ids)
    n_binary_tensors = len(binary_ids)
    full = params - binary
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    packed_binary = sum(packed_nbytes(p.numel()) for p in model.parameters() if id(p) in binary_ids)
    report = {
        "params": params,
        "binary_params": binary,
        "binary_tensors": n_binary_tensors,
        "binary_fraction": binary / params if params else 0.0,
        "fp32_bytes": params * 4 + buffers,
        "packed_bytes": packed_binary + full * 4 + buffers,
        "packed_fp16_bytes": packed_binary + full * 2 + buffers,
    }
    for k in ("fp32", "packed", "packed_fp16"):
        report[f"{k}_mb"] = report[f"{k}_bytes"] / 1e6
    return report
