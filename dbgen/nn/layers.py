"""Weight-normalized layers: binary (BWN) and full precision (WN), with the PyTorch layer signatures.

Every layer here computes ``y = op(x, direction(v)) * gain + bias`` per output channel, where

* binary (BWN):        ``direction(v) = sign(v) / sqrt(fan_in)``  (sign(0) = +1, straight-through gradient)
* full precision (WN): ``direction(v) = v / ||v||``                 (norm over each output channel's fan-in)

Because ``||sign(v)|| = sqrt(fan_in)`` the two are the same formula, so a model switches between them by one
flag. ``gain`` is a plain parameter (the g of the formula, no softplus or log): data-dependent init writes the
value the forward pass uses, and ``gain = bias = 0`` is exactly the zero function, which is what lets a
residual branch start as (and learn back to) the identity. Init makes it non-negative; training may flip its
sign, which is the same as flipping the channel's signs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from .resident import ResidentSigns

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
    "sign_ste",
]


class _SignSTE(torch.autograd.Function):
    """sign with sign(0) = +1 and the identity straight-through gradient."""

    @staticmethod
    def forward(ctx, v):
        return torch.where(v >= 0, 1.0, -1.0).to(v.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _SignClippedSTE(torch.autograd.Function):
    """sign with sign(0) = +1 and the clipped straight-through gradient ``grad * 1{|x| <= 1}``."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


class _BWNWeight(torch.autograd.Function):
    """The BWN weight ``sign(v) * scale`` as one select, ``where(v >= 0, scale, -scale)``, in ``dtype``.

    ``scale`` is ``gain / sqrt(fan_in)`` shaped to broadcast over ``v``. Forward writes the weight once, already
    in the autocast dtype (bf16 on GPU), instead of sign, two multiplies and autocast's cast (four passes over
    the weights). The values are those of the unfused formula: +-round(gain / sqrt(fan_in)), then the same
    rounding to ``dtype``. Backward is the straight-through gradient ``dv = grad * scale`` and
    ``dscale = sum(grad * sign(v))`` over each channel's fan-in, in fp32.
    """

    @staticmethod
    def forward(ctx, v, scale, dtype):
        ctx.save_for_backward(v, scale)
        s = scale.to(dtype)
        return torch.where(v >= 0, s, -s)

    @staticmethod
    def backward(ctx, grad):
        v, scale = ctx.saved_tensors
        grad = grad.to(scale.dtype)
        dims = [d for d in range(v.dim()) if scale.shape[d] == 1]
        grad_scale = torch.where(v >= 0, grad, -grad).sum(dim=dims, keepdim=True)
        return grad * scale, grad_scale, None


class _ResidentBWN(torch.autograd.Function):
    """A binary layer's output from its resident signs (:class:`ResidentSigns`): the +-1 operand is expanded
    (the select of :class:`_BWNWeight`) just before the op and dropped after it, and backward expands it again
    from the words instead of keeping it. Forward and backward run the ops autograd would run on
    ``layer._op(x, _BWNWeight(v, scale), bias)`` with the same operands, so every value is the same bit for bit:
    the op in the autocast dtype (input and bias cast as autocast casts them), its backward
    (``layer._op_backward``), then the straight-through gradients ``dv = dW * scale`` and ``dscale``, in fp32.
    ``latent`` is the layer's weight parameter (a placeholder): its gradient ``dv`` is accumulated into it as
    usual, so gradient hooks and buckets see a binary layer like any other.
    """

    @staticmethod
    def forward(ctx, x, latent, scale, bias, layer):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else latent.dtype
        cast = dtype if torch.is_autocast_enabled(device) and x.is_floating_point() else x.dtype
        xc = x.to(cast)
        bc = None if bias is None else bias.to(cast)
        s = scale.to(dtype)
        y = layer._op(xc, torch.where(layer.resident.mask(), s, -s), bc)
        ctx.save_for_backward(xc, scale)
        ctx.layer, ctx.dtype, ctx.x_dtype = layer, dtype, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        xc, scale = ctx.saved_tensors
        layer = ctx.layer
        mask = layer.resident.mask()
        s = scale.to(ctx.dtype)
        needs = (ctx.needs_input_grad[0], True, ctx.needs_input_grad[3])
        gx, gw, gb = layer._op_backward(grad, xc, torch.where(mask, s, -s), ctx.bias_dtype is not None, needs)
        gw = gw.to(scale.dtype)
        dims = [d for d in range(gw.dim()) if scale.shape[d] == 1]
        grad_scale = torch.where(mask, gw, -gw).sum(dim=dims, keepdim=True)
        gx = None if gx is None else gx.to(ctx.x_dtype)
        gb = None if gb is None else gb.to(ctx.bias_dtype)
        return gx, gw * scale, grad_scale, gb, None


