"""The gradient-sync protocol, and what its implementations share: the norm, the backward, the step.

Why a protocol: the optimizer step (:func:`dbgen.step.run_step`) is the same math however it is distributed;
what changes with ``cfg.comm`` (or with no DeepSpeed engine at all) is how gradients are reduced, how the global
norm is agreed on and which optimizer updates which tensors. That is :class:`GradientSync`. The parts the
implementations would otherwise each write again live here once:

* :func:`nan_as_inf`, :func:`local_grad_norm`, :func:`agreed_norm`: a NaN norm read as inf, the L2 norm of
  this rank's gradients, and the max over ranks, so every rank takes the same skip/clip decision bit for bit;
* :func:`set_lr`: the step's learning rate, handed to the optimizer
  (a :class:`dbgen.step.ClientAdam`, which applies the clip, the skip and the latent clamp in its ``step()``);
* :class:`SyncBase`: no state of its own to checkpoint;
* :class:`EngineSync`: the modes running a DeepSpeed engine: backward with an explicit accumulation boundary
  and DeepSpeed's own reduction switched off, the norm of a whole reduced gradient, the engine's step;
* :class:`ExchangeSync`: the modes that exchange the binary gradients themselves (``packed/*``, ``dp/onebit``):
  ZeRO 0 only, the binary latents' :class:`~dbgen.sync.layout.BinaryLayout`, the 1-bit warm-up clock, error
  buffers kept or dropped with the step, a checkpoint state tagged with the mode.

Nothing in :mod:`dbgen.sync` imports :mod:`dbgen.step` (it is step that imports :class:`LocalSync`): an
optimizer here is any ``torch.optim`` optimizer with ClientAdam's ``step(clip_coef=, skip=)`` and ``deciding``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from .accounting import comm_kind
from .layout import BinaryLayout
from .onebit import OneBitExchange

__all__ = [
    "EngineSync",
    "ExchangeSync",
    "GradientSync",
    "SyncBase",
    "agreed_norm",
    "local_grad_norm",
    "nan_as_inf",
    "set_lr",
]


class GradientSync(Protocol):
    """Gradient reduction and the optimizer step: the one place a communication mode (``cfg.comm``) changes.

    Called in this order per optimizer step, on every rank: ``backward(loss, last)`` per micro-batch,
    ``reduce()``, ``grad_norm()``, ``step(lr, clip_coef, skip)``. ``state_dict()`` goes into the checkpoint
    (e.g. error-feedback buffers) and is restored by ``load_state_dict`` before the first step.
    Per-rank parts (no-ops in :class:`SyncBase`, which every mode extends): ``save_partition(dir)`` (every rank,
    into the checkpoint directory), ``load_partition(dir)`` (after ``load_state_dict``), e.g. sharded latents
    (:class:`dbgen.sync.PackedSync`), and ``rank_tensors()``: the state this rank holds outside the model (its
    latent slice), which the trainer's finiteness check covers too. ``weights_ready()``: the module's weights
    are current after it (a mode may still be writing them after ``step``, as the overlapped packed sign
    all-gather does until the next forward reaches each layer): call it before reading them outside forward.
    """

    def backward(self, loss: torch.Tensor, last: bool) -> None: ...

    def reduce(self) -> None: ...

    def grad_norm(self) -> torch.Tensor: ...

    def step(self, lr: float, clip_coef: float, skip: bool) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def save_partition(self, directory: str | Path) -> None: ...

    def load_partition(self, directory: str | Path) -> None: ...

    def rank_tensors(self) -> list[torch.Tensor]: ...

    def weights_ready(self) -> None: ...


# ------------------------------------------------------------------------------------------- shared parts
def nan_as_inf(norm: torch.Tensor) -> torch.Tensor:
    """``norm`` in fp32 with NaN read as inf (``torch.nan_to_num``: an inf already there becomes the largest
    finite fp32, above any skip threshold). Apply it once: a second pass would turn the inf into that number."""
    return torch.nan_to_num(norm.detach().float(), nan=math.inf)


def local_grad_norm(params) -> torch.Tensor:
    """0-dim fp32 L2 norm of the gradients of ``params`` (those that have one), through :func:`nan_as_inf`."""
    grads = [p.grad for p in params if p.grad is not None]
    return nan_as_inf(torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False))


def agreed_norm(norm: torch.Tensor) -> torch.Tensor:
    """The max over ranks of each rank's 0-dim fp32 ``norm`` (already through :func:`nan_as_inf`), identical on
    every rank bit for bit, whatever each rank computed: the step's skip and clip decisions never diverge."""
    norm = norm.reshape(1).clone()
    with comm_kind("other"):
        dist.all_reduce(norm, op=dist.ReduceOp.MAX)
    return norm[0]


