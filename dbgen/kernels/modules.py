"""Packed execution of a trained model: swap its binary layers for modules that run the bitwise kernels.

:func:`to_packed` replaces every :class:`~dbgen.nn.BinaryConv2d` and :class:`~dbgen.nn.BinaryLinear` of an
eval-mode model (found by type, so it works for any model) with a module holding only the 1-bit weight words,
the per-channel scale ``gain / sqrt(fan_in)`` and the bias. Which kernel a packed layer runs is fixed by the
model's structure, never guessed from data:

* the layer's input is a sign activation (``binary_input``, declared by the model on the binary layer, as larq
  declares an input quantizer; or the input arrives as packed words): its signs are packed and the fully
  binary kernel runs (1-bit tensor cores; a 1/1 model);
* otherwise float activations x packed 1-bit weights (a 1/32 model).

**Packed-bits chaining.** Where a binary layer's output reaches a binary-input layer only through a sign
activation module, the first layer emits the packed signs of its output from the kernel's epilogue
(``pack_output``) and the sign module becomes :class:`SignPack` (passes packed words through, packs a float
input straight into words): the chain never materializes the float +-1 tensor between the layers. Two
structures declare such chains:

* inside an ``nn.Sequential``: a :class:`~dbgen.nn.BinaryActivation` directly followed by a packed layer
  becomes :class:`SignPack`, and a packed layer directly before that pair emits packed signs;
* a module's ``sign_chains`` attribute: tuples of child names ``(producer, sign, consumer)``, meaning the
  producer's output goes only through the sign module (a :class:`~dbgen.nn.BinaryActivation` child) into the
  consumer, and every input of that sign module feeds a binary-input layer
  (:class:`dbgen.models.rvae.ResidualLayer` declares ``conv1 -> act -> conv2``).

**Numerics.** The fully binary path's integer dot product is exact and its epilogue is
``fl(fl(dot * scale) + bias)``, the same in the reference and the CUDA kernels (bit for bit). The float
training path instead sums ``+-scale`` terms in fp32 (and in bf16 under autocast), so the two differ by that
rounding (``gamma_K`` relative, K the fan-in), and a downstream sign whose argument sits within it of 0 may
flip. The packed-weight (float input) path computes the same conv as the training path in another order.
See :mod:`dbgen.eval_loop` for the bound this gives on bits/dim.

A model loaded from an exported packed state dict (:func:`dbgen.nn.load_packed_state_dict`) converts the same
way.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..nn.layers import BinaryActivation, BinaryConv2d, BinaryLinear, WeightNormLayer
from .ops import binary_act_conv2d, binary_act_linear, pack_activations, packed_weight_conv2d, packed_weight_linear
from .packing import PackedActivation, PackedWeight

__all__ = ["PackedBinaryConv2d", "PackedBinaryLinear", "SignPack", "chained_layers", "to_packed"]

log = logging.getLogger(__name__)


class _PackedLayer(nn.Module):
    """Buffers: ``words`` (weight bits, kernel layout), ``tap_corr``, ``scale`` and ``bias`` (float32)."""

    def __init__(self, weight: PackedWeight, scale: torch.Tensor, bias: torch.Tensor | None, binary_input: bool):
        super().__init__()
        self.register_buffer("words", weight.words)
        self.register_buffer("tap_corr", weight.tap_corr)
        self.register_buffer("scale", scale.detach().to(torch.float32).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        self.weight_shape = tuple(weight.shape)
        self.binary_input = bool(binary_input)
        self.pack_output = False  # set by to_packed where the output only feeds a sign into a binary layer
        self._packed: PackedWeight | None = None

    def packed_weight(self) -> PackedWeight:
        """A :class:`PackedWeight` view of the buffers (rebuilt after ``.to()``), with the kernels' transposed
        words made at once: :func:`to_packed` calls this for every layer, so that these long-lived tensors are
        not first allocated inside a forward, among its temporaries, where they would pin the allocator's
        heap (measured: hundreds of MB of freed memory never returned to the system)."""
        if self._packed is None or self._packed.words is not self.words:
            self._packed = PackedWeight(self.words, self.weight_shape, self.tap_corr)
            self._packed.transposed_words()
        return self._packed

    def _binary(self, x) -> bool:
        return self.binary_input or isinstance(x, PackedActivation)

    @staticmethod
    def _layer_params(layer: WeightNormLayer):
        # Same product as the training path's sign(v) * (1/sqrt(fan_in)) * gain, in float32.
        scale = layer.gain.detach().to(torch.float32) * (1.0 / math.sqrt(layer.fan_in))
        # The taps' signs packed by the kernels (CPU or CUDA): no int64 expansion of every weight bit, whose
        # freed hundreds of MB the allocator would keep (a packed model's resident memory is the point).
        w = layer.weight.detach()
        words = pack_activations(PackedWeight.tap_view(w), "linear").words
        return PackedWeight.from_tap_words(words, tuple(w.shape)), scale, layer.bias

    def extra_repr(self):
        return (
            f"weight={self.weight_shape}, binary_input={self.binary_input}, pack_output={self.pack_output}, "
            f"bias={self.bias is not None}"
        )


class PackedBinaryConv2d(_PackedLayer):
    """Inference-only :class:`~dbgen.nn.BinaryConv2d` on packed weights (see the module docstring)."""

    def __init__(self, weight: PackedWeight, scale, bias, stride=1, padding=0, binary_input: bool = False):
        super().__init__(weight, scale, bias, binary_input)
        self.stride, self.padding = tuple(stride), tuple(padding)

    @classmethod
    def from_layer(cls, layer: BinaryConv2d) -> PackedBinaryConv2d:
        if layer.groups != 1 or layer.dilation != (1, 1):
            raise ValueError(
                f"packed conv supports groups=1, dilation=1; got groups={layer.groups}, dilation={layer.dilation}"
            )
        w, scale, bias = cls._layer_params(layer)
        return cls(w.to(layer.weight.device), scale, bias, layer.stride, layer.padding, layer.binary_input)

    def forward(self, x):
        w = self.packed_weight()
        if self._binary(x):
            out_dtype = torch.float32 if isinstance(x, PackedActivation) else x.dtype
            return binary_act_conv2d(
                x,
                w,
                self.scale,
                self.bias,
                self.stride,
                self.padding,
                out_dtype=out_dtype,
                pack_output=self.pack_output,
            )
        y = packed_weight_conv2d(x, w, self.scale, self.bias, self.stride, self.padding)
        return pack_activations(y, "conv") if self.pack_output else y

    def extra_repr(self):
        return f"{super().extra_repr()}, stride={self.stride}, padding={self.padding}"


class PackedBinaryLinear(_PackedLayer):
    """Inference-only :class:`~dbgen.nn.BinaryLinear` on packed weights (see the module docstring)."""

    @classmethod
    def from_layer(cls, layer: BinaryLinear) -> PackedBinaryLinear:
        w, scale, bias = cls._layer_params(layer)
        return cls(w.to(layer.weight.device), scale, bias, layer.binary_input)

    def forward(self, x):
        w = self.packed_weight()
        if self._binary(x):
            out_dtype = torch.float32 if isinstance(x, PackedActivation) else x.dtype
            return binary_act_linear(x, w, self.scale, self.bias, out_dtype=out_dtype, pack_output=self.pack_output)
        y = packed_weight_linear(x, w, self.scale, self.bias)
        return pack_activations(y, "linear") if self.pack_output else y


class SignPack(nn.Module):
    """Replaces a BinaryActivation that feeds packed layers: sign straight into packed words."""

    def __init__(self, layout: str):
        super().__init__()
        self.layout = layout

    def forward(self, x):
        return x if isinstance(x, PackedActivation) else pack_activations(x, self.layout)

    def extra_repr(self):
        return f"layout={self.layout}"


def _layout(layer: _PackedLayer) -> str:
    return "conv" if isinstance(layer, PackedBinaryConv2d) else "linear"


def _chain(parent: nn.Module, sign_name: str, producer: nn.Module | None, consumer: nn.Module) -> bool:
    """Make ``producer -> sign_name -> consumer`` pass packed bits, where the structure allows; True if the
    producer now emits them."""
    sign = parent.get_submodule(sign_name)
    if not isinstance(consumer, _PackedLayer) or not isinstance(sign, BinaryActivation | SignPack):
        return False
    if isinstance(sign, BinaryActivation):
        setattr(parent, sign_name, SignPack(_layout(consumer)))
    if isinstance(producer, _PackedLayer) and _layout(producer) == _layout(consumer):
        producer.pack_output = True
        return True
    return False


def _chain_sequential(seq: nn.Sequential) -> None:
    """[packed?, BinaryActivation, packed] -> [packed(pack_output), SignPack, packed]."""
    names = list(seq._modules)
    for i in range(len(names) - 1):
        if isinstance(seq._modules[names[i]], BinaryActivation):
            prev = seq._modules[names[i - 1]] if i > 0 else None
            _chain(seq, names[i], prev, seq._modules[names[i + 1]])


def _chain_declared(parent: nn.Module) -> None:
    """The ``(producer, sign, consumer)`` chains a module declares in ``sign_chains``."""
    for producer_name, sign_name, consumer_name in getattr(parent, "sign_chains", ()):
        producer, consumer = parent.get_submodule(producer_name), parent.get_submodule(consumer_name)
        if not (isinstance(consumer, _PackedLayer) and consumer.binary_input):
            raise ValueError(
                f"{type(parent).__name__}.sign_chains: {consumer_name!r} must be a binary layer "
                f"with binary_input set, got {type(consumer).__name__}"
            )
        if not _chain(parent, sign_name, producer, consumer):
            log.warning(
                "to_packed: %s.sign_chains %s -> %s -> %s not chained (producer %s, sign %s)",
                type(parent).__name__,
                producer_name,
                sign_name,
                consumer_name,
                type(producer).__name__,
                type(parent.get_submodule(sign_name)).__name__,
            )


def chained_layers(model: nn.Module) -> int:
    """Packed layers of ``model`` that hand their output to the next binary layer as packed bits."""
    return sum(isinstance(m, _PackedLayer) and m.pack_output for m in model.modules())


@torch.no_grad()
def to_packed(model: nn.Module) -> nn.Module:
    """Switch an eval-mode model to packed execution in place (see the module docstring); returns it.

    Binary layers the kernels do not cover (transposed convs, grouped or dilated convs) stay as they are, with
    a warning. The result is for inference: it has no latent weights to train.
    """
    if model.training:
        raise ValueError(
            "to_packed needs an eval-mode model (call model.eval() first): packed layers are inference-only"
        )
    swapped, kept = 0, []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if isinstance(child, BinaryConv2d):
                if child.groups != 1 or child.dilation != (1, 1):
                    kept.append(full)
                    continue
                setattr(parent, name, PackedBinaryConv2d.from_layer(child))
                swapped += 1
            elif isinstance(child, BinaryLinear):
                setattr(parent, name, PackedBinaryLinear.from_layer(child))
                swapped += 1
            elif isinstance(child, WeightNormLayer) and child.binary:
                kept.append(full)
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            _chain_sequential(module)
        _chain_declared(module)
        if isinstance(module, _PackedLayer):
            module.packed_weight()  # the kernels' layouts now, not inside the first forward
    if kept:
        log.warning(
            "to_packed: %d binary layers have no packed kernel and run as before: %s", len(kept), ", ".join(kept[:8])
        )
    binary_input = sum(isinstance(m, _PackedLayer) and m.binary_input for m in model.modules())
    log.info(
        "to_packed: %d binary layers packed (%d with binary inputs), %d hand packed bits to the next",
        swapped,
        binary_input,
        chained_layers(model),
    )
    return model