def sign_ste(v: torch.Tensor) -> torch.Tensor:
    """+-1 with sign(0) = +1; gradient passes straight through (binary weights)."""
    return _SignSTE.apply(v)


def binary_act(x: torch.Tensor) -> torch.Tensor:
    """+-1 with sign(0) = +1; gradient ``grad * 1{|x| <= 1}`` (binary activations)."""
    return _SignClippedSTE.apply(x)


class BinaryActivation(nn.Module):
    """``sign(x)`` forward (0 -> +1), clipped straight-through backward."""

    def forward(self, x):
        return binary_act(x)


class WeightNormLayer(nn.Module):
    """Shared machinery of the six layers: parameters, per-channel scale, data-dependent init.

    Subclasses set ``binary``, ``_channel_dim`` and ``_output_dim`` and implement ``_op(x, weight, bias)``
    (the plain float op, e.g. ``F.conv2d`` with the layer's geometry).
    """

    binary: bool = False
    _channel_dim: int = 0  # weight dimension of output channels
    _output_dim: int = 1  # output dimension of channels (NCHW); -1 for linear layers
    resident: ResidentSigns | None = None  # binary layers: the signs as bits (keep_signs_resident)

    def _init_params(self, weight_shape, out_channels: int, bias: bool, init_scale: float):
        self.weight = nn.Parameter(torch.empty(weight_shape))
        self.gain = nn.Parameter(torch.ones(out_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.init_scale = float(init_scale)
        # Latent init: small Gaussian (as weight norm does). Signs are random; magnitudes only matter for
        # how soon the optimizer flips them.
        nn.init.normal_(self.weight, std=0.05)

    @property
    def fan_in(self) -> int:
        return self.weight.numel() // self.weight.shape[self._channel_dim]

    def _per_channel(self, t: torch.Tensor) -> torch.Tensor:
        """Reshape a per-output-channel vector so it broadcasts against ``weight``."""
        shape = [1] * self.weight.dim()
        shape[self._channel_dim] = -1
        return t.view(shape)

    def direction(self) -> torch.Tensor:
        """The unit-norm weight direction: ``sign(v)/sqrt(fan_in)`` (binary) or ``v/||v||``."""
        v = self.weight
        if self.resident is not None:
            return self.resident.signs(v.dtype) * (1.0 / math.sqrt(self.fan_in))
        if self.binary:
            return sign_ste(v) * (1.0 / math.sqrt(self.fan_in))
        dims = [d for d in range(v.dim()) if d != self._channel_dim]
        return v / torch.linalg.vector_norm(v, dim=dims, keepdim=True)

    def effective_weight(self) -> torch.Tensor:
        """``direction * gain``: the float weight the layer applies (``W_eff`` of the BWN formula).

        Binary layers build it in one fused pass (:class:`_BWNWeight`), in the autocast dtype when autocast is
        on, so the convolution reads it without another cast."""
        if not self.binary:
            return self.direction() * self._per_channel(self.gain)
        v = self.weight
        device = v.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else v.dtype
        return _BWNWeight.apply(v, self._per_channel(self.gain) * (1.0 / math.sqrt(self.fan_in)), dtype)

    def forward(self, x):
        if self.resident is not None:
            scale = self._per_channel(self.gain) * (1.0 / math.sqrt(self.fan_in))
            return _ResidentBWN.apply(x, self.weight, scale, self.bias, self)
        return self._op(x, self.effective_weight(), self.bias)

    def keep_signs_resident(self, words: torch.Tensor, offset: int) -> None:
        """From now on the layer's signs are bits ``[offset, offset + numel)`` of ``words`` (shared, not copied:
        see :class:`ResidentSigns`), 1 bit per weight, and ``weight`` keeps its shape but no values (a
        zero-stride placeholder, 4 bytes): it only collects the gradient. The words must hold the current
        signs. The state dict still has ``weight`` as +-1 floats (expanded when it is built, packed when one is
        loaded), so checkpoints are those of a layer holding its signs as floats."""
        if not self.binary:
            raise ValueError(f"{type(self).__name__}: only binary layers keep their signs as bits")
        w = self.weight
        channels_last = w.dim() == 4 and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)
        self.resident = ResidentSigns(words, offset, w.shape, channels_last)
        w.data = w.new_zeros(()).expand(w.shape)  # the fp32 storage goes; shape, dtype, device stay

    @torch.no_grad()
    def signs(self) -> torch.Tensor:
        """The binary weights' +-1 signs (sign(0) = +1), in the weight's dtype, whether resident or not."""
        if self.resident is not None:
            return self.resident.signs(self.weight.dtype)
        return torch.where(self.weight >= 0, 1.0, -1.0).to(self.weight.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.resident is not None:
            destination[prefix + "weight"] = self.resident.signs(self.weight.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        key, args = prefix + "weight", (local_metadata, strict, missing, unexpected, errors)
        if self.resident is None or key not in state_dict:
            return super()._load_from_state_dict(state_dict, prefix, *args)
        if state_dict[key].shape != self.resident.shape:
            errors.append(f"size mismatch for {key}: copying a param with shape {tuple(state_dict[key].shape)}, "
                          f"the shape in current model is {tuple(self.resident.shape)}.")  # fmt: skip
            return None
        self.resident.write(state_dict[key])
        super()._load_from_state_dict({k: v for k, v in state_dict.items() if k != key}, prefix, *args)
        if key in missing:
            missing.remove(key)
        return None

    @torch.no_grad()
    def data_init(self, x):
        """Set gain and bias so the output on ``x`` has per-channel mean 0 and std ``init_scale``.

        Called by :func:`dbgen.nn.data_dependent_init`; returns the output with the new parameters.
        """
        z = self._op(x, self.direction(), None)  # unit gain, no bias
        channel = self._output_dim % z.dim()
        dims = [d for d in range(z.dim()) if d != channel]
        mean = z.mean(dim=dims)
        std = z.std(dim=dims, unbiased=False)
        # Guard: a channel with no spread (e.g. a dead input) gets gain init_scale rather than inf.
        gain = self.init_scale / torch.where(std > 1e-8, std, torch.ones_like(std))
        self.gain.copy_(gain)
        if self.bias is not None:
            self.bias.copy_(-mean * gain)
        return self(x)

    def extra_repr(self):
        return f"{super().extra_repr()}, init_scale={self.init_scale}"


def _convolution_backward(grad, x, weight, bias_sizes, conv, transposed, output_padding, needs):
    """``aten.convolution_backward``: the op autograd runs for ``F.conv2d`` and ``F.conv_transpose2d``."""
    out = torch.ops.aten.convolution_backward(
        grad, x, weight, bias_sizes, conv.stride, conv.padding, conv.dilation, transposed, output_padding,
        conv.groups, list(needs),
    )  # fmt: skip
    return tuple(t if n else None for t, n in zip(out, needs, strict=True))


class _ConvNd(WeightNormLayer):
    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias=True,
        init_scale=1.0,
    ):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation, self.groups = _pair(padding), _pair(dilation), groups
        self._init_params(self._weight_shape(), out_channels, bias, init_scale)

    def extra_repr(self):
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, bias={self.bias is not None}, init_scale={self.init_scale}"
        )


class _Conv2d(_ConvNd):
    _channel_dim = 0

    def _weight_shape(self):
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def _op(self, x, weight, bias):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _op_backward(self, grad, x, weight, has_bias, needs):
        """Gradients of ``_op`` (input, weight, bias; None where not needed), computed as autograd does."""
        bias = [self.out_channels] if has_bias else None
        return _convolution_backward(grad, x, weight, bias, self, False, (0, 0), needs)


class _ConvTranspose2d(_ConvNd):
    # ConvTranspose weights are (in, out/groups, kh, kw): output channels index dim 1.
    _channel_dim = 1

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        output_padding=0,
        groups=1,
        bias=True,
        dilation=1,
        init_scale=1.0,
    ):
        if groups != 1:
            raise ValueError("transposed weight-normalized convolutions support groups=1 only")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, init_scale)
        self.output_padding = _pair(output_padding)

    def _weight_shape(self):
        return (self.in_channels, self.out_channels, *self.kernel_size)

    def _op(self, x, weight, bias):
        return F.conv_transpose2d(
            x, weight, bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation
        )

    def _op_backward(self, grad, x, weight, has_bias, needs):
        bias = [self.out_channels] if has_bias else None
        return _convolution_backward(grad, x, weight, bias, self, True, self.output_padding, needs)


