"""Gradients in buckets whose collectives start during backward (``comm.overlap``), as DDP's reducer does.

Why: in the serial schedule every byte of the gradient exchange waits for the whole backward pass. Started
bucket by bucket as gradients become ready, the exchange of the first-ready gradients runs while the others
are still being computed, and a step costs about max(compute, communication) instead of their sum.

Buckets hold whole parameters in the order backward makes their gradients ready, about ``bucket_bytes`` each.
That order is not the reverse of registration in general: a VAE registers each layer's encoder and decoder
parts together and backward reaches them at opposite ends of the pass, so buckets cut by registration would
complete only at its end. The first step records the order, rank 0's record is broadcast so every rank cuts
the same buckets, and during the backward of a step's last micro-step (:meth:`arm`), a bucket is launched (the
mode's ``launch(index, params)``) once every gradient in it has been accumulated
(``Tensor.register_post_accumulate_grad_hook``) and every bucket before it has been launched: every rank
issues the same collectives in the same order. Earlier micro-steps launch nothing. In the first step, while
the order is recorded, the buckets are cut from the reverse of the order in which the first forward pass (with
autograd on) used the parameters, which backward follows closely: the first step overlaps too, and holds no
more gradients than the next ones (a mode that frees each bucket's gradients, as the packed one does, needs
that to keep its memory bounded from the start). :meth:`finish` launches what is left: parameters that got no
gradient, or every bucket when nothing was armed. Each time the buckets are cut, the mode's ``plan(buckets)``
is called first.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from .accounting import comm_kind

__all__ = ["GradBuckets"]

log = logging.getLogger(__name__)

Params = list[torch.nn.Parameter]


class GradBuckets:
    """``params`` in buckets of about ``bucket_bytes``. Without ``hooks`` (the serial schedule) there is one
    bucket holding every parameter (registration order), launched by :meth:`finish`; with them the first armed
    backward records the order gradients become ready and the buckets are cut from it (see the module)."""

    def __init__(self, module, bucket_bytes: float, launch: Callable[[int, Params], None], plan, hooks: bool):
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.bucket_bytes = bucket_bytes
        self._launch, self._plan = launch, plan
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._cut([self.params])
        self._recorded: list[int] | None = None if hooks else []  # None: the next armed backward records
        self._order: list[int] = []  # parameter indices in the order their gradients became ready
        self._armed, self._next, self._warned = False, 0, False
        self._missing: list[int] = []
        self._seen: set[int] = set()
        self._used: dict[int, None] = {}  # parameter indices in the order the first forward used them
        self._forward_hooks = []
        if hooks:
            for p in self.params:
                p.register_post_accumulate_grad_hook(self._on_grad)
            for m in module.modules():
                own = [self._index[id(p)] for p in m.parameters(recurse=False) if id(p) in self._index]
                if own:
                    self._forward_hooks.append(m.register_forward_pre_hook(lambda m, args, own=own: self._on_use(own)))

    def _on_use(self, indices: list[int]) -> None:
        if torch.is_grad_enabled():  # a training forward (eval and sampling may take another path)
            self._used.update(dict.fromkeys(indices))

    def __len__(self) -> int:
        return len(self.buckets)

    def _cut(self, buckets: list[Params]) -> None:
        self.buckets = buckets
        self._bucket_of = {id(p): i for i, b in enumerate(buckets) for p in b}
        self._plan(buckets)

    def arm(self) -> None:
        """The next backward is the step's last micro-step: launch each bucket as soon as it is ready (the
        first time, record the order gradients become ready in)."""
        if self._recorded is None and self._used:  # the first step: cut from the forward's order, reversed
            self._cut(self._ready_buckets(self._agreed(list(reversed(self._used)))))
        self._missing = [len(b) for b in self.buckets]
        self._seen.clear()
        self._next, self._armed = 0, True

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._armed or id(p) in self._seen:  # a leaf's gradient is accumulated once per backward
            return
        self._seen.add(id(p))
        if self._recorded is None:
            self._order.append(self._index[id(p)])
        self._missing[self._bucket_of[id(p)]] -= 1
        while self._next < len(self.buckets) and self._missing[self._next] == 0:
            self._launch_next()

    def _launch_next(self) -> None:
        i = self._next
        self._next += 1
        self._launch(i, self.buckets[i])

    def finish(self) -> None:
        """Launch, in order, every bucket not launched yet; after the recording step, cut the buckets."""
        recording = self._armed and self._recorded is None
        if self._armed and not recording and self._next < len(self.buckets) and not self._warned:
            self._warned = True
            log.warning(
                "overlapped gradient exchange: %d parameters got no gradient in backward; buckets %d-%d of %d "
                "start only after it (logged once)",
                len(self.params) - len(self._seen),
                self._next,
                len(self.buckets) - 1,
                len(self.buckets),
            )
        while self._next < len(self.buckets):
            self._launch_next()
        self._armed, self._next = False, 0
        if recording:
            for handle in self._forward_hooks:
                handle.remove()
            self._forward_hooks.clear()
            self._recorded = self._agreed(self._order)
            self._cut(self._ready_buckets(self._recorded))
            mb = "one bucket" if math.isinf(self.bucket_bytes) else f"{self.bucket_bytes / 2**20:g} MB buckets"
            log.info("overlapped gradient exchange: %d parameters in %d buckets (%s, gradient-ready order)",
                     len(self.params), len(self.buckets), mb)  # fmt: skip

    def _agreed(self, order: list[int]) -> list[int]:
        """Rank 0's record on every rank (parameters that got no gradient last, in reverse registration order),
        so that every rank cuts the same buckets."""
        fired = set(order)
        full = order + [i for i in reversed(range(len(self.params))) if i not in fired]
        t = torch.tensor(full, dtype=torch.int64, device=self.params[0].device)  # NCCL broadcasts device tensors
        if dist.is_initialized() and dist.get_world_size() > 1:
            with comm_kind("other"):
                dist.broadcast(t, src=0)
        return t.cpu().tolist()

    def _ready_buckets(self, order: list[int]) -> list[Params]:
        buckets, current, size = [], [], 0
        for i in order:
            p = self.params[i]
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= self.bucket_bytes:
                buckets.append(current)
                current, size = [], 0
        if current:
            buckets.append(current)
        return buckets
