"""Gradients in buckets whose collectives start during backward (``comm.overlap``), as DDP's reducer does.

Why: in the serial schedule every byte of the gradient exchange waits for the whole backward pass. Started
bucket by bucket as gradients become ready, the exchange of the last layers' gradients runs while the first
layers' gradients are still being computed, and a step costs about max(compute, communication) instead of
their sum.

Buckets hold whole parameters, taken in reverse registration order (backward produces the last layers'
gradients first), about ``bucket_bytes`` each. During the backward of a step's last micro-step (:meth:`arm`),
a bucket is launched (the mode's ``launch(index, params)``) once every gradient in it has been accumulated
(``Tensor.register_post_accumulate_grad_hook``) and every bucket before it has been launched: every rank
issues the same collectives in the same order, whatever order autograd finishes parameters in. Earlier
micro-steps launch nothing. :meth:`finish` launches what is left: parameters that got no gradient, or, when
no bucket was armed (the serial schedule), every bucket.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

__all__ = ["GradBuckets"]

log = logging.getLogger(__name__)


class GradBuckets:
    """``params`` (registration order) cut into buckets of about ``bucket_bytes`` (``math.inf``: one bucket)
    from the last parameter back; ``buckets[i]`` lists bucket i's parameters in registration order. With
    ``hooks`` the buckets launch during an armed backward; without, only :meth:`finish` launches them."""

    def __init__(
        self,
        params,
        bucket_bytes: float,
        launch: Callable[[int, list[torch.nn.Parameter]], None],
        hooks: bool,
    ):
        params = [p for p in params if p.requires_grad]
        self.buckets: list[list[torch.nn.Parameter]] = []
        current, size = [], 0
        for p in reversed(params):
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= bucket_bytes:
                self.buckets.append(current[::-1])
                current, size = [], 0
        if current:
            self.buckets.append(current[::-1])
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._launch = launch
        self._armed, self._next, self._warned = False, 0, False
        self._missing: list[int] = []
        self._seen: set[int] = set()
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params] if hooks else []
        if hooks:
            mb = "one bucket" if math.isinf(bucket_bytes) else f"{bucket_bytes / 2**20:g} MB buckets"
            log.info("overlapped gradient exchange: %d parameters in %d buckets (%s)", len(params), len(self), mb)

    def __len__(self) -> int:
        return len(self.buckets)

    def arm(self) -> None:
        """The next backward is the step's last micro-step: launch each bucket as soon as it is ready."""
        self._missing = [len(b) for b in self.buckets]
        self._seen.clear()
        self._next, self._armed = 0, True

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._armed or id(p) in self._seen:  # a leaf's gradient is accumulated once per backward
            return
        self._seen.add(id(p))
        self._missing[self._bucket_of[id(p)]] -= 1
        while self._next < len(self.buckets) and self._missing[self._next] == 0:
            self._launch_next()

    def _launch_next(self) -> None:
        i = self._next
        self._next += 1
        self._launch(i, self.buckets[i])

    def finish(self) -> None:
        """Launch, in order, every bucket not launched yet; the next step starts from bucket 0 again."""
        if self._armed and self._next < len(self.buckets) and not self._warned:
            self._warned = True
            missing = sum(len(b) for b in self.buckets) - len(self._seen)
            log.warning(
                "overlapped gradient exchange: %d parameters got no gradient in backward; buckets %d-%d of %d "
                "start only after it (logged once)",
                missing,
                self._next,
                len(self.buckets) - 1,
                len(self.buckets),
            )
        while self._next < len(self.buckets):
            self._launch_next()
        self._armed, self._next = False, 0
