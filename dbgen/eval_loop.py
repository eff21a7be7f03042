"""The one evaluation loop: bits/dim of a model over batches of a held-out split.

Every evaluation runs it: the trainer (each rank over its shard of ``data.eval``, then summed over ranks),
``python -m dbgen.evaluate`` and the Ray actors of :mod:`dbgen.export`. The caller sets the RNG (the bound's
posterior or dequantization noise), the weights and the mode; :func:`bpd_sum` only adds up. The sum stays on
the model's device in float64 (one host read at the end), added in batch order, so it is the same number
whichever caller computes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["bpd_sum", "evaluate_bpd"]


@torch.no_grad()
def bpd_sum(model: nn.Module, batches: Iterable[torch.Tensor], *, samples: int = 1, max_batches: int | None = None,
            to_device: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, int]:
    """``(sum of per-row bits/dim as a float64 tensor on the model's device, rows)`` over the first
    ``max_batches`` (all if None) of ``batches`` (uint8 NCHW). Each row's bound uses ``samples`` importance
    samples (1: the ELBO / the flow's dequantized bound). ``to_device`` moves a batch (default: ``.to`` the
    model's device)."""
    device = next(model.parameters()).device
    move = to_device or (lambda x: x.to(device))
    total, rows = torch.zeros((), dtype=torch.float64, device=device), 0
    for i, x in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        total += model.log_likelihood_bpd(move(x), samples=samples).double().sum()  # (N,) -> ()
        rows += x.shape[0]
    return total, rows


def evaluate_bpd(model: nn.Module, batches: Iterable[torch.Tensor], samples: int = 1,
                 max_batches: int | None = None) -> tuple[float, int]:
    """Mean bits/dim over every row of ``batches`` (uint8 NCHW tensors) and the number of rows (nan for none)."""
    total, rows = bpd_sum(model, batches, samples=samples, max_batches=max_batches)
    return (total.item() / rows if rows else math.nan), rows
