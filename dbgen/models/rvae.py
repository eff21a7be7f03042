"""ResNet VAE (Kingma et al. 2016, bidirectional inference, no IAF) with binary residual layers (Bird et al. 2021).

Shapes for the paper config (C=3, 32x32, width 256, zdim 8)::

    x (N,3,32,32) uint8 -> [-1,1] -> first_conv 5x5/2 -> (N,256,16,16) -> proc_in: 4 residual 5x5 layers
    bottom-up:  for each stochastic layer, bottom to top:  u = res(u);  q = conv(elu(u)) (N,2z,16,16)
    top-down:   d = h_top (N,256,16,16); for each layer, top to bottom:
                    p, r = conv(elu(d)) (N,4z,16,16)   prior (loc, scale) and posterior correction
                    z ~ Logistic(q + r)  (inference)  or  Logistic(p)  (sampling)
                    d = res(d) + conv(elu(z))
    output:     proc_out: 4 residual 5x5 layers -> elu -> 5x5/2 transposed conv -> loc (N,3,32,32)
    p(x|z):     discretized logistic(loc, exp(log_scale)), one global learned log-scale (data-initialized)

Binary layers: exactly the two convs of every residual layer (:class:`ResidualLayer`), BWN when
``binary_weights``; with ``binary_activations`` their inputs go through sign. Everything else is full precision:
the first and last convs, the convs producing latent parameters and mapping z back, ``h_top`` and the
likelihood's log-scale. Those convs are weight-normalized (:class:`dbgen.nn.WNConv2d`) as in the original
code: data-dependent init then sets the scale of every latent parameter and of the output at the start
(``init_scale = 0.1``), and the parameter count matches the paper's 56.15M.

The latent KL has no closed form for logistics: like the IAF-VAE code we use the single-sample estimate
``log q(z|x) - log p(z)`` at the sampled z, which is also exactly what the importance-weighted bound needs.

Two deliberate differences from the paper's code: (1) the bottom-up residual layer is applied before the
posterior-parameter conv (the original read the posterior before it, so the top layer's bottom-up residual
layer fed nothing and got no gradient); (2) the likelihood scale is ``exp(log_scale)``, data-initialized
(:class:`~dbgen.models.likelihoods.DiscretizedLogistic`), rather than ``softplus`` of a zero-initialized value.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RVAEConfig
from ..nn import BinaryActivation, BinaryConv2d, WNConv2d, WNConvTranspose2d
from .checkpointing import run_block
from .likelihoods import DiscretizedLogistic, at_least_fp32, bits_per_dim, logistic_logp, logistic_sample, to_unit

__all__ = ["RVAE", "ResidualLayer", "StochasticLayer", "free_bits_kl"]

# init_scale of the full-precision WN convs (the original code's default): small latent parameters and
# output locations at the start.
FP_INIT_SCALE = 0.1


def latent_scale(raw: torch.Tensor) -> torch.Tensor:
    """Logistic scale from an unconstrained value: ``0.01 + softplus(raw)`` (bounded away from 0)."""
    return 0.01 + F.softplus(raw)


def free_bits_kl(kl: torch.Tensor, kl_min: float) -> torch.Tensor:
    """Free-bits KL objective (scalar, nats per example) from the elementwise KL estimate (N, z, h, w).

    The KL of each latent channel, summed over positions and averaged over the batch, is clamped below at
    ``kl_min``: channels under the floor get no gradient pushing them further towards the prior.
    """
    per_channel = kl.sum(dim=(2, 3)).mean(dim=0)  # (z,)
    return per_channel.clamp(min=kl_min).sum()


class ResidualLayer(nn.Module):
    """``x + conv2(act(conv1(act(x))))``: the model's only binary layers.

    ``conv2`` starts at ``init_scale = 0`` (zero gain and bias after data-dependent init), so every residual
    branch starts as the identity.
    """

    def __init__(self, width: int, kernel: int, binary_weights: bool, binary_activations: bool):
        super().__init__()
        conv = BinaryConv2d if binary_weights else WNConv2d
        self.conv1 = conv(width, width, kernel, padding=kernel // 2, init_scale=1.0)
        self.conv2 = conv(width, width, kernel, padding=kernel // 2, init_scale=0.0)
        # A module, not a function call, so that packed execution (dbgen.kernels.to_packed) can see the sign.
        self.act = BinaryActivation() if binary_activations else nn.ELU()
        self.sign_chains = ()
        if binary_weights and binary_activations:
            # Both convs read sign activations, and conv1's output reaches conv2 only through ``act``: packed
            # execution runs both on the fully binary kernel and hands conv1's output to conv2 as packed bits.
            self.conv1.binary_input = self.conv2.binary_input = True
            self.sign_chains = (("conv1", "act", "conv2"),)

    def forward(self, x):
        return x + self.conv2(self.act(self.conv1(self.act(x))))


class StochasticLayer(nn.Module):
    """One latent layer: a bottom-up and a top-down residual layer and the full-precision latent convs."""

    def __init__(self, cfg: RVAEConfig):
        super().__init__()
        w, z, k = cfg.width, cfg.zdim, cfg.kernel
        res = dict(width=w, kernel=k, binary_weights=cfg.binary_weights, binary_activations=cfg.binary_activations)
        self.up_res = ResidualLayer(**res)
        self.up_params = WNConv2d(w, 2 * z, k, padding=k // 2, init_scale=FP_INIT_SCALE)
        self.down_params = WNConv2d(w, 4 * z, k, padding=k // 2, init_scale=FP_INIT_SCALE)
        self.down_res = ResidualLayer(**res)
        self.z_proj = WNConv2d(z, w, k, padding=k // 2, init_scale=FP_INIT_SCALE)

    def up(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bottom-up step: the next state (N, w, h, w) and the posterior parameters (N, 2z, h, w)."""
        u = self.up_res(u)
        # Latent parameters in fp32 even under bf16 autocast: the KL estimate subtracts two log densities of the
        # same sample, and bf16 sums like q_loc + r_loc moved the paper model's initial loss by 8e-3 bits/dim
        # (1.8e-4 with these casts; the convolutions themselves stay bf16).
        return u, at_least_fp32(self.up_params(F.elu(u)))

    def down(self, d: torch.Tensor, q_params: torch.Tensor | None, temperature: float = 1.0):
        """Top-down step. With ``q_params`` z comes from the posterior and the elementwise KL estimate
        ``log q(z|x) - log p(z)`` (N, z, h, w) is returned; without, z comes from the prior (at
        ``temperature``) and the KL is None."""
        p_loc, p_raw, r_loc, r_raw = at_least_fp32(self.down_params(F.elu(d))).chunk(4, dim=1)  # 4 x (N, z, h, w)
        p_scale = latent_scale(p_raw)
        if q_params is None:
            z = logistic_sample(p_loc, p_scale, temperature)
            kl = None
        else:
            q_loc, q_raw = q_params.chunk(2, dim=1)
            q_loc, q_scale = q_loc + r_loc, latent_scale(q_raw + r_raw)
            z = logistic_sample(q_loc, q_scale)
            kl = logistic_logp(z, q_loc, q_scale) - logistic_logp(z, p_loc, p_scale)
        return self.down_res(d) + self.z_proj(F.elu(z)), kl


