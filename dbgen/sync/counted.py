"""Phases of a step -> byte kinds: the wrapper the trainer puts around every mode.

Why a wrapper: the byte counter (:mod:`dbgen.sync.accounting`) labels each collective with the innermost
:func:`~dbgen.sync.accounting.comm_kind`, and most collectives of a step (DeepSpeed's all-reduce and ZeRO's
all-gather among them) are issued by code that knows nothing of kinds. Labelling each phase of the protocol
once, here, gives every mode (and DeepSpeed inside it) the same accounting.
"""

from __future__ import annotations

from .accounting import comm_kind

__all__ = ["CountedSync"]


class CountedSync:
    """A GradientSync whose collectives count by phase: ``backward``/``reduce`` as ``grad``, ``grad_norm`` as
    ``other``, ``step`` as ``weight`` (ZeRO's parameter all-gather; the packed sign all-gather). A sync may
    label its own collectives more precisely (the innermost :func:`comm_kind` wins). Everything else passes
    through."""

    def __init__(self, sync):
        self.inner = sync

    def backward(self, loss, last):
        with comm_kind("grad"):
            return self.inner.backward(loss, last)

    def reduce(self):
        with comm_kind("grad"):
            return self.inner.reduce()

    def grad_norm(self):
        with comm_kind("other"):
            return self.inner.grad_norm()

    def step(self, lr, clip_coef, skip):
        with comm_kind("weight"):
            return self.inner.step(lr, clip_coef, skip)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        return self.inner.load_state_dict(state)

    def save_partition(self, directory) -> None:
        self.inner.save_partition(directory)

    def load_partition(self, directory) -> None:
        self.inner.load_partition(directory)

    def rank_tensors(self):
        return self.inner.rank_tensors()

    def weights_ready(self) -> None:
        self.inner.weights_ready()

    def __getattr__(self, name):
        return getattr(self.inner, name)
