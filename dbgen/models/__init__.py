"""Models. ``build(config)`` returns a single-device ``nn.Module`` that knows nothing of Ray or DeepSpeed.

Every model has the same interface (what the trainer, eval and sampling use):

* ``forward(x_uint8) -> scalar``: the training loss in bits/dim, mean over the batch (negative ELBO for the
  RVAE, dequantized bound for Flow++). ``loss(x)`` is the same call.
* ``log_likelihood_bpd(x_uint8, samples=K) -> (N,)`` per-example importance-weighted bound in bits/dim.
* ``sample(n, temperature=1.0) -> uint8 (n, C, H, W)``.
* Data-dependent init through :func:`dbgen.nn.data_dependent_init(model, x_uint8)`.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..config import Config, FlowPPConfig, RVAEConfig, load_config
from .checkpointing import set_activation_checkpointing
from .flowpp import FlowPP
from .rvae import RVAE

__all__ = ["build", "set_activation_checkpointing"]


def build(config: str | Path | dict | Config | RVAEConfig | FlowPPConfig) -> nn.Module:
    """Build the model of a config (a YAML path, a full config dict, a :class:`Config` or a model section)."""
    if isinstance(config, RVAEConfig | FlowPPConfig):
        mcfg = config
    else:
        mcfg = load_config(config).model
    if isinstance(mcfg, RVAEConfig):
        return RVAE(mcfg)
    return FlowPP(mcfg)
