"""One optimizer step on one device: the math every training path shares (``dbgen.train``'s workers and
``python -m dbgen.bench train``). Distribution lives behind the ``sync`` object (:mod:`dbgen.sync`)::

    for each of train.grad_accum micro-batches:
        with autocast: loss = forward(x)       bf16 autocast on GPU (train.precision), fp32 master weights
        sync.backward(loss, last)              local backward (a distributed sync may reduce buckets here)
    sync.reduce()                              finish the gradient reduction of this step
    norm = sync.grad_norm()                    global L2 norm, a device tensor equal on every rank
    clip_coef, skip = clip_and_skip(norm)      skip: norm not finite or > train.skip_threshold
    sync.step(lr, clip_coef, skip)             fused Adam; a skipped step changes nothing (its found_inf flag)
    ema.update(model, skip)                    a lerp with weight 0 on a skipped step

Nothing here waits for the GPU: the skip decision, the clip and the EMA stay on the device, and the phase times
are CUDA events (:class:`PhaseClock`) that the trainer reads once per logging interval. Settings that speed
the step up without changing its math (``train.channels_last``, ``train.compile``) are applied by
:func:`prepare_model`; ``tests/test_step.py`` checks that they give the plain fp32 loss and gradients.
The optimizer (:class:`ClientAdam`, :func:`build_optimizer`) and its learning-rate schedule (:func:`lr_at`)
are defined here, with the step that drives them.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from .config import Config, TrainConfig
from .models import build
from .nn import binary_latents, data_dependent_init
from .sync.local import LocalSync

__all__ = [
    "EMA",
    "ClientAdam",
    "PhaseClock",
    "autocast_context",
    "autocast_dtype",
    "batch_to_device",
    "build_optimizer",
    "lr_at",
    "clip_and_skip",
    "eval_mode",
    "prepare_model",
    "resolve_stats",
    "run_step",
    "single_device_setup",
    "use_channels_last",
]


# --------------------------------------------------------------------------------- settings that keep the math
def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU (``precision: auto``) or when asked for; None means plain fp32."""
    p = cfg.train.precision
    if p == "bf16" or (p == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def use_channels_last(cfg: Config, device: torch.device) -> bool:
    """``train.channels_last``; null (the default) means on for CUDA, where cuDNN's bf16 convolutions want
    NHWC, and off for CPU."""
    c = cfg.train.channels_last
    return device.type == "cuda" if c is None else c


def prepare_model(model: nn.Module, cfg: Config, device: torch.device) -> nn.Module:
    """Apply ``train.channels_last`` and ``train.compile`` (``train.compile_mode``) to a model that is already
    initialized (data-dependent init runs eager, through forward hooks). ``compile`` compiles ``forward`` in
    place (``nn.Module.compile``), so parameter names, state dicts and checkpoints are those of the eager model."""
    if use_channels_last(cfg, device):
        model.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        # Static shapes: a training run has one micro-batch shape (a last partial batch recompiles once), and
        # inductor's dynamic-shape path failed on Flow++'s couplings (a symbolic size comparison).
        model.compile(mode=cfg.train.compile_mode, dynamic=False)
    return model


def batch_to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A CPU batch onto ``device``: through pinned memory and a non-blocking copy on CUDA."""
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    else:
        x = x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


# ------------------------------------------------------------------------------------------------- optimizer
class ClientAdam(torch.optim.Adam):
    """Fused Adam (AdamW with ``decoupled_weight_decay``) that applies the step's clip and skip decision.

    ``step(clip_coef=, skip=)`` takes the decision as Python numbers or as 0-dim device tensors (then nothing
    waits for the GPU): the update uses gradients scaled by ``clip_coef`` (given to the fused kernel as its
    ``grad_scale = 1 / clip_coef``) and a skipped step leaves parameters, moments and step counts exactly as
    they were (the kernel's ``found_inf`` flag). DeepSpeed's ``engine.step()`` calls ``step()`` without
    arguments (ZeRO 1/2: once per param group, with that group's flat fp32 partition as its only param), so
    around it the decision is given for one block (:meth:`deciding`); a ``step()`` given none clips and skips
    nothing. Param groups flagged ``binary`` hold the binary latents and are clamped to [-1, 1] after the update
    (a no-op on a skipped step: they were clamped already); under ZeRO the clamp reaches the master copy itself.
    """

    def __init__(self, params, **kwargs):
        kwargs.setdefault("fused", True)
        super().__init__(params, **kwargs)
        self._decision: tuple = (1.0, False)  # (clip_coef, skip) inside a deciding() block

    @contextmanager
    def deciding(self, clip_coef: float | torch.Tensor, skip: bool | torch.Tensor):
        """``clip_coef`` and ``skip`` for every :meth:`step` called without them inside the block."""
        self._decision = (clip_coef, skip)
        try:
            yield self
        finally:
            self._decision = (1.0, False)

    @torch.no_grad()
    def step(
        self, closure=None, *, clip_coef: float | torch.Tensor | None = None, skip: bool | torch.Tensor | None = None
    ):
        clip_coef = self._decision[0] if clip_coef is None else clip_coef
        skip = self._decision[1] if skip is None else skip
        if skip is True:  # decided on the host: nothing to launch
            return None
        first = next(p for g in self.param_groups for p in g["params"])
        # torch's fused Adam reads these two attributes (GradScaler's protocol) during super().step()
        self.found_inf = torch.as_tensor(skip, dtype=torch.float32).to(first.device, non_blocking=True)
        self.grad_scale = (
            None
            if isinstance(clip_coef, float | int) and clip_coef == 1.0
            else (1.0 / torch.as_tensor(clip_coef, dtype=torch.float32)).to(first.device, non_blocking=True)
        )
        super().step()
        for g in self.param_groups:
            if g.get("binary"):
                torch._foreach_clamp_min_(g["params"], -1.0)
                torch._foreach_clamp_max_(g["params"], 1.0)
        return None


def build_optimizer(cfg: Config, model: nn.Module) -> ClientAdam:
    """Two param groups: the binary latents (``binary: True``, clamped) and everything else."""
    o = cfg.optimizer
    binary_ids = {id(p) for p in binary_latents(model)}
    binary = [p for p in model.parameters() if id(p) in binary_ids]
    other = [p for p in model.parameters() if id(p) not in binary_ids]
    groups = [g for g in ({"params": binary, "binary": True}, {"params": other, "binary": False}) if g["params"]]
    return ClientAdam(
        groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, decoupled_weight_decay=o.name == "adamw"
    )


def lr_at(cfg: Config, step: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): ``max(min_lr, lr * decay**step)``, times a linear
    warm-up ``min(1, (step + 1) / warmup_steps)``. A pure function of the step, so the schedule's state is
    the step itself (checkpointed)."""
    s = cfg.schedule
    lr = max(s.min_lr, cfg.optimizer.lr * s.decay**step)
    if s.warmup_steps > 0:
        lr *= min(1.0, (step + 1) / s.warmup_steps)
    return lr


def clip_and_skip(norm: torch.Tensor, t: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's decision from the global gradient norm, on its device: ``skip`` when the norm is not finite
    or exceeds ``skip_threshold``; ``clip_coef = min(1, grad_clip / (norm + 1e-6))`` (1 on a skipped step)."""
    skip = ~torch.isfinite(norm) | (norm > t.skip_threshold)
    coef = torch.clamp(t.grad_clip / (norm + 1e-6), max=1.0)
    return torch.where(skip, torch.ones_like(coef), coef), skip


# ------------------------------------------------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of the parameters (fp32), for eval and sampling; buffers are copied."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module, skip: bool | torch.Tensor = False) -> None:
        """``ema += w * (param - ema)`` with ``w = 1 - decay``, or 0 on a skipped step (``skip``: a host bool or a
        device tensor), which leaves the average exactly as it was. The weight stays a device tensor:
        ``_foreach_lerp_`` with a tensor weight would read it on the host."""
        own = dict(model.named_parameters())
        ema = list(self.params.values())
        w = torch.where(torch.as_tensor(skip, device=ema[0].device), 0.0, 1.0 - self.decay).float()
        diff = torch._foreach_sub([own[n].detach().float() for n in self.params], ema)
        torch._foreach_mul_(diff, w)
        torch._foreach_add_(ema, diff)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A full model state dict with EMA parameters (what evaluate/sample load)."""
        return {
            n: (self.params[n].to(t.dtype) if n in self.params else t).detach().cpu().clone()
            for n, t in model.state_dict().items()
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n in self.params:
            self.params[n].copy_(state[n])

    @contextmanager
    def applied(self, model: nn.Module):
        """Temporarily swap the EMA parameters into ``model``."""
        own = dict(model.named_parameters())
        saved = {n: p.detach().clone() for n, p in own.items()}
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(self.params[n])
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, p in own.items():
                    p.copy_(saved[n])


# -------------------------------------------------------------------------------- one device, without DeepSpeed
def single_device_setup(cfg: Config, init_x: torch.Tensor, device: torch.device):
    """What a worker builds before its first step, for one process without DeepSpeed: the model (on ``device``,
    data-initialized on ``init_x``, then :func:`prepare_model`), a :class:`~dbgen.sync.LocalSync` with its
    :func:`build_optimizer`, and the EMA (None without ``train.ema_decay``). Seed the RNG first."""
    model = build(cfg.model).to(device)
    data_dependent_init(model, init_x.to(device))  # eager fp32, as the trainer does
    prepare_model(model, cfg, device)
    sync = LocalSync(model, build_optimizer(cfg, model), cfg.train.grad_accum)
    ema = EMA(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
    return model, sync, ema


@contextmanager
def eval_mode(model: nn.Module, ema: EMA | None, seed: int, device: torch.device):
    """Evaluation state: EMA weights if kept, ``model.eval()``, and a forked RNG seeded with ``seed`` (eval's
    noise is reproducible and training's random stream is untouched). Everything is restored on exit."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with ema.applied(model) if ema is not None else nullcontext():
            model.eval()
            try:
                yield model
            finally:
                model.train()


# ---------------------------------------------------------------------------------------------- phase times
class PhaseClock:
    """Durations of a step's phases without waiting for the GPU.

    :meth:`mark` ends the current phase: on CUDA it records an event on the current stream, on CPU it reads
    ``perf_counter`` (CPU work is synchronous). :meth:`seconds` sums the durations per phase name; on CUDA it
    waits for the last event, so call it when the step's results are read anyway (once per log interval).
    ``mark(None)`` ends a stretch that is timed elsewhere (the trainer's data wait, host time): it counts in
    ``step`` but is no phase.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = [("start", self._now())]

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def mark(self, phase: str | None) -> None:
        self.marks.append((phase, self._now()))

    def seconds(self) -> dict[str, float]:
        """Seconds per phase name and ``step`` (first mark to last)."""
        if self.cuda:
            self.marks[-1][1].synchronize()

            def between(a, b):
                return a.elapsed_time(b) / 1000.0
        else:

            def between(a, b):
                return b - a

        out: dict[str, float] = {}
        for (_, a), (phase, b) in zip(self.marks, self.marks[1:], strict=False):
            if phase is not None:
                out[phase] = out.get(phase, 0.0) + between(a, b)
        out["step"] = between(self.marks[0][1], self.marks[-1][1])
        return out


# ----------------------------------------------------------------------------------------------- the step
def run_step(
    forward,
    sync,
    batches: list[torch.Tensor],
    t: TrainConfig,
    lr: float,
    amp_dtype: torch.dtype | None,
    clock: PhaseClock,
    model: nn.Module | None = None,
    ema: EMA | None = None,
) -> dict:
    """One optimizer step over ``batches`` (the micro-batches, already on the device); see the module docstring.

    Returns device tensors (``loss``: mean bits/dim over the micro-batches, ``grad_norm``, ``skipped``); read
    them with :func:`resolve_stats`. ``model``: the parameters the EMA follows (needed with ``ema``).
    """
    device = batches[0].device
    loss_sum = torch.zeros((), device=device)
    for i, x in enumerate(batches):
        with autocast_context(device, amp_dtype):
            loss = forward(x)  # scalar bits/dim, mean over the micro-batch
        clock.mark("forward")
        sync.backward(loss, last=i == len(batches) - 1)
        clock.mark("backward")
        loss_sum += loss.detach().float()
    sync.reduce()
    norm = sync.grad_norm()
    clock.mark("communication")
    clip_coef, skip = clip_and_skip(norm, t)
    sync.step(lr, clip_coef, skip)
    if ema is not None:
        sync.weights_ready()  # packed modes: the signs the EMA averages (the overlapped gather waits here)
        ema.update(model, skip)
    clock.mark("optimizer")
    return {"loss": loss_sum / len(batches), "grad_norm": norm, "skipped": skip}


def resolve_stats(steps: list[dict]) -> list[dict]:
    """Host values of :func:`run_step` results (plus ``clock``: a :class:`PhaseClock`, giving ``t_<phase>`` and
    ``t_step``): one device-to-host copy for all of them."""
    if not steps:
        return []
    values = (
        torch.stack([torch.stack([s["loss"].float(), s["grad_norm"].float(), s["skipped"].float()]) for s in steps])
        .cpu()
        .tolist()
    )
    out = []
    for s, (loss, norm, skipped) in zip(steps, values, strict=True):
        r = {k: v for k, v in s.items() if k != "clock"}
        r.update(loss=loss, grad_norm=norm, skipped=bool(skipped))
        if "clock" in s:
            r.update({f"t_{phase}": sec for phase, sec in s["clock"].seconds().items()})
        out.append(r)
    return out
