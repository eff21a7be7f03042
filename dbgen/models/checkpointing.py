"""Activation checkpointing (``train.activation_checkpointing``): recompute a block in the backward pass.

Why non-reentrant ``torch.utils.checkpoint`` with ``preserve_rng_state``: the RVAE's stochastic blocks draw
latent noise, and the recomputation must draw exactly the same noise, so the CPU (and CUDA) RNG state at the
block's entry is saved and restored for the replay; non-reentrant checkpointing also handles blocks whose
outputs include None (the KL of a prior pass) and nested use.
"""

from __future__ import annotations

from torch import is_grad_enabled
from torch.utils.checkpoint import checkpoint

__all__ = ["run_block", "set_activation_checkpointing"]


def run_block(enabled: bool, fn, *args):
    """``fn(*args)``, checkpointed when ``enabled`` and autograd records (no recomputation to save under no_grad)."""
    if enabled and is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)
    return fn(*args)


def set_activation_checkpointing(model, enabled: bool) -> int:
    """Switch checkpointing on or off in every module of ``model`` that supports it (those with an
    ``activation_checkpointing`` attribute: the RVAE, each Flow++ conditioning network); returns how many."""
    modules = [m for m in model.modules() if hasattr(m, "activation_checkpointing")]
    for m in modules:
        m.activation_checkpointing = enabled
    return len(modules)
