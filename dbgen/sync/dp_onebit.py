"""``comm: binary_weights dp, binary_grads onebit``: plain data parallelism with the binary gradients'
all-reduce compressed to 1 bit per element after the warm-up (1-bit Adam's compressed all-reduce).

A mode of its own because, unlike :mod:`dbgen.sync.packed`, every rank keeps every latent and its Adam state
(the checkpoint is DeepSpeed's, replicated), so the averaged gradient must come back to every rank: compressed
twice, with an error buffer on each side.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .accounting import comm_kind
from .base import ExchangeSync
from .collectives import start_all_reduce_mean
from .layout import PARTITION_DIR, load_partitions, save_partition
from .onebit import OneBitExchange

__all__ = ["DataParallelOnebitSync"]


class DataParallelOnebitSync(ExchangeSync):
    """``comm: binary_weights dp, binary_grads onebit``: plain data parallelism (every rank holds every latent
    and its Adam state) with the binary gradients' all-reduce compressed after ``onebit_warmup_steps``, as
    1-bit Adam's compressed all-reduce: a 1-bit reduce-scatter with sender-side error feedback, then each rank's
    averaged slice compressed again with its receiver-side error buffer and all-gathered as 1-bit messages
    (:class:`OneBitExchange`). Full-precision gradients are all-reduced as usual; during the warm-up
    everything goes through DeepSpeed's own all-reduce. Error buffers are per rank, in
    ``packed/rank_<r>_of_<W>.pt``; latents and Adam state are in DeepSpeed's (replicated) checkpoint, so a
    plain data-parallel checkpoint resumes here (warming up again, with zero errors).
    """

    mode = "dp_onebit"
    option = "binary_grads=onebit"
    resumes_plain_dp = True

    def __init__(self, engine, optimizer, onebit_warmup_steps: int):
        super().__init__(engine, optimizer, onebit_warmup_steps)
        self.exchange = OneBitExchange(self.layout, receiver_side=True)

    @torch.no_grad()
    def reduce(self):
        compressed = self._next_compressed()
        with comm_kind("grad"):
            if not compressed:
                self.engine.allreduce_gradients()
            else:
                start_all_reduce_mean(self.fp_params).wait()
                g = self.layout.flat([p.grad for p in self.layout.params])  # (padded,)
                full = self.exchange.all_gather(self.exchange.reduce_scatter(g))  # (padded,), same on all ranks
                for p, t in zip(self.layout.params, self.layout.split(full), strict=True):
                    p.grad = t

    def step(self, lr, clip_coef, skip):
        skip = bool(skip)  # a host decision: whether to keep this step's compression errors depends on it
        super().step(lr, clip_coef, skip)  # ClientAdam on every (replicated) parameter
        self._settle(skip)

    def save_partition(self, directory: str | Path):
        return save_partition(
            directory,
            self.layout,
            {"recv_error": self.exchange.recv_error},
            {"send_error": self.exchange.send_error},
            {"step": None},
        )

    def load_partition(self, directory: str | Path):
        if not (Path(directory) / PARTITION_DIR).is_dir():
            return  # written by plain data parallelism: no error buffers yet
        part = load_partitions(directory, self.layout, ["recv_error"], ["send_error"])
        if part["recv_error"] is not None:
            self.exchange.recv_error = part["recv_error"]
        if part["send_error"] is not None:
            self.exchange.send_error = part["send_error"]