class _Linear(WeightNormLayer):
    _channel_dim = 0
    _output_dim = -1

    def __init__(self, in_features, out_features, bias=True, init_scale=1.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_params((out_features, in_features), out_features, bias, init_scale)

    def _op(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def _op_backward(self, grad, x, weight, has_bias, needs):
        g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        gx = grad.matmul(weight) if needs[0] else None
        gw = g2.t().mm(x2)
        gb = g2.sum(0) if has_bias and needs[2] else None
        return gx, gw, gb

    def extra_repr(self):
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, init_scale={self.init_scale}"
        )


class BinaryConv2d(_Conv2d):
    """BWN conv: ``conv2d(x, sign(weight)) * gain/sqrt(fan_in) + bias``; ``weight`` is the latent v.

    ``binary_input``: True when the layer's input is a sign activation (+-1; the 1/1 variant), declared by the
    model that builds it, as larq declares an input quantizer. The forward pass is the same either way (the
    model applies the sign); packed execution (:func:`dbgen.kernels.to_packed`) reads it to run the fully
    binary kernel. Not in the state dict: the model sets it from its config.
    """

    binary = True
    binary_input = False


class BinaryConvTranspose2d(_ConvTranspose2d):
    """BWN transposed conv; fan_in = in_channels * kh * kw (the weights feeding one output channel)."""

    binary = True


class BinaryLinear(_Linear):
    """BWN linear: ``linear(x, sign(weight)) * gain/sqrt(in_features) + bias``; ``binary_input`` as for
    :class:`BinaryConv2d`."""

    binary = True
    binary_input = False


class WNConv2d(_Conv2d):
    """Weight-normalized conv ``w = gain * v/||v||``: the full-precision twin of :class:`BinaryConv2d`."""


class WNConvTranspose2d(_ConvTranspose2d):
    """Weight-normalized transposed conv: the full-precision twin of :class:`BinaryConvTranspose2d`."""


class WNLinear(_Linear):
    """Weight-normalized linear: the full-precision twin of :class:`BinaryLinear`."""


def binary_layers(model: nn.Module):
    """Every binary (BWN) layer of ``model``, in module order, as ``(name, module)`` pairs."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, WeightNormLayer) and m.binary]


def binary_latents(model: nn.Module):
    """The latent weight tensors of every binary layer (what the optimizer updates and clamping clips)."""
    return [m.weight for _, m in binary_layers(model)]


@torch.no_grad()
def clamp_latents_(model: nn.Module) -> None:
    """Clip the latent weights of every binary layer to [-1, 1] in place (after each optimizer step)."""
    for w in binary_latents(model):
        w.clamp_(-1.0, 1.0)
