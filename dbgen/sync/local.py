"""One process, no DeepSpeed, no collectives: the gradient sync of ``python -m dbgen.bench train``,
:func:`dbgen.step.single_device_setup` and the single-device tests. Its own module so that those paths use the
trainer's step (:func:`dbgen.step.run_step`) with the same math as ZeRO 0 on one worker, without an engine."""

from __future__ import annotations

from torch import nn

from .base import SyncBase, local_grad_norm, set_lr

__all__ = ["LocalSync"]


class LocalSync(SyncBase):
    """The gradient-sync interface (:class:`dbgen.sync.GradientSync`) for one process without DeepSpeed:
    backward scaled by ``1 / grad_accum``, nothing to reduce, the local norm, the optimizer's (ClientAdam's)
    step, gradients cleared. Same math as ZeRO 0 on one worker."""

    def __init__(self, model: nn.Module, optimizer, grad_accum: int = 1):
        self.model, self.optimizer, self.grad_accum = model, optimizer, grad_accum

    def backward(self, loss, last):
        (loss / self.grad_accum).backward()

    def reduce(self):
        pass

    def grad_norm(self):
        return local_grad_norm(self.model.parameters())

    def step(self, lr, clip_coef, skip):
        set_lr(self.optimizer, lr)
        self.optimizer.step(clip_coef=clip_coef, skip=skip)
        self.optimizer.zero_grad(set_to_none=True)
