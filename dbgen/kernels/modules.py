"""Packed execution of a trained model: swap its binary layers for modules that run the bitwise kernels.

:func:`to_packed` replaces every :class:`~dbgen.nn.BinaryConv2d` and :class:`~dbgen.nn.BinaryLinear` of an
eval-mode model (found by type, so it works for any model) with a module holding only the 1-bit weight words,
the per-channel scale ``gain / sqrt(fan_in)`` and the bias. Each packed layer picks its path per call:

* ``activations="binary"``: the input is a sign activation (a 1/1 model): its signs are packed and the fully
  binary kernel runs (1-bit tensor cores);
* ``"float"``: binary weights x float activations (a 1/32 model);
* ``"auto"`` (default): binary when the input holds only +-1, else float. Both give the training-time
  function; the check costs one device sync per call, so name the mode for speed.

Inside an ``nn.Sequential`` a :class:`~dbgen.nn.BinaryActivation` directly followed by a packed layer becomes
:class:`SignPack` (sign straight into packed words), and a packed layer directly before that pair emits the
packed signs of its output from the kernel's epilogue: a stack of 1/1 layers then never materializes the
float +-1 tensors between layers. Models that call ``binary_act`` functionally still run packed, layer by
layer. A model loaded from an exported packed state dict (:func:`dbgen.nn.load_packed_state_dict`) converts
the same way.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..nn.layers import BinaryActivation, BinaryConv2d, BinaryLinear, WeightNormLayer
from .ops import binary_act_conv2d, binary_act_linear, pack_activations, packed_weight_conv2d, packed_weight_linear
from .packing import PackedActivation, PackedWeight

__all__ = ["PackedBinaryConv2d", "PackedBinaryLinear", "SignPack", "to_packed"]

log = logging.getLogger(__name__)

_MODES = ("auto", "binary", "float")


def _is_sign_tensor(x: torch.Tensor) -> bool:
    return bool(((x == 1) | (x == -1)).all())


class _PackedLayer(nn.Module):
    """Buffers: ``words`` (weight bits, kernel layout), ``tap_corr``, ``scale`` and ``bias`` (float32)."""

    def __init__(self, weight: PackedWeight, scale: torch.Tensor, bias: torch.Tensor | None, activations: str):
        super().__init__()
        if activations not in _MODES:
            raise ValueError(f"activations must be one of {_MODES}, got {activations!r}")
        self.register_buffer("words", weight.words)
        self.register_buffer("tap_corr", weight.tap_corr)
        self.register_buffer("scale", scale.detach().to(torch.float32).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        self.weight_shape = tuple(weight.shape)
        self.activations = activations
        self.pack_output = False  # set by to_packed's Sequential fusion
        self._packed: PackedWeight | None = None

    def packed_weight(self) -> PackedWeight:
        """A :class:`PackedWeight` view of the buffers (rebuilt after ``.to()``; it caches geometry tables)."""
        if self._packed is None or self._packed.words is not self.words:
            self._packed = PackedWeight(self.words, self.weight_shape, self.tap_corr)
        return self._packed

    def _mode(self, x) -> str:
        if isinstance(x, PackedActivation):
            return "binary"
        if self.activations == "auto":
            return "binary" if _is_sign_tensor(x) else "float"
        return self.activations

    @staticmethod
    def _layer_params(layer: WeightNormLayer):
        # Same product as the training path's sign(v) * (1/sqrt(fan_in)) * gain, in float32.
        scale = layer.gain.detach().to(torch.float32) * (1.0 / math.sqrt(layer.fan_in))
        return PackedWeight.from_signs(layer.weight), scale, layer.bias

    def extra_repr(self):
        return (f"weight={self.weight_shape}, activations={self.activations}, pack_output={self.pack_output}, "
                f"bias={self.bias is not None}")


class PackedBinaryConv2d(_PackedLayer):
    """Inference-only :class:`~dbgen.nn.BinaryConv2d` on packed weights (see the module docstring)."""

    def __init__(self, weight: PackedWeight, scale, bias, stride=1, padding=0, activations: str = "auto"):
        super().__init__(weight, scale, bias, activations)
        self.stride, self.padding = tuple(stride), tuple(padding)

    @classmethod
    def from_layer(cls, layer: BinaryConv2d, activations: str = "auto") -> PackedBinaryConv2d:
        if layer.groups != 1 or layer.dilation != (1, 1):
            raise ValueError(f"packed conv supports groups=1, dilation=1; got groups={layer.groups}, "
                             f"dilation={layer.dilation}")
        w, scale, bias = cls._layer_params(layer)
        return cls(w.to(layer.weight.device), scale, bias, layer.stride, layer.padding, activations)

    def forward(self, x):
        w = self.packed_weight()
        if self._mode(x) == "binary":
            out_dtype = torch.float32 if isinstance(x, PackedActivation) else x.dtype
            return binary_act_conv2d(x, w, self.scale, self.bias, self.stride, self.padding, out_dtype=out_dtype,
                                     pack_output=self.pack_output)
        y = packed_weight_conv2d(x, w, self.scale, self.bias, self.stride, self.padding)
        return pack_activations(y, "conv") if self.pack_output else y

    def extra_repr(self):
        return f"{super().extra_repr()}, stride={self.stride}, padding={self.padding}"


class PackedBinaryLinear(_PackedLayer):
    """Inference-only :class:`~dbgen.nn.BinaryLinear` on packed weights (see the module docstring)."""

    @classmethod
    def from_layer(cls, layer: BinaryLinear, activations: str = "auto") -> PackedBinaryLinear:
        w, scale, bias = cls._layer_params(layer)
        return cls(w.to(layer.weight.device), scale, bias, activations)

    def forward(self, x):
        w = self.packed_weight()
        if self._mode(x) == "binary":
            out_dtype = torch.float32 if isinstance(x, PackedActivation) else x.dtype
            return binary_act_linear(x, w, self.scale, self.bias, out_dtype=out_dtype, pack_output=self.pack_output)
        y = packed_weight_linear(x, w, self.scale, self.bias)
        return pack_activations(y, "linear") if self.pack_output else y


class SignPack(nn.Module):
    """Replaces a BinaryActivation that feeds a packed layer: sign straight into packed words."""

    def __init__(self, layout: str):
        super().__init__()
        self.layout = layout

    def forward(self, x):
        return x if isinstance(x, PackedActivation) else pack_activations(x, self.layout)

    def extra_repr(self):
        return f"layout={self.layout}"


def _fuse_sequential(seq: nn.Sequential) -> int:
    """[packed?, BinaryActivation, packed] -> [packed(pack_output), SignPack, packed]; returns fusions done."""
    names = list(seq._modules)
    fused = 0
    for i in range(len(names) - 1):
        act, nxt = seq._modules[names[i]], seq._modules[names[i + 1]]
        if not isinstance(act, BinaryActivation) or not isinstance(nxt, _PackedLayer) or nxt.activations == "float":
            continue
        layout = "conv" if isinstance(nxt, PackedBinaryConv2d) else "linear"
        seq._modules[names[i]] = SignPack(layout)
        fused += 1
        prev = seq._modules[names[i - 1]] if i > 0 else None
        if isinstance(prev, _PackedLayer) and type(prev) is type(nxt):
            prev.pack_output = True
    return fused


@torch.no_grad()
def to_packed(model: nn.Module, activations: str = "auto", fuse: bool = True) -> nn.Module:
    """Switch an eval-mode model to packed execution in place (see the module docstring); returns it.

    Binary layers the kernels do not cover (transposed convs, grouped or dilated convs) stay as they are, with
    a warning. The result is for inference: it has no latent weights to train.
    """
    if activations not in _MODES:
        raise ValueError(f"to_packed: activations must be one of {_MODES}, got {activations!r}")
    if model.training:
        raise ValueError("to_packed needs an eval-mode model (call model.eval() first): packed layers are "
                         "inference-only")
    swapped, kept = 0, []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if isinstance(child, BinaryConv2d):
                if child.groups != 1 or child.dilation != (1, 1):
                    kept.append(full)
                    continue
                setattr(parent, name, PackedBinaryConv2d.from_layer(child, activations))
                swapped += 1
            elif isinstance(child, BinaryLinear):
                setattr(parent, name, PackedBinaryLinear.from_layer(child, activations))
                swapped += 1
            elif isinstance(child, WeightNormLayer) and child.binary:
                kept.append(full)
    fused = sum(_fuse_sequential(m) for m in model.modules() if isinstance(m, nn.Sequential)) if fuse else 0
    if kept:
        log.warning("to_packed: %d binary layers have no packed kernel and run as before: %s", len(kept),
                    ", ".join(kept[:8]))
    log.info("to_packed: %d binary layers packed (activations=%s), %d sign activations fused", swapped,
             activations, fused)
    return model