def set_lr(optimizer, lr: float) -> None:
    """The step's learning rate, in every param group of ``optimizer``."""
    for g in optimizer.param_groups:
        g["lr"] = lr


class SyncBase:
    """A sync with no state of its own: nothing to checkpoint, nothing to restore, nothing held per rank."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def save_partition(self, directory: str | Path) -> None:
        pass

    def load_partition(self, directory: str | Path) -> None:
        pass

    def rank_tensors(self) -> list[torch.Tensor]:
        return []

    def weights_ready(self) -> None:
        pass


# ------------------------------------------------------------------------------------ DeepSpeed engine modes
class EngineSync(SyncBase):
    """A DeepSpeed engine with its client optimizer, DeepSpeed's automatic reduction at the end of
    ``engine.backward`` switched off (``engine.enable_backward_allreduce = False``): ``reduce()`` decides how
    gradients are exchanged. DeepSpeed's clipping is off too; the step uses the agreed norm's decision."""

    def __init__(self, engine, optimizer):
        self.engine, self.optimizer = engine, optimizer
        engine.enable_backward_allreduce = False

    def backward(self, loss, last):
        # The accumulation boundary is set explicitly: engine.step() runs once per optimizer step.
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss)  # scales by 1 / grad_accum; no reduction (enable_backward_allreduce off)

    def grad_norm(self):
        """Every rank holds the whole reduced gradient (ZeRO 0): its norm, agreed on."""
        return agreed_norm(local_grad_norm(self.engine.module.parameters()))

    def step(self, lr, clip_coef, skip):
        set_lr(self.optimizer, lr)
        with self.optimizer.deciding(clip_coef, skip):  # DeepSpeed calls ClientAdam.step() without arguments
            self.engine.step()  # ClientAdam (ZeRO 1/2: per partition, then the parameter all-gather); grads cleared


class ExchangeSync(EngineSync):
    """Base of the modes that exchange the binary layers' gradients themselves (ZeRO stage 0 only).

    Holds the binary param group's :class:`BinaryLayout` over the ranks, the full-precision parameters
    (``fp_params``, reduced with averaged all-reduces), an optional :class:`OneBitExchange` and its warm-up
    clock: ``steps`` counts optimizer steps (:meth:`_next_compressed` calls), skipped steps included, and the
    binary gradients go as 1-bit messages once ``steps >= warmup`` (never when ``warmup`` is None).
    ``state_dict`` is ``{mode, steps}``.
    """

    mode: str  # the tag in the checkpoint's sync state
    option: str  # the comm setting that selects the mode, for messages
    resumes_plain_dp = False  # whether a dp/none checkpoint (empty sync state) may resume in this mode

    def __init__(self, engine, optimizer, warmup_steps: int | None):
        if engine.zero_optimization_stage() != 0:
            raise ValueError(f"comm {self.option} does its own gradient exchange: needs scale.zero_stage=0")
        super().__init__(engine, optimizer)
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        groups = [g for g in optimizer.param_groups if g.get("binary")]
        if not groups:
            raise ValueError(f"comm {self.option}: the model has no binary layers")
        self.binary_group = groups[0]
        self.layout = BinaryLayout(self.binary_group["params"], self.world, self.rank)
        self.fp_params = [p for g in optimizer.param_groups if not g.get("binary") for p in g["params"]]
        self.exchange: OneBitExchange | None = None
        self.warmup = warmup_steps
        self.steps, self._compressed = 0, False

    def _next_compressed(self) -> bool:
        """Whether this step's binary gradients go as 1-bit messages; advances the warm-up clock."""
        self._compressed = self.warmup is not None and self.steps >= self.warmup
        self.steps += 1
        return self._compressed

    def _settle(self, skip: bool) -> None:
        """After the step: a compressed step's new error buffers are kept, or dropped if it was skipped (its
        gradient is dropped, and so is what it left unsent)."""
        if self._compressed and skip:
            self.exchange.discard()
        elif self._compressed:
            self.exchange.commit()

    def state_dict(self):
        """The rank-independent part (in the engine's client state, written by rank 0)."""
        return {"mode": self.mode, "steps": self.steps}

    def load_state_dict(self, state):
        if not state and self.resumes_plain_dp:
            return  # a plain data-parallel checkpoint: same latents and optimizer; warm up, zero errors
        if state.get("mode") != self.mode:
            raise RuntimeError(f"checkpoint written with comm mode {state.get('mode', 'dp')!r}, not {self.mode!r}")
        self.steps = state["steps"]
