"""Flow building blocks for Flow++ (Ho et al. 2019) as simplified by Bird et al. 2021 (no attention).

Every invertible layer has ``forward(x, ...) -> (y, logdet)`` with ``logdet`` of shape (N,) (log |det dy/dx|
per example) and ``inverse(y, ...) -> x``. Only ``forward`` goes through ``nn.Module.__call__`` (so the
data-dependent init hooks of :func:`dbgen.nn.data_dependent_init` see it); ``inverse`` is a plain method.

Layers: :class:`ActNorm` (per-channel affine, data-dependent init), :class:`Pointwise` (invertible 1x1
convolution), :class:`MixLogisticTransform` (the elementwise logistic-mixture-CDF transform of a coupling,
parameters given), :class:`Coupling` (actnorm + pointwise on each half, mixture coupling, swap), the volume
preserving :func:`split` / :func:`merge` (stripe or channel) and :func:`squeeze`, the elementwise
:class:`LogitPreprocess` and :class:`Sigmoid`, and the conditioning network (:class:`ConditioningNet`, made of
:class:`GatedResBlock`). :class:`DequantFlow` is the variational dequantization flow ``eps -> u in (0,1)^D``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import BinaryConv2d, WNConv2d, binary_act
from .checkpointing import run_block

__all__ = [
    "ActNorm",
    "ConditioningNet",
    "ContextNet",
    "Coupling",
    "DequantFlow",
    "GatedResBlock",
    "LogitPreprocess",
    "MixLogisticTransform",
    "Pointwise",
    "Sigmoid",
    "concat_elu",
    "concat_sign",
    "merge",
    "mixlogistic_invlogitcdf",
    "mixlogistic_logcdf_logsf",
    "mixlogistic_logpdf",
    "split",
    "squeeze",
    "unsqueeze",
]

# Logistic scales are floored at exp(-7) (as in Flow++): keeps the mixture density finite.
MIN_LOGSCALE = -7.0
# Thresholds of the two sign planes that double the channels under binary activations (see concat_sign).
SIGN_THRESHOLD = 0.5


def _sum_per_example(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).sum(1)


# ------------------------------------------------------------------------------ splits and squeeze
def split(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Split (N, C, H, W) into two halves: ``stripe`` = even / odd columns, ``channel`` = first / second half."""
    if kind == "stripe":
        n, c, h, w = x.shape
        a, b = x.reshape(n, c, h, w // 2, 2).unbind(4)  # 2 x (N, C, H, W/2)
        return a, b
    if kind == "channel":
        a, b = x.chunk(2, dim=1)  # 2 x (N, C/2, H, W)
        return a, b
    raise ValueError(f"split kind must be 'stripe' or 'channel', got {kind!r}")


def merge(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """Inverse of :func:`split`: ``merge(*split(x, kind), kind) == x``."""
    if kind == "stripe":
        n, c, h, w2 = a.shape
        return torch.stack((a, b), dim=4).reshape(n, c, h, 2 * w2)  # (N, C, H, W)
    if kind == "channel":
        return torch.cat((a, b), dim=1)
    raise ValueError(f"split kind must be 'stripe' or 'channel', got {kind!r}")


def squeeze(x: torch.Tensor) -> torch.Tensor:
    """Space to depth: (N, C, H, W) -> (N, 4C, H/2, W/2), sub-pixel-major channels (tf.space_to_depth order,
    so a channel split afterwards puts the top row of every 2x2 block in one half, the bottom row in the other)."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4)  # (N, 2, 2, C, H/2, W/2)
    return x.reshape(n, 4 * c, h // 2, w // 2)


def unsqueeze(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`squeeze`."""
    n, c4, h2, w2 = y.shape
    y = y.reshape(n, 2, 2, c4 // 4, h2, w2).permute(0, 3, 4, 1, 5, 2)  # (N, C, H/2, 2, W/2, 2)
    return y.reshape(n, c4 // 4, 2 * h2, 2 * w2)


# ----------------------------------------------------------------------------- elementwise bijections
class LogitPreprocess(nn.Module):
    """[0, 256) -> R: ``y = logit(0.05 + 0.9 x / 256)`` (Flow++'s ImgProc; keeps the logit away from +-inf)."""

    def forward(self, x):
        p = 0.05 + x * (0.9 / 256)
        y = torch.log(p) - torch.log1p(-p)
        logdet = math.log(0.9 / 256) - torch.log(p) - torch.log1p(-p)
        return y, _sum_per_example(logdet)

    def inverse(self, y):
        return (torch.sigmoid(y) - 0.05) * (256 / 0.9)


class Sigmoid(nn.Module):
    """R -> (0, 1), ``log dy/dx = logsigmoid(x) + logsigmoid(-x)``."""

    def forward(self, x):
        return torch.sigmoid(x), _sum_per_example(F.logsigmoid(x) + F.logsigmoid(-x))

    def inverse(self, y):
        return torch.log(y) - torch.log1p(-y)


# ------------------------------------------------------------------------------ parametrized layers
class ActNorm(nn.Module):
    """Per-channel affine ``y = x * exp(logscale) + bias`` with data-dependent init (Glow's actnorm).

    ``data_init(x)`` sets the parameters so that ``y`` has per-channel mean 0 and std 1 on ``x``.
    The scale is parametrized by its log, so the layer stays invertible whatever the optimizer does.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.logscale = nn.Parameter(torch.zeros(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        n, _, h, w = x.shape
        y = x * self.logscale.exp().view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        logdet = (h * w) * self.logscale.sum()
        return y, logdet.expand(n)

    def inverse(self, y):
        return (y - self.bias.view(1, -1, 1, 1)) * (-self.logscale).exp().view(1, -1, 1, 1)

    @torch.no_grad()
    def data_init(self, x):
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3), unbiased=False)
        # A constant channel (std 0) keeps scale 1 rather than getting an infinite one.
        logscale = -torch.log(torch.where(std > 1e-8, std, torch.ones_like(std)))
        self.logscale.copy_(logscale)
        self.bias.copy_(-mean * logscale.exp())
        return self(x)


class Pointwise(nn.Module):
    """Invertible 1x1 convolution ``y[:, i] = sum_j W[i, j] x[:, j]`` with a plain C x C matrix (Flow++'s choice).

    The channel counts are 3 to 12 in the CIFAR-10 flow and up to 192 in the ImageNet64 flow, so the slogdet and
    inverse of W cost little next to the coupling networks and an LU parametrization (Glow) would buy no speed;
    W starts near the identity (plus 1e-3 noise to break symmetry), so every coupling starts close to the
    identity map as in Flow++.
    """

    def __init__(self, channels: int, noise: float = 1e-3):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(channels) + noise * torch.randn(channels, channels))

    @staticmethod
    def _mix_channels(w, x):
        # A matrix product with autocast off: the flow path must stay in the input's precision (only the
        # conditioning networks may run in bf16); fp32 matmuls use TF32 only if the user enables it
        # (torch.backends.cuda.matmul.allow_tf32). A broadcast multiply-sum would avoid autocast too but builds
        # an (N, C, C, H, W) temporary: 192 times the input in the ImageNet64 flow.
        with torch.autocast(x.device.type, enabled=False):
            return torch.einsum("ij,njhw->nihw", w.to(x.dtype), x)  # (N, C, H, W)

    def forward(self, x):
        n, _, h, w = x.shape
        y = self._mix_channels(self.weight, x)
        # slogdet in float64: cheap for C <= 12 and exact enough even when W drifts from the identity.
        logdet = (h * w) * torch.linalg.slogdet(self.weight.double())[1].to(x.dtype)
        return y, logdet.expand(n)

    def inverse(self, y):
        return self._mix_channels(torch.linalg.inv(self.weight.double()), y)


# ------------------------------------------------------------------------- logistic mixture CDF
def mixlogistic_logcdf_logsf(x, logits, means, logscales, dim):
    """log F(x) and log(1 - F(x)) of a logistic mixture (components along ``dim``), both without cancellation."""
    logpi = F.log_softmax(logits, dim=dim)
    z = (x.unsqueeze(dim) - means) * torch.exp(-logscales)
    logcdf = torch.logsumexp(logpi + F.logsigmoid(z), dim=dim)
    logsf = torch.logsumexp(logpi + F.logsigmoid(-z), dim=dim)
    return logcdf, logsf


def mixlogistic_logpdf(x, logits, means, logscales, dim):
    """log density of a logistic mixture (components along ``dim``)."""
    logpi = F.log_softmax(logits, dim=dim)
    z = (x.unsqueeze(dim) - means) * torch.exp(-logscales)
    return torch.logsumexp(logpi - logscales - F.softplus(z) - F.softplus(-z), dim=dim)


@torch.no_grad()
def mixlogistic_invlogitcdf(t, logits, means, logscales, dim, tol=None, max_iters=100):
    """Solve ``logit(F(x)) = t`` for x by bisection (F the mixture CDF, components along ``dim``).

    The root is bracketed by ``[min_k(mu_k + s_k t), max_k(mu_k + s_k t)]``: at the lower end every
    component's CDF is <= sigmoid(t), at the upper end >= sigmoid(t). Bisection on that bracket cannot
    diverge and needs ``ceil(log2(width / tol))`` steps, capped at ``max_iters``. The result is within
    ``tol`` of the root (default 1e-12 in float64, 1e-6 in float32, where it is also limited by the float
    spacing of x). Comparing in logit space keeps the tails exact (no CDF rounding to 0 or 1).
    """
    if tol is None:
        tol = 1e-12 if t.dtype == torch.float64 else 1e-6
    ends = means + torch.exp(logscales) * t.unsqueeze(dim)
    lo, hi = ends.amin(dim=dim), ends.amax(dim=dim)
    width = float((hi - lo).max()) if lo.numel() else 0.0
    iters = min(max_iters, max(0, math.ceil(math.log2(width / tol)))) if width > tol else 0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        logcdf, logsf = mixlogistic_logcdf_logsf(mid, logits, means, logscales, dim)
        below = (logcdf - logsf) < t
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


class MixLogisticTransform(nn.Module):
    """The elementwise transform of a Flow++ coupling, given its parameters (no learnable state):

    ``y = exp(a) * logit(F(x)) + b``, F the CDF of a K-component logistic mixture, ``a = tanh(raw)``.
    ``log dy/dx = log f(x) - log F(x) - log(1 - F(x)) + a``. Parameters per element: (2 + 3K), laid out
    along dim 2 of a (N, C, 2 + 3K, H, W) tensor: raw a, b, K logits, K means, K log-scales.
    """

    def __init__(self, components: int):
        super().__init__()
        self.components = components

    @property
    def params_per_element(self) -> int:
        return 2 + 3 * self.components

    def _unpack(self, params):
        a = torch.tanh(params[:, :, 0])  # (N, C, H, W), log-scale bounded to (-1, 1)
        b = params[:, :, 1]
        logits, means, logscales = params[:, :, 2:].chunk(3, dim=2)  # 3 x (N, C, K, H, W)
        return a, b, logits, means, logscales.clamp(min=MIN_LOGSCALE)

    def forward(self, x, params):
        a, b, logits, means, logscales = self._unpack(params)
        logcdf, logsf = mixlogistic_logcdf_logsf(x, logits, means, logscales, dim=2)
        logpdf = mixlogistic_logpdf(x, logits, means, logscales, dim=2)
        y = torch.exp(a) * (logcdf - logsf) + b
        return y, _sum_per_example(logpdf - logcdf - logsf + a)

    def inverse(self, y, params):
        a, b, logits, means, logscales = self._unpack(params)
        t = (y - b) * torch.exp(-a)
        return mixlogistic_invlogitcdf(t, logits, means, logscales, dim=2)


# ---------------------------------------------------------------------------- conditioning networks
def concat_elu(x):
    """``elu(cat(x, -x))`` over channels, (N, C, ...) -> (N, 2C, ...) (PixelCNN++ / Flow++)."""
    return F.elu(torch.cat((x, -x), dim=1))


def concat_sign(x):
    """Binary counterpart of concat-ELU: two sign planes at thresholds -+0.5, (N, C, ...) -> (N, 2C, ...).

    ``cat(sign(x), sign(-x))`` would repeat one bit per channel; the two thresholds instead carry a 3-level
    quantization of x (below -0.5 / between / above 0.5; the inputs are layer- or weight-normalized to
    about unit scale), with +-1 in both planes so the following conv stays a 1-bit x 1-bit product. The
    gradient is the clipped straight-through one of :func:`dbgen.nn.binary_act` for each plane.
    """
    return torch.cat((binary_act(x - SIGN_THRESHOLD), binary_act(x + SIGN_THRESHOLD)), dim=1)


class GatedResBlock(nn.Module):
    """``x + GLU(gate(act(conv(act(x)) [+ context_proj(act(context))])))`` (Flow++'s gated_resnet).

    ``conv`` is 3x3 C -> C on the doubled (concat-activated) input, ``gate`` is ``gate_kernel`` x
    ``gate_kernel`` 2C -> 2C followed by a gated linear unit, ``context_proj`` a 1x1 projection of an
    auxiliary input. With ``binary_weights`` all three are BWN (:class:`BinaryConv2d`), else WN; with
    ``binary_activations`` act is :func:`concat_sign`, else concat-ELU. The gate starts at ``init_scale``
    0.1, so the block starts close to the identity.
    """

    def __init__(
        self,
        channels: int,
        *,
        context_channels: int = 0,
        gate_kernel: int = 1,
        binary_weights: bool = False,
        binary_activations: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        conv = BinaryConv2d if binary_weights else WNConv2d
        self.act = concat_sign if binary_activations else concat_elu
        self.conv = conv(2 * channels, channels, 3, padding=1)
        self.context_proj = conv(2 * context_channels, channels, 1) if context_channels else None
        self.dropout = nn.Dropout(dropout)
        self.gate = conv(2 * channels, 2 * channels, gate_kernel, padding=gate_kernel // 2, init_scale=0.1)
        if binary_weights and binary_activations:
            # Every binary conv reads concat_sign planes (+-1): packed execution runs them on the fully binary
            # kernel. (No packed-bits chaining here: concat_sign thresholds at -+0.5 into two planes, while a
            # kernel epilogue emits the signs of its output at 0.)
            for layer in (self.conv, self.gate, self.context_proj):
                if layer is not None:
                    layer.binary_input = True

    def forward(self, x, context=None):
        h = self.conv(self.act(x))  # (N, C, H, W)
        if self.context_proj is not None:
            h = h + self.context_proj(self.act(context))
        h = self.dropout(self.act(h))  # (N, 2C, H, W)
        a, b = self.gate(h).chunk(2, dim=1)  # 2 x (N, C, H, W)
        return x + a * torch.sigmoid(b)


class ChannelLayerNorm(nn.LayerNorm):
    """Layer norm over the channels of each position of an (N, C, H, W) tensor."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConditioningNet(nn.Module):
    """Coupling network: full-precision 3x3 ``proj_in``, ``blocks`` x (gated residual block, layer norm),
    full-precision 3x3 ``proj_out`` (init_scale 0.1, so couplings start close to a fixed transform)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        hdim: int,
        blocks: int,
        context_channels: int = 0,
        binary_weights: bool = False,
        binary_activations: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.proj_in = WNConv2d(in_channels, hdim, 3, padding=1)
        self.blocks = nn.ModuleList(
            GatedResBlock(
                hdim,
                context_channels=context_channels,
                gate_kernel=1,
                binary_weights=binary_weights,
                binary_activations=binary_activations,
                dropout=dropout,
            )
            for _ in range(blocks)
        )
        self.norms = nn.ModuleList(ChannelLayerNorm(hdim) for _ in range(blocks))
        self.proj_out = WNConv2d(hdim, out_channels, 3, padding=1, init_scale=0.1)
        self.activation_checkpointing = False  # recompute the whole network in the backward pass

    def forward(self, x, context=None):
        return run_block(self.activation_checkpointing, self._forward, x, context)

    def _forward(self, x, context):
        h = self.proj_in(x)  # (N, hdim, H, W)
        for block, norm in zip(self.blocks, self.norms, strict=True):
            h = norm(block(h, context))
        return self.proj_out(h)  # (N, out_channels, H, W)


# ------------------------------------------------------------------------------------------ coupling
class Coupling(nn.Module):
    """One Flow++ coupling: split, per half (actnorm, pointwise), mixture-CDF transform of the second half
    conditioned on the first (and on ``context``), then merge with the halves swapped.

    ``channels`` is the channel count of the full input; ``split`` is ``stripe`` (columns; halves keep the
    channels) or ``channel``. ``context`` (optional, for the dequantization flow) must have the spatial shape
    of a half.
    """

    def __init__(
        self,
        channels: int,
        split: str,
        *,
        hdim: int,
        blocks: int,
        components: int,
        context_channels: int = 0,
        binary_weights: bool = False,
        binary_activations: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        if split not in ("stripe", "channel"):
            raise ValueError(f"split must be 'stripe' or 'channel', got {split!r}")
        half = channels if split == "stripe" else channels // 2
        self.split = split
        self.norms = nn.ModuleList([ActNorm(half), ActNorm(half)])
        self.pointwise = nn.ModuleList([Pointwise(half), Pointwise(half)])
        self.transform = MixLogisticTransform(components)
        self.cond = ConditioningNet(
            half,
            half * self.transform.params_per_element,
            hdim=hdim,
            blocks=blocks,
            context_channels=context_channels,
            binary_weights=binary_weights,
            binary_activations=binary_activations,
            dropout=dropout,
        )

    def _params(self, cond_half, context):
        n, c, h, w = cond_half.shape
        # The network may run under bf16 autocast; the elementwise transform is computed in the flow's dtype.
        params = self.cond(cond_half, context).to(cond_half.dtype)
        return params.view(n, c, self.transform.params_per_element, h, w)

    def forward(self, x, context=None):
        halves, logdet = [], 0
        for half, norm, pw in zip(split(x, self.split), self.norms, self.pointwise, strict=True):
            half, ld_norm = norm(half)
            half, ld_pw = pw(half)
            halves.append(half)
            logdet = logdet + ld_norm + ld_pw
        a, b = halves
        b, ld_mix = self.transform(b, self._params(a, context))
        return merge(b, a, self.split), logdet + ld_mix  # halves swapped

    def inverse(self, y, context=None):
        b, a = split(y, self.split)
        b = self.transform.inverse(b, self._params(a, context))
        a = self.norms[0].inverse(self.pointwise[0].inverse(a))
        b = self.norms[1].inverse(self.pointwise[1].inverse(b))
        return merge(a, b, self.split)


# ------------------------------------------------------------------------------ dequantization
class ContextNet(nn.Module):
    """Dequantization context: image / 256 - 0.5, stripe halves stacked on channels (so the context lines up
    with the stripe halves the dequantization couplings see), a full-precision 3x3 conv to ``width``, then
    ``blocks`` gated residual blocks (3x3 gates, as in Flow++). Always full precision (see FlowPP docs)."""

    def __init__(self, channels: int, width: int, blocks: int, dropout: float = 0.0):
        super().__init__()
        self.proj = WNConv2d(2 * channels, width, 3, padding=1)
        self.blocks = nn.ModuleList(GatedResBlock(width, gate_kernel=3, dropout=dropout) for _ in range(blocks))

    def forward(self, x):
        h = torch.cat(split(x / 256.0 - 0.5, "stripe"), dim=1)  # (N, 2C, H, W/2)
        h = self.proj(h)  # (N, width, H, W/2)
        for block in self.blocks:
            h = block(h)
        return h


class DequantFlow(nn.Module):
    """Variational dequantization q(u | x): Gaussian noise -> stripe couplings (conditioned on the context of
    x) -> sigmoid -> u in (0, 1)^D. ``forward(eps, x)`` returns ``(u, log |det du/deps|)``."""

    def __init__(
        self,
        channels: int,
        *,
        couplings: int,
        hdim: int,
        blocks: int,
        components: int,
        context_width: int,
        context_blocks: int,
        binary_weights: bool = False,
        binary_activations: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.context = ContextNet(channels, context_width, context_blocks, dropout=dropout)
        self.couplings = nn.ModuleList(
            Coupling(
                channels,
                "stripe",
                hdim=hdim,
                blocks=blocks,
                components=components,
                context_channels=context_width,
                binary_weights=binary_weights,
                binary_activations=binary_activations,
                dropout=dropout,
            )
            for _ in range(couplings)
        )
        self.sigmoid = Sigmoid()

    def forward(self, eps, x):
        ctx = self.context(x)  # (N, context_width, H, W/2)
        h, logdet = eps, 0
        for coupling in self.couplings:
            h, ld = coupling(h, ctx)
            logdet = logdet + ld
        u, ld = self.sigmoid(h)
        return u, logdet + ld

    def inverse(self, u, x):
        ctx = self.context(x)
        h = self.sigmoid.inverse(u)
        for coupling in reversed(self.couplings):
            h = coupling.inverse(h, ctx)
        return h
