"""Data-dependent initialization: one forward pass that sets gains and biases from the data."""

from __future__ import annotations

import logging

import torch
from torch import nn

__all__ = ["data_dependent_init"]

log = logging.getLogger(__name__)


@torch.no_grad()
def data_dependent_init(model: nn.Module, *inputs, forward=None) -> int:
    """Initialize every module of ``model`` that has a ``data_init(*args)`` method from one batch.

    Runs ``forward(*inputs)`` (default ``model(*inputs)``) once. Each such module (the WN/BWN layers, the
    flow's per-channel normalization) is initialized at its first call, in forward order, from the input it
    actually receives, so downstream layers see already-initialized upstream outputs. The module's
    ``data_init`` sets its parameters and returns the output the forward pass continues with. The hooks are
    removed afterwards, also on error: no mode flag and no tensor stays on any module. Returns the number of
    modules initialized.
    """
    done: set[int] = set()
    handles = []

    def hook(module, args, output):
        if id(module) in done:
            return output
        done.add(id(module))
        return module.data_init(*args)

    for m in model.modules():
        if callable(getattr(m, "data_init", None)):
            handles.append(m.register_forward_hook(hook))
    try:
        (forward or model)(*inputs)
    finally:
        for h in handles:
            h.remove()
    log.info("data-dependent init: %d of %d modules initialized", len(done), len(handles))
    return len(done)