class RVAE(nn.Module):
    """The ResNet VAE; see the module docstring for the architecture and :mod:`dbgen.models` for the interface."""

    def __init__(self, cfg: RVAEConfig):
        super().__init__()
        self.cfg = cfg
        c, w, pk = cfg.channels, cfg.width, cfg.proc_kernel
        res = dict(width=w, kernel=pk, binary_weights=cfg.binary_weights, binary_activations=cfg.binary_activations)
        self.latent_size = cfg.image_size // 2**cfg.stride2_stages
        self.dims = c * cfg.image_size**2

        self.first_conv = WNConv2d(c, w, pk, stride=2, padding=pk // 2, init_scale=FP_INIT_SCALE)
        # Larger images (64x64: stride2_stages 2) get more stride-2 stages, so the latent grid stays 16x16 (the
        # multi-resolution VAEs, e.g. VDVAE, also downsample 64x64 images before their top latents).
        self.down_convs = nn.ModuleList(
            WNConv2d(w, w, pk, stride=2, padding=pk // 2) for _ in range(cfg.stride2_stages - 1)
        )
        self.proc_in = nn.Sequential(*[ResidualLayer(**res) for _ in range(cfg.num_proc_layers)])
        self.layers = nn.ModuleList([StochasticLayer(cfg) for _ in range(cfg.num_stochastic)])  # bottom to top
        self.h_top = nn.Parameter(torch.zeros(w))  # learned input of the top-down path (IAF-VAE's h_top)
        self.proc_out = nn.Sequential(*[ResidualLayer(**res) for _ in range(cfg.num_proc_layers)])
        self.up_convs = nn.ModuleList(
            WNConvTranspose2d(w, w, pk, stride=2, padding=pk // 2, output_padding=1)
            for _ in range(cfg.stride2_stages - 1)
        )
        self.last_conv = WNConvTranspose2d(
            w, c, pk, stride=2, padding=pk // 2, output_padding=1, init_scale=FP_INIT_SCALE
        )
        self.likelihood = DiscretizedLogistic()  # p(x|z), one global learned log-scale
        # train.activation_checkpointing: recompute every residual and stochastic layer in the backward pass
        self.activation_checkpointing = False

    # ------------------------------------------------------------------------------------------ stages
    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.cfg.channels, self.cfg.image_size, self.cfg.image_size)
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4 or tuple(x.shape[1:]) != expected:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"RVAE expects uint8 images of shape (N, {', '.join(map(str, expected))}), got {got}")

    def _up(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Bottom-up pass: posterior parameters (N, 2z, h, w) of every stochastic layer, bottom to top."""
        u = F.elu(self.first_conv(x))  # (N, w, H/2, W/2)
        for conv in self.down_convs:
            u = F.elu(conv(u))  # halves the grid again
        for layer in self.proc_in:
            u = run_block(self.activation_checkpointing, layer, u)
        q_params = []
        for layer in self.layers:
            u, q = run_block(self.activation_checkpointing, layer.up, u)
            q_params.append(q)
        return q_params

    def _down(self, n: int, q_params: list[torch.Tensor] | None, temperature: float = 1.0):
        """Top-down pass: output locations (N, C, H, W) and the per-layer KL estimates (top to bottom; empty
        when sampling from the prior, i.e. ``q_params`` is None)."""
        s = self.latent_size
        d = self.h_top.view(1, -1, 1, 1).expand(n, -1, s, s)  # (N, w, H/2, W/2)
        q_params = q_params if q_params is not None else [None] * len(self.layers)
        kls = []
        for layer, q in zip(reversed(self.layers), reversed(q_params), strict=True):
            d, kl = run_block(self.activation_checkpointing, layer.down, d, q, temperature)
            if kl is not None:
                kls.append(kl)
        for layer in self.proc_out:
            d = run_block(self.activation_checkpointing, layer, d)
        for conv in self.up_convs:
            d = F.elu(conv(d))  # doubles the grid
        loc = self.last_conv(F.elu(d))  # (N, C, H, W)
        return loc, kls

    # ------------------------------------------------------------------------------------------ interface
    def forward(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """Training loss: negative ELBO with free bits, bits/dim, mean over the batch (scalar)."""
        self._check_input(x_uint8)
        x = to_unit(x_uint8, self.h_top.dtype)
        loc, kls = self._down(x.shape[0], self._up(x))
        nll = -self.likelihood(x, loc).mean()
        kl = sum(free_bits_kl(k, self.cfg.kl_min) for k in kls)
        return bits_per_dim(nll + kl, self.dims)

    def loss(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return self(x_uint8)

    @torch.no_grad()
    def log_likelihood_bpd(self, x_uint8: torch.Tensor, samples: int = 1) -> torch.Tensor:
        """Importance-weighted bound in bits/dim per example (N,), with ``samples`` posterior samples.

        ``log p(x) >= log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x)``; no free bits. K=1 is the ELBO. The
        bottom-up pass is deterministic, so it runs once; each sample is one top-down pass over the batch.
        """
        self._check_input(x_uint8)
        if not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive int, got {samples!r}")
        x = to_unit(x_uint8, self.h_top.dtype)
        q_params = self._up(x)
        log_w = []
        for _ in range(samples):
            loc, kls = self._down(x.shape[0], q_params)
            log_w.append(self.likelihood(x, loc) - sum(k.sum(dim=(1, 2, 3)) for k in kls))  # (N,)
        log_px = torch.logsumexp(torch.stack(log_w), dim=0) - math.log(samples)
        return bits_per_dim(-log_px, self.dims)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        """``n`` images (n, C, H, W) uint8 from the prior; ``temperature`` scales every sampled variable's noise
        (latents and pixels; 0 gives the deterministic mode path). Uses the global torch RNG."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        loc, _ = self._down(n, None, temperature)
        return self.likelihood.sample(loc, temperature)
