"""Plain DeepSpeed data parallelism (``comm: dp/none``, the default), ZeRO stage 0, 1 or 2.

Its own module because it is the one mode that leaves the exchange to DeepSpeed (all-reduce, or ZeRO's
reduce-scatter into partitions) and reads the norm of partitioned gradients from DeepSpeed; the other modes
(:mod:`dbgen.sync.packed`, :mod:`dbgen.sync.dp_onebit`) replace the exchange and need ZeRO 0.
"""

from __future__ import annotations

import math

import torch

from .base import EngineSync, agreed_norm, nan_as_inf

__all__ = ["DataParallelSync"]


class DataParallelSync(EngineSync):
    """Plain DeepSpeed data parallelism (``comm: dp/none``), ZeRO stage 0, 1 or 2 from ``scale.zero_stage``.

    DeepSpeed's automatic reduction at the end of ``engine.backward`` is switched off
    (``engine.enable_backward_allreduce = False``) and ``engine.allreduce_gradients()`` is called by
    :meth:`reduce`, so communication is timed on its own and a replacement mode can reduce differently.
    ZeRO 2 still reduce-scatters full buckets from backward hooks during the backward pass (overlapped).
    """

    def __init__(self, engine, optimizer):
        super().__init__(engine, optimizer)
        self.zero_stage = engine.zero_optimization_stage()

    def backward(self, loss, last):
        super().backward(loss, last)
        if self.zero_stage == 2 and not last:
            self.engine.allreduce_gradients()  # ZeRO 2 reduces every micro-batch into its partition

    def reduce(self):
        self.engine.allreduce_gradients()

    def grad_norm(self):
        if self.zero_stage == 0:
            return super().grad_norm()  # gradients are all-reduced: every rank holds the full averaged gradient
        # ZeRO 1/2: partitions only; DeepSpeed's own norm over them is all-reduced (-1 marks inf/nan).
        norm = torch.as_tensor(self.engine.optimizer.scaled_global_norm(), dtype=torch.float32)
        return agreed_norm(nan_as_inf(torch.where(norm < 0, torch.full_like(norm, math.inf), norm)))
