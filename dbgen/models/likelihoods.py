"""Likelihoods shared by the models: the logistic distribution and the discretized logistic over 8-bit pixels.

Pixels are scaled to ``[-1, 1]`` (``x = (k - 127.5) / 127.5`` for ``k`` in 0..255), so the 256 values are bin
centres ``2 / 255`` apart. Every function computes in at least float32 (under bf16 autocast the log-masses of
narrow bins would otherwise lose all precision) and returns elementwise values: callers sum.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BITS",
    "DiscretizedLogistic",
    "at_least_fp32",
    "bits_per_dim",
    "discretized_logistic_logp",
    "discretized_logistic_sample",
    "from_unit",
    "logistic_logp",
    "logistic_sample",
    "to_unit",
]

BITS = 8
_LEVELS = 2**BITS  # 256 pixel values
_HALF_BIN = 1.0 / (_LEVELS - 1)  # half the distance between neighbouring bin centres on [-1, 1]
# Uniform noise is clamped away from 0 and 1 so logistic samples stay finite (as the original code did).
_U_EPS = 1e-5


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def to_unit(x_uint8: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 pixels -> bin centres in [-1, 1]."""
    return (x_uint8.to(dtype) - 127.5) / 127.5


def from_unit(x: torch.Tensor) -> torch.Tensor:
    """Values on the [-1, 1] scale -> nearest pixel value as uint8 (clamped to 0..255)."""
    return torch.round((x + 1.0) * 127.5).clamp_(0, _LEVELS - 1).to(torch.uint8)


def bits_per_dim(nats: torch.Tensor, dims: int) -> torch.Tensor:
    """Negative log-likelihood in nats over ``dims`` dimensions -> bits per dimension."""
    return nats / (math.log(2.0) * dims)


def logistic_logp(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log density of Logistic(loc, scale) at z: ``-y - log(scale) - 2 softplus(-y)``, ``y = (z - loc) / scale``."""
    z, loc, scale = at_least_fp32(z), at_least_fp32(loc), at_least_fp32(scale)
    y = (z - loc) / scale
    return -y - torch.log(scale) - 2.0 * F.softplus(-y)


def _logistic_noise(like: torch.Tensor) -> torch.Tensor:
    """Standard logistic noise ``log(u) - log(1 - u)`` with the shape, dtype and device of ``like``.

    Drawn in logical (NCHW) order whatever the memory format of ``like`` (``rand_like`` would follow a
    channels_last layout), so the same seed gives the same sample with ``train.channels_last`` on or off."""
    u = torch.rand(like.shape, dtype=like.dtype, device=like.device).clamp_(_U_EPS, 1.0 - _U_EPS)
    return torch.log(u) - torch.log1p(-u)


def logistic_sample(loc: torch.Tensor, scale: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Reparameterized sample ``loc + temperature * scale * eps``, eps standard logistic."""
    return loc + (temperature * scale) * _logistic_noise(loc)


def discretized_logistic_logp(x: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(pixel) under a logistic of ``loc``, ``exp(log_scale)`` discretized to the 256 bins of [-1, 1].

    ``x`` holds bin centres (:func:`to_unit`). Each value gets the logistic mass of its bin
    ``[x - 1/255, x + 1/255]``; the first and last bins extend to -inf and +inf, so the 256 masses sum to 1.
    The mass ``sigmoid(a) - sigmoid(b)`` (``a > b``) is computed as
    ``sigmoid(a) * sigmoid(-b) * (1 - exp(b - a))``, which is exact and needs no branch for far-away bins
    (the original code switched to a density approximation there).
    """
    x, loc, log_scale = at_least_fp32(x), at_least_fp32(loc), at_least_fp32(log_scale)
    inv_scale = torch.exp(-log_scale)
    centered = x - loc
    upper = inv_scale * (centered + _HALF_BIN)  # standardized upper bin edge
    lower = inv_scale * (centered - _HALF_BIN)  # standardized lower bin edge
    log_mass = F.logsigmoid(upper) + F.logsigmoid(-lower) + torch.log(-torch.expm1(lower - upper))
    log_cdf_upper = F.logsigmoid(upper)  # pixel 0: everything below its upper edge
    log_sf_lower = F.logsigmoid(-lower)  # pixel 255: everything above its lower edge
    return torch.where(x < -1.0 + _HALF_BIN, log_cdf_upper, torch.where(x > 1.0 - _HALF_BIN, log_sf_lower, log_mass))


def discretized_logistic_sample(loc: torch.Tensor, log_scale: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Exact sample of :func:`discretized_logistic_logp` as uint8 pixels (noise scaled by ``temperature``).

    Rounding a continuous logistic sample to the nearest bin centre and clamping to 0..255 puts exactly each
    bin's mass (tails included) on its pixel value.
    """
    return from_unit(logistic_sample(loc, torch.exp(log_scale), temperature))


class DiscretizedLogistic(nn.Module):
    """p(x | loc): discretized logistic with one learned global ``log_scale`` (on the [-1, 1] scale).

    Data-dependent init sets the scale from the first batch's residuals ``x - loc`` (the logistic's variance
    ``pi^2 s^2 / 3`` matched to their mean square): the optimizer moves a log-scale by about ``lr`` per step,
    so a data-independent start (scale 1, a third of the pixel range) costs thousands of steps to undo.
    """

    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        """log p(x | loc) in nats per example (N,); ``x`` holds bin centres (:func:`to_unit`)."""
        return discretized_logistic_logp(x, loc, self.log_scale).flatten(1).sum(dim=1)

    @torch.no_grad()
    def data_init(self, x: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        mean_sq = (at_least_fp32(x) - at_least_fp32(loc)).square().mean()
        scale = torch.sqrt(3.0 * mean_sq) / math.pi
        self.log_scale.copy_(torch.log(scale.clamp(min=1e-3)))
        return self(x, loc)

    @torch.no_grad()
    def sample(self, loc: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """uint8 pixels drawn from p(x | loc), noise scaled by ``temperature``."""
        return discretized_logistic_sample(loc, self.log_scale, temperature)
