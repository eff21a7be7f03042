"""Plain DeepSpeed data parallelism (``comm: dp/none``, the default), ZeRO stage 0, 1 or 2.

Its own module because it is the one mode that leaves the exchange to DeepSpeed (all-reduce, or ZeRO's
reduce-scatter into partitions) and reads the norm of partitioned gradients from DeepSpeed; the other modes
(:mod:`dbgen.sync.packed`, :mod:`dbgen.sync.dp_onebit`) replace the exchange and need ZeRO 0. With
``comm.overlap`` at ZeRO 0 it all-reduces the gradients itself, bucket by bucket during backward
(:mod:`dbgen.sync.buckets`), with DeepSpeed's stage-0 math (sum, times 1/W).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .accounting import comm_kind
from .base import EngineSync, agreed_norm, nan_as_inf
from .buckets import GradBuckets
from .collectives import Pending, start_all_reduce_mean

__all__ = ["DataParallelSync"]


class DataParallelSync(EngineSync):
    """Plain DeepSpeed data parallelism (``comm: dp/none``), ZeRO stage 0, 1 or 2 from ``scale.zero_stage``.

    DeepSpeed's automatic reduction at the end of ``engine.backward`` is switched off
    (``engine.enable_backward_allreduce = False``) and ``engine.allreduce_gradients()`` is called by
    :meth:`reduce`, so communication is timed on its own and a replacement mode can reduce differently.
    ZeRO 2 still reduce-scatters full buckets from backward hooks during the backward pass (overlapped).

    ``overlap`` (``comm.overlap``; ZeRO 0 and more than one worker only): the gradients are all-reduced in
    buckets of ``bucket_mb`` started during the last micro-step's backward (:class:`GradBuckets`), averaged like
    DeepSpeed's stage-0 reduction; :meth:`reduce` waits for them. ZeRO 1/2 keep DeepSpeed's own schedule.
    """

    def __init__(self, engine, optimizer, overlap: bool = False, bucket_mb: float = 25.0):
        super().__init__(engine, optimizer)
        self.zero_stage = engine.zero_optimization_stage()
        self.buckets: GradBuckets | None = None
        self._pending: list[Pending] = []
        if overlap and self.zero_stage == 0 and dist.get_world_size() > 1:
            size = bucket_mb * 2**20
            self.buckets = GradBuckets(engine.module, size, self._launch, lambda buckets: None, True)

    def backward(self, loss, last):
        if self.buckets is not None and last:
            self.buckets.arm()
        super().backward(loss, last)
        if self.zero_stage == 2 and not last:
            self.engine.allreduce_gradients()  # ZeRO 2 reduces every micro-batch into its partition

    def _launch(self, index: int, params) -> None:
        with comm_kind("grad"):  # hooks may run on autograd's device threads: label the bytes here
            self._pending.append(start_all_reduce_mean(params))

    def reduce(self):
        if self.buckets is None:
            self.engine.allreduce_gradients()
            return
        self.buckets.finish()
        for pending in self._pending:
            pending.wait()
        self._pending.clear()

    def grad_norm(self):
        if self.zero_stage == 0:
            return super().grad_norm()  # gradients are all-reduced: every rank holds the full averaged gradient
        # ZeRO 1/2: partitions only; DeepSpeed's own norm over them is all-reduced (-1 marks inf/nan).
        norm = torch.as_tensor(self.engine.optimizer.scaled_global_norm(), dtype=torch.float32)
        return agreed_norm(nan_as_inf(torch.where(norm < 0, torch.full_like(norm, math.inf), norm)))
