"""The training worker: one DeepSpeed engine per Ray Train worker, the training step, eval, checkpoints.

Everything distributed lives here; model code is single-device. :func:`train_worker` is the function Ray Train
runs in every worker (``dbgen.train`` is the driver). One optimizer step (:meth:`Trainer.train_step`) is
:func:`dbgen.step.run_step` with the DeepSpeed engine as the forward and a :class:`GradientSync` as ``sync``::

    for each of train.grad_accum micro-batches:
        loss = engine(x)                      forward; bf16 autocast on GPU, fp32 on CPU (train.precision)
        sync.backward(loss, last)             local backward (ZeRO 2 also reduces buckets as they fill)
    sync.reduce()                             finish the gradient reduction of this step
    norm = sync.grad_norm()                   global L2 norm of the reduced gradient, equal on every rank
    skip = norm not finite or norm > train.skip_threshold     (counted; the step still consumes its data)
    sync.step(lr, clip_coef, skip)            update with gradients scaled by min(1, grad_clip / norm), binary
                                              latents clamped to [-1, 1]; a skipped step changes nothing
    ema.update(model, skip)                   (train.ema_decay, not on skipped steps)

The skip decision uses a value every rank agrees on (an all-reduced norm), so ranks never diverge. It stays on
the device (no host sync inside a step): :meth:`Trainer.fit` reads the steps' losses, norms, skip flags and
phase times once per logging interval (and before eval and checkpoints).

Seams for later work
--------------------
* **Gradient communication** (``cfg.comm``) is behind :class:`GradientSync` (``backward``/``reduce``/
  ``grad_norm``/``step``/``state_dict``), built by :func:`build_gradient_sync` from :data:`SYNC_MODES`. The
  default, :class:`DataParallelSync`, is plain DeepSpeed data parallelism (ZeRO 0/1/2). Its pieces are the ones
  a packed/1-bit mode needs: a client optimizer (:class:`dbgen.step.ClientAdam`, binary latents in their own
  param group)
  handed to ``deepspeed.initialize``, DeepSpeed's backward all-reduce switched off and called explicitly,
  DeepSpeed's clipping off (we clip on the agreed global norm).
* **Metrics**: :meth:`Trainer.train_step` returns a stats dict (``loss`` tensor, ``grad_norm``, ``lr``,
  ``skipped``, ``images`` and per-phase seconds ``t_data_wait``, ``t_forward``, ``t_backward``,
  ``t_communication``, ``t_optimizer``, ``t_step``) and every event goes through one :class:`Reporter`
  (``on_step``, ``on_interval``, ``on_eval``, ``on_checkpoint``, ``on_samples``).

Batch arithmetic: ``train.batch_size`` is the global batch of one optimizer step; each worker runs
``train.grad_accum`` micro-batches of ``batch_size / (num_workers * grad_accum)`` rows (must divide exactly).

Checkpoint directory (``<run>/checkpoint_<step>``; every rank writes its part, Ray merges them)::

    ds/mp_rank_00_model_states.pt     DeepSpeed (rank 0): module, optimizer (ZeRO 0) and our client state:
                                      step, skipped, images_seen, EMA, loader position, sync state, config
    ds/zero_pp_rank_<r>_*optim_states.pt   ZeRO 1/2: each rank's optimizer partition
    rank_<r>.pt                       per-rank RNG states (torch, CUDA, python, numpy)
    meta.json                         step, world size, config (rank 0; what evaluate/sample read first)
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import comm
from .config import Config, ConfigError, config_hash, load_config
from .console import format_record
from .evaluate import DS_MODEL_FILE, DS_TAG, META_FILE
from .metrics import TrainMetrics
from .nn import data_dependent_init
from .sample import save_grid
from .step import (
    EMA,
    ClientAdam,
    PhaseClock,
    autocast_context,
    autocast_dtype,
    batch_to_device,
    build_optimizer,
    eval_mode,
    prepare_model,
    resolve_stats,
    run_step,
    use_channels_last,
)

__all__ = [
    "SYNC_MODES",
    "DataParallelSync",
    "GradientSync",
    "Reporter",
    "Trainer",
    "build_gradient_sync",
    "check_train_config",
    "deepspeed_config",
    "lr_at",
    "micro_batch_size",
    "train_worker",
]

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


# ------------------------------------------------------------------------------ config -> DeepSpeed, schedule
def micro_batch_size(cfg: Config, world_size: int) -> int:
    """Rows per micro-batch per worker: ``train.batch_size / (world_size * train.grad_accum)``, exactly."""
    t = cfg.train
    per_step = world_size * t.grad_accum
    if t.grad_accum < 1 or t.batch_size < 1 or t.batch_size % per_step:
        raise ConfigError(f"'train.batch_size' = {t.batch_size}: expected a positive multiple of "
                          f"scale.num_workers ({world_size}) x train.grad_accum ({t.grad_accum}) = {per_step}")
    return t.batch_size // per_step


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed config of a run, derived from our config (the only place it is written).

    Precision: the engine is always fp32 (no DeepSpeed fp16/bf16 section); bf16 on GPU is torch autocast
    around the forward pass (:func:`dbgen.step.autocast_dtype`), so the module's parameters stay the fp32 master weights
    the client optimizer updates and clamps. Clipping is ours (on the agreed global norm, which also decides
    the skip rule), so DeepSpeed's ``gradient_clipping`` is 0. ``zero_allow_untested_optimizer``: the client
    optimizer is a ``torch.optim.Adam`` subclass, which DeepSpeed's ZeRO whitelist does not list by type.
    """
    return {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size(cfg, world_size),
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": cfg.scale.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }


def lr_at(cfg: Config, step: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): ``max(min_lr, lr * decay**step)``, times a linear
    warm-up ``min(1, (step + 1) / warmup_steps)``. A pure function of the step, so the schedule's state is
    the step itself (checkpointed)."""
    s = cfg.schedule
    lr = max(s.min_lr, cfg.optimizer.lr * s.decay**step)
    if s.warmup_steps > 0:
        lr *= min(1.0, (step + 1) / s.warmup_steps)
    return lr


def check_train_config(cfg: Config) -> None:
    """Everything about ``train``/``scale``/``comm`` that would only fail inside a worker; raises ConfigError."""
    t, s = cfg.train, cfg.scale

    def need(ok: bool, key: str, value, expected: str):
        if not ok:
            raise ConfigError(f"'{key}' = {value!r}: expected {expected}")

    need(s.num_workers >= 1, "scale.num_workers", s.num_workers, "an int >= 1")
    need(s.cpus_per_worker > 0, "scale.cpus_per_worker", s.cpus_per_worker, "a number > 0")
    need(s.max_failures >= 0, "scale.max_failures", s.max_failures, "an int >= 0")
    need(t.max_steps >= 0, "train.max_steps", t.max_steps, "an int >= 0")
    need(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "an int >= 1")
    micro_batch_size(cfg, s.num_workers)
    need(t.grad_clip > 0, "train.grad_clip", t.grad_clip, "a number > 0")
    need(t.skip_threshold > 0, "train.skip_threshold", t.skip_threshold, "a number > 0")
    need(t.init_batch_size >= 1, "train.init_batch_size", t.init_batch_size, "an int >= 1")
    need(t.ema_decay is None or 0 < t.ema_decay < 1, "train.ema_decay", t.ema_decay, "null or in (0, 1)")
    for key in ("checkpoint_every", "eval_every", "sample_every"):
        need(getattr(t, key) >= 0, f"train.{key}", getattr(t, key), "an int >= 0 (0: only at the end)")
    need(t.log_every >= 1, "train.log_every", t.log_every, "an int >= 1")
    need(t.keep_checkpoints >= 1, "train.keep_checkpoints", t.keep_checkpoints, "an int >= 1")
    need(t.eval_batch_size >= 1, "train.eval_batch_size", t.eval_batch_size, "an int >= 1")
    need(t.eval_batches is None or t.eval_batches >= 1, "train.eval_batches", t.eval_batches, "null or >= 1")
    need(t.num_samples >= 0, "train.num_samples", t.num_samples, "an int >= 0")
    need(cfg.optimizer.lr > 0, "optimizer.lr", cfg.optimizer.lr, "a number > 0")
    mode = (cfg.comm.binary_weights, cfg.comm.binary_grads)
    if mode not in SYNC_MODES:
        raise ConfigError(f"'comm' = binary_weights {mode[0]!r}, binary_grads {mode[1]!r}: not available in this "
                          f"build (available: {', '.join(f'{w}/{g}' for w, g in SYNC_MODES)})")
    if mode != ("dp", "none"):
        need(cfg.model.binary_weights, "model.binary_weights", cfg.model.binary_weights,
             f"true with comm.binary_weights={mode[0]}, comm.binary_grads={mode[1]} (they act on binary layers)")
        need(s.zero_stage == 0, "scale.zero_stage", s.zero_stage,
             f"0 with comm.binary_weights={mode[0]}, comm.binary_grads={mode[1]} (the mode exchanges gradients "
             f"itself{' and shards the binary latents and their optimizer state' if mode[0] == 'packed' else ''})")
    need(cfg.comm.onebit_warmup_steps >= 0, "comm.onebit_warmup_steps", cfg.comm.onebit_warmup_steps,
         "an int >= 0 (uncompressed steps before 1-bit gradients)")


# ------------------------------------------------------------------------------------ optimizer and the seam
class GradientSync(Protocol):
    """Gradient reduction and the optimizer step: the one place a communication mode (``cfg.comm``) changes.

    Called in this order per optimizer step, on every rank: ``backward(loss, last)`` per micro-batch,
    ``reduce()``, ``grad_norm()``, ``step(lr, clip_coef, skip)``. ``state_dict()`` goes into the checkpoint
    (e.g. error-feedback buffers) and is restored by ``load_state_dict`` before the first step.
    Optional per-rank parts: ``save_partition(dir)`` (every rank, into the checkpoint directory) and
    ``load_partition(dir)`` (after ``load_state_dict``), e.g. sharded latents (:class:`dbgen.comm.PackedSync`).
    """

    def backward(self, loss: torch.Tensor, last: bool) -> None: ...

    def reduce(self) -> None: ...

    def grad_norm(self) -> torch.Tensor: ...

    def step(self, lr: float, clip_coef: float, skip: bool) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class DataParallelSync:
    """Plain DeepSpeed data parallelism (``comm: dp/none``), ZeRO stage 0, 1 or 2 from ``scale.zero_stage``.

    DeepSpeed's automatic reduction at the end of ``engine.backward`` is switched off
    (``engine.enable_backward_allreduce = False``) and ``engine.allreduce_gradients()`` is called by
    :meth:`reduce`, so communication is timed on its own and a replacement mode can reduce differently.
    ZeRO 2 still reduce-scatters full buckets from backward hooks during the backward pass (overlapped).
    """

    def __init__(self, engine, optimizer: ClientAdam, cfg: Config | None = None):
        self.engine, self.optimizer = engine, optimizer
        self.zero_stage = engine.zero_optimization_stage()
        engine.enable_backward_allreduce = False

    def backward(self, loss, last):
        # The accumulation boundary is set explicitly: engine.step() runs once per optimizer step.
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss)  # scales by 1 / grad_accum
        if self.zero_stage == 2 and not last:
            self.engine.allreduce_gradients()  # ZeRO 2 reduces every micro-batch into its partition

    def reduce(self):
        self.engine.allreduce_gradients()

    def grad_norm(self):
        if self.zero_stage == 0:
            # Gradients are all-reduced: every rank holds the full averaged gradient.
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False)
        else:
            # ZeRO 1/2: partitions only; DeepSpeed's own norm over them is all-reduced (-1 marks inf/nan).
            norm = torch.as_tensor(self.engine.optimizer.scaled_global_norm(), dtype=torch.float32)
            norm = torch.where(norm < 0, torch.full_like(norm, math.inf), norm)
        norm = torch.nan_to_num(norm.detach().float().reshape(1).clone(), nan=math.inf)
        dist.all_reduce(norm, op=dist.ReduceOp.MAX)  # agree bit-for-bit, whatever each rank computed
        return norm[0]

    def step(self, lr, clip_coef, skip):
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.skip, self.optimizer.clip_coef = skip, clip_coef
        self.engine.step()  # ZeRO 1/2: our step() per group on its partition, then the parameter all-gather

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


# (comm.binary_weights, comm.binary_grads) -> GradientSync class, called as cls(engine, optimizer, cfg).
SYNC_MODES: dict[tuple[str, str], type] = {
    ("dp", "none"): DataParallelSync,
    ("packed", "none"): comm.PackedSync,
    ("packed", "onebit"): comm.PackedSync,
    ("dp", "onebit"): comm.DataParallelOnebitSync,
}


def build_gradient_sync(cfg: Config, engine, optimizer) -> GradientSync:
    """The configured mode, wrapped so its collectives count as grad/weight/other bytes (dbgen.comm)."""
    return comm.CountedSync(SYNC_MODES[(cfg.comm.binary_weights, cfg.comm.binary_grads)](engine, optimizer, cfg))


# ------------------------------------------------------------------------------------------------ reporting
def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _write_json_atomic(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp creates 0600
    os.replace(tmp, path)


class Reporter:
    """Every training event goes through here (the single place metrics exporters attach, issue 6).

    All ranks call every method (cheap); rank 0 writes ``metrics.jsonl`` records (``kind``: train, eval,
    checkpoint, samples, resume) and logs each as :func:`dbgen.console.format_record` words it (the driver
    prints the same lines from the file).
    """

    def __init__(self, run_dir: Path, rank: int, max_steps: int, world_size: int = 1,
                 metrics: TrainMetrics | None = None, device: torch.device | None = None):
        self.run_dir, self.rank, self.max_steps, self.world_size = run_dir, rank, max_steps, world_size
        self.metrics_path = run_dir / METRICS_FILE
        self.metrics = metrics  # Prometheus exporter (dbgen.metrics); None records nothing
        self.device = device or torch.device("cpu")

    def _peak_memory_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    def _record(self, record: dict) -> None:
        if self.rank == 0:
            _append_jsonl(self.metrics_path, {"time": round(time.time(), 3), **record})
            line = format_record(record, self.max_steps)
            if line is not None:
                log.info(line)

    def on_step(self, stats: dict) -> None:
        """Every optimizer step, every rank, with its stats as host numbers (:func:`dbgen.step.resolve_stats`);
        ``fit`` calls it for the interval's steps when it reads them, once per ``train.log_every`` steps."""
        if self.metrics is not None:
            self.metrics.record_step(stats, images=stats["images"] // self.world_size)

    def on_interval(self, rec: dict) -> None:
        """Every ``log_every`` steps with the interval's job-level numbers (bpd averaged over ranks)."""
        self._record({"kind": "train", **rec})
        if self.metrics is not None:
            self.metrics.record_interval(rec["bpd"], rec["step_s"], rec["images_per_s"] / self.world_size,
                                         rec["images_per_s"] if self.rank == 0 else None,
                                         self._peak_memory_bytes())

    def on_eval(self, step: int, bpd: float, rows: int, seconds: float) -> None:
        self._record({"kind": "eval", "step": step, "eval_bpd": bpd, "rows": rows, "seconds": round(seconds, 3)})
        if self.metrics is not None and bpd is not None:
            self.metrics.record_eval(bpd)

    def on_checkpoint(self, step: int, seconds: float, nbytes: int, total_bytes: int) -> None:
        """``nbytes``: written by this rank; ``total_bytes``: all ranks."""
        self._record({"kind": "checkpoint", "step": step, "seconds": round(seconds, 3), "bytes": total_bytes})
        if self.metrics is not None:
            self.metrics.record_checkpoint(seconds, nbytes)

    def on_samples(self, step: int, path: Path) -> None:
        self._record({"kind": "samples", "step": step, "path": str(path)})

    def on_resume(self, step: int, submission: str, restart: bool) -> None:
        """Before anything else is recorded: drop records of steps after the checkpoint (a failed attempt)."""
        if self.rank == 0 and self.metrics_path.exists():
            kept = [line for line in self.metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= step]
            tmp = self.metrics_path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.metrics_path)
        self._record({"kind": "resume", "step": step, "submission": submission, "restart": restart})


def _metrics_exporter(cfg: Config, run: str, rank: int) -> TrainMetrics | None:
    """Prometheus metrics of this worker: on ``train.metrics_port`` if set, else through Ray's metrics agent
    when running inside Ray, else none (a bare process group, e.g. in unit tests)."""
    import ray

    if cfg.train.metrics_port is not None:
        backend = "http"
    elif ray.is_initialized():
        backend = "ray"
    else:
        return None
    return TrainMetrics(run, rank, cfg.model.name, config_hash(cfg), backend=backend, port=cfg.train.metrics_port)


@contextmanager
def _without_deepspeed_broadcast():
    """Skip DeepSpeed's initial parameter broadcast inside ``deepspeed.initialize``.

    DeepSpeed 0.19.8 broadcasts each parameter as ``p.data.view(torch.uint8)``, which raises for 0-dim
    parameters (e.g. a model's global log-scale). :meth:`Trainer._broadcast` has already broadcast every
    parameter and buffer from rank 0, so DeepSpeed's broadcast would only repeat it.
    """
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._broadcast_model
    DeepSpeedEngine._broadcast_model = lambda self: None
    try:
        yield
    finally:
        DeepSpeedEngine._broadcast_model = original


# ---------------------------------------------------------------------------------------------- RNG state
def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _rank_seed(seed: int, rank: int) -> int:
    """Distinct, reproducible per-rank seeds (latent noise differs across ranks)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


# -------------------------------------------------------------------------------------------------- trainer
class Trainer:
    """One worker's training state: loaders, model, DeepSpeed engine, gradient sync, EMA, counters.

    Needs an initialized ``torch.distributed`` process group (Ray Train creates it before the train loop;
    tests may create their own). ``checkpoint_dir``: a checkpoint to resume from (None: a new run, with
    data-dependent init). ``datasets_in_ray``: the splits come as Ray Train datasets (``data.loader: ray``)
    instead of being read from ``train_dir``/``eval_dir`` in-process. ``persist(metrics, local_dir, name)``
    is called by every rank with its part of a checkpoint (default :func:`ray_persist`).
    """

    def __init__(self, cfg: Config, run_dir: Path, train_dir: str, eval_dir: str | None = None, *, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu", checkpoint_dir: Path | None = None,
                 submission: str | None = None, driver_start: float | None = None, datasets_in_ray: bool = False,
                 persist: Callable[[dict, Path, str], None] | None = None):
        import deepspeed

        from .data import EvalLoader, TrainLoader
        from .models import build

        # submission: id of the driver invocation; a checkpoint of the same one means a worker-group restart
        self.cfg, self.run_dir, self.submission = cfg, Path(run_dir), submission or uuid.uuid4().hex
        self.driver_start = time.time() if driver_start is None else driver_start
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.persist = persist or ray_persist
        self.amp_dtype = autocast_dtype(cfg, self.device)
        t = cfg.train
        self.micro = micro_batch_size(cfg, self.world_size)
        self.reporter = Reporter(self.run_dir, self.rank, t.max_steps, world_size, device=self.device,
                                 metrics=_metrics_exporter(cfg, self.run_dir.name, rank))

        backend = "ray" if datasets_in_ray else "arrow"
        self.loader = TrainLoader(None if datasets_in_ray else train_dir, batch_size=self.micro, seed=t.seed,
                                  rank=rank, world_size=world_size, shuffle_buffer=cfg.data.shuffle_buffer,
                                  drop_last=cfg.data.drop_last, backend=backend)
        self.eval_loader = None
        if eval_dir is not None:
            self.eval_loader = EvalLoader(None if datasets_in_ray else eval_dir, batch_size=t.eval_batch_size,
                                          rank=rank, world_size=world_size, backend=backend)

        _seed_all(t.seed)  # identical construction on every rank (rank 0's init is broadcast anyway)
        model = build(cfg.model).to(self.device)
        self.step, self.skipped, self.images_seen = 0, 0, 0
        self.resumed_from, self.last_checkpoint_step = None, None
        self.train_bpd, self.eval_bpd, self.eval_rows = None, None, None

        if checkpoint_dir is None:
            self._data_dependent_init(model, train_dir)
        comm.install()  # count every collective from here on (dbgen.comm.COUNTER, taken once per step)
        self._broadcast(model)
        self.channels_last = use_channels_last(cfg, self.device)
        prepare_model(model, cfg, self.device)  # channels_last / torch.compile: same math, after init
        self.optimizer = build_optimizer(cfg, model)
        deepspeed.utils.logger.setLevel(logging.WARNING)
        with _without_deepspeed_broadcast():
            self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer,
                                                        config=deepspeed_config(cfg, self.world_size))
        self.model = self.engine.module
        self.sync = build_gradient_sync(cfg, self.engine, self.optimizer)
        self.ema = None
        if checkpoint_dir is not None:
            self._restore(Path(checkpoint_dir))
        else:
            _seed_all(_rank_seed(t.seed, self.rank))
        if t.ema_decay and self.ema is None:
            self.ema = EMA(self.model, t.ema_decay)  # from the initial (or restored, if it kept none) weights
        self.workers = self._gather_workers()

    # --------------------------------------------------------------------------------------------- setup
    def _data_dependent_init(self, model: nn.Module, train_dir: str) -> None:
        """Rank 0 initializes gains and biases from ``train.init_batch_size`` training rows."""
        from .data import TrainLoader

        if self.rank == 0:
            rows = TrainLoader(train_dir, batch_size=self.cfg.train.init_batch_size, seed=self.cfg.train.seed,
                               rank=0, world_size=1, shuffle_buffer=self.cfg.data.shuffle_buffer,
                               backend="arrow")
            x = next(iter(rows)).to(self.device)  # (init_batch_size, C, H, W) uint8
            n = data_dependent_init(model, x)
            log.info("data-dependent init of %d modules on %d rows", n, x.shape[0])

    @torch.no_grad()
    def _broadcast(self, model: nn.Module) -> None:
        """Every parameter and buffer from rank 0, before the first step (and before DeepSpeed sees them)."""
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)

    def _gather_workers(self) -> list[dict]:
        import ray

        node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        me = {"rank": self.rank, "node_id": node_id, "pid": os.getpid(), "host": socket.gethostname(),
              "device": str(self.device)}
        out = [None] * self.world_size
        dist.all_gather_object(out, me)
        return out

    def _restore(self, ckpt: Path) -> None:
        load_path, client = self.engine.load_checkpoint(str(ckpt), tag=DS_TAG, load_optimizer_states=True,
                                                        load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"{ckpt}: DeepSpeed found no checkpoint with tag '{DS_TAG}'")
        if client["world_size"] != self.world_size and self.cfg.scale.zero_stage > 0:
            raise RuntimeError(f"{ckpt}: written by {client['world_size']} workers with ZeRO stage "
                               f"{self.cfg.scale.zero_stage}; resume with the same scale.num_workers")
        self.step, self.skipped, self.images_seen = client["step"], client["skipped"], client["images_seen"]
        self.last_checkpoint_step = self.step
        self.train_bpd = client.get("train_bpd")
        self.loader.load_state_dict(client["loader"])
        self.sync.load_state_dict(client["sync"])
        self.sync.load_partition(ckpt)
        if self.cfg.train.ema_decay and client.get("ema") is not None:
            self.ema = EMA(self.model, self.cfg.train.ema_decay)
            self.ema.load_state_dict(client["ema"])
        restart = client["submission"] == self.submission
        self.resumed_from = client["resumed_from"] if restart else self.step
        rng_file = ckpt / f"rank_{self.rank}.pt"
        if rng_file.exists():
            _set_rng_state(torch.load(rng_file, weights_only=True))
        else:  # more workers than the checkpoint had
            _seed_all(_rank_seed(self.cfg.train.seed + self.step, self.rank))
        self.reporter.on_resume(self.step, self.submission, restart)

    # ---------------------------------------------------------------------------------------------- step
    def train_step(self, data) -> dict:
        """One optimizer step over ``train.grad_accum`` micro-batches from the iterator ``data``.

        Returns without waiting for the device: ``loss``, ``grad_norm`` and ``skipped`` are device tensors and
        ``clock`` holds the phase times; :func:`dbgen.step.resolve_stats` reads them (``fit`` does, once per
        logging interval)."""
        cfg = self.cfg.train
        clock = PhaseClock(self.device)
        t0 = time.perf_counter()
        batches = [batch_to_device(next(data), self.device, self.channels_last) for _ in range(cfg.grad_accum)]
        t_data = time.perf_counter() - t0  # host time blocked on the loader
        clock.mark("data")
        lr = lr_at(self.cfg, self.step)
        out = run_step(self.engine, self.sync, batches, cfg, lr, self.amp_dtype, clock, self.model, self.ema)
        return {"step": self.step + 1, **out, "lr": lr, "images": cfg.batch_size, "t_data_wait": t_data,
                "clock": clock, "comm_bytes": comm.COUNTER.take()}  # bytes sent since the last step, by kind

    # ---------------------------------------------------------------------------------------- eval, samples
    def _eval_mode(self, seed: int):
        """Eval weights (EMA if kept), eval mode and a forked RNG: eval never perturbs training randomness."""
        return eval_mode(self.model, self.ema, seed, self.device)

    @torch.no_grad()
    def evaluate(self) -> None:
        """Mean bits/dim (ELBO / dequantized bound, one sample) over the held-out split, all ranks together."""
        if self.eval_loader is None:
            return
        start = time.perf_counter()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # (sum of bpd, rows)
        amp = autocast_context(self.device, self.amp_dtype)
        with self._eval_mode(_rank_seed(self.cfg.train.seed + 1, self.rank)) as model, amp:
            for i, x in enumerate(self.eval_loader):
                if self.cfg.train.eval_batches is not None and i >= self.cfg.train.eval_batches:
                    break
                bpd = model.log_likelihood_bpd(batch_to_device(x, self.device, self.channels_last), samples=1)
                total[0] += bpd.double().sum()
                total[1] += x.shape[0]
        dist.all_reduce(total)
        self.eval_rows = int(total[1].item())
        self.eval_bpd = (total[0] / total[1]).item() if self.eval_rows else None
        self.reporter.on_eval(self.step, self.eval_bpd, self.eval_rows, time.perf_counter() - start)

    @torch.no_grad()
    def save_samples(self) -> Path | None:
        """Rank 0: a PNG grid of ``train.num_samples`` samples in ``<run>/samples/step_<step>.png``."""
        n = self.cfg.train.num_samples
        if self.rank != 0 or n == 0:
            return None
        with self._eval_mode(self.cfg.train.seed + 2) as model:
            images = model.sample(n)
        path = save_grid(images, self.run_dir / "samples" / f"step_{self.step:07d}.png")
        self.reporter.on_samples(self.step, path)
        return path

    # ------------------------------------------------------------------------------------------ checkpoint
    def checkpoint(self) -> None:
        """Every rank saves its part into a local directory and reports it; Ray merges them into
        ``<run>/checkpoint_<step>`` and keeps the last ``train.keep_checkpoints``."""
        start = time.perf_counter()
        client = {"step": self.step, "skipped": self.skipped, "images_seen": self.images_seen,
                  "loader": self.loader.state_dict(), "sync": self.sync.state_dict(),
                  "ema": self.ema.state_dict(self.model) if self.ema is not None else None,
                  "world_size": self.world_size, "submission": self.submission,
                  "resumed_from": self.resumed_from, "train_bpd": self.train_bpd, "config": self.cfg.to_dict()}
        with tempfile.TemporaryDirectory(prefix="dbgen-ckpt-") as d:
            d = Path(d)
            self.engine.save_checkpoint(str(d), tag=DS_TAG, client_state=client)
            self.sync.save_partition(d)
            torch.save(_rng_state(), d / f"rank_{self.rank}.pt")
            if self.rank == 0:
                _write_json_atomic(d / META_FILE, {
                    "step": self.step, "world_size": self.world_size, "zero_stage": self.cfg.scale.zero_stage,
                    "ema": self.ema is not None, "images_seen": self.images_seen, "config": self.cfg.to_dict(),
                    "weights": f"{DS_TAG}/{DS_MODEL_FILE}"})
            nbytes = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
            total = torch.tensor([nbytes], dtype=torch.int64, device=self.device)
            dist.all_reduce(total)
            metrics = {"step": self.step, "images_seen": self.images_seen, "train_bpd": self.train_bpd,
                       "eval_bpd": self.eval_bpd}
            self.persist(metrics, d, f"checkpoint_{self.step:07d}")
        self.last_checkpoint_step = self.step
        self.reporter.on_checkpoint(self.step, time.perf_counter() - start, nbytes, int(total.item()))

    # ----------------------------------------------------------------------------------------------- loop
    def fit(self) -> dict:
        t = self.cfg.train
        start_step, step_seconds = self.step, 0.0
        data = iter(self.loader)
        pending: list[dict] = []  # steps whose device results are not read yet
        interval = {"step_s": 0.0, "steps": 0, "loss": 0.0}
        while self.step < t.max_steps:
            pending.append(self.train_step(data))
            self.step += 1
            self.images_seen += t.batch_size
            log_now = self.step % t.log_every == 0 or self.step == t.max_steps
            due = [every and self.step % every == 0 and self.step < t.max_steps
                   for every in (t.eval_every, t.sample_every, t.checkpoint_every)]
            if not (log_now or any(due) or self.step == t.max_steps):
                continue
            # Read the pending steps (the one host sync per interval), then report them in order.
            for stats in resolve_stats(pending):
                self.skipped += int(stats["skipped"])
                interval["steps"] += 1
                interval["step_s"] += stats["t_step"]
                interval["loss"] += stats["loss"]
                step_seconds += stats["t_step"]
                self.reporter.on_step(stats)
            pending = []
            if log_now:
                loss = torch.tensor([interval["loss"]], dtype=torch.float64, device=self.device)
                dist.all_reduce(loss)  # every rank's micro-batches count equally
                self.train_bpd = loss.item() / (self.world_size * interval["steps"])
                step_s = interval["step_s"] / interval["steps"]  # training steps only (not eval, checkpoints)
                self.reporter.on_interval({
                    "step": self.step, "bpd": self.train_bpd, "grad_norm": stats["grad_norm"], "lr": stats["lr"],
                    "skipped": self.skipped, "images_per_s": t.batch_size / step_s,
                    "step_s": step_s, "eta_s": (t.max_steps - self.step) * step_s,
                    "t_data_wait": stats["t_data_wait"], "t_forward": stats["t_forward"],
                    "t_backward": stats["t_backward"], "t_communication": stats["t_communication"],
                    "t_optimizer": stats["t_optimizer"]})
                interval = {"step_s": 0.0, "steps": 0, "loss": 0.0}
            if due[0]:
                self.evaluate()
            if due[1]:
                self.save_samples()
            if due[2]:
                self.checkpoint()
        trained = self.step - start_step
        self.evaluate()
        samples = self.save_samples()
        if self.last_checkpoint_step != self.step:
            self.checkpoint()
        summary = {
            "run": self.run_dir.name, "steps": self.step, "images_seen": self.images_seen,
            "final_train_bpd": self.train_bpd, "final_eval_bpd": self.eval_bpd, "eval_rows": self.eval_rows,
            "skipped_steps": self.skipped, "wall_s": round(time.time() - self.driver_start, 3),
            # training throughput of this attempt: optimizer steps incl. data wait, not eval or checkpoints
            "images_per_s": trained * t.batch_size / step_seconds if trained else None,
            "steps_this_attempt": trained, "resumed_from": self.resumed_from,
            "recovered_from": self._restarts(), "world_size": self.world_size,
            "micro_batch_size": self.micro, "grad_accum": t.grad_accum, "zero_stage": self.cfg.scale.zero_stage,
            "precision": str(self.amp_dtype or torch.float32).removeprefix("torch."),
            "checkpoint": str(self.run_dir / f"checkpoint_{self.step:07d}"),
            "samples": str(samples) if samples else None, "config_hash": config_hash(self.cfg),
            "submission": self.submission, "workers": self.workers,
        }
        if self.rank == 0:
            _write_json_atomic(self.run_dir / SUMMARY_FILE, summary)
            log.info("done: %d steps, train bpd %s, eval bpd %s, %s img/s", self.step, _fmt(self.train_bpd),
                     _fmt(self.eval_bpd), _fmt(summary["images_per_s"], ".1f"))
        return summary

    def _restarts(self) -> list[int]:
        """Steps from which worker-group restarts of this submission resumed (from the resume records)."""
        path = self.run_dir / METRICS_FILE
        if self.rank != 0 or not path.exists():
            return []
        recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r["step"] for r in recs
                if r.get("kind") == "resume" and r.get("submission") == self.submission and r.get("restart")]


def _fmt(x, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


# ------------------------------------------------------------------------------------------ Ray entry point
def ray_persist(metrics: dict, local_dir: Path, name: str) -> None:
    """Hand this rank's part of a checkpoint to Ray Train (a barrier: every rank calls it). Ray copies it to
    ``<storage>/<run>/<name>``, merging the ranks' parts, and registers it for ``ray.train.get_checkpoint``."""
    import ray.train

    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(local_dir)),
                     checkpoint_dir_name=name)


def train_worker(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``. ``config``: ``cfg`` (a config dict), ``run_dir``, ``train_dir``,
    ``eval_dir``, ``submission`` (id of this driver invocation), ``driver_start`` (epoch seconds),
    ``datasets_in_ray`` (whether the splits come as Ray Datasets)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import ray.train
    import ray.train.torch

    cfg = load_config(config["cfg"])
    ctx = ray.train.get_context()
    checkpoint = ray.train.get_checkpoint()  # the latest reported one: after a worker failure or re-submission
    with checkpoint.as_directory() if checkpoint is not None else nullcontext() as ckpt_dir:
        trainer = Trainer(cfg, Path(config["run_dir"]), config["train_dir"], config["eval_dir"],
                          rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                          device=ray.train.torch.get_device(),
                          checkpoint_dir=Path(ckpt_dir) if ckpt_dir is not None else None,
                          submission=config["submission"], driver_start=config["driver_start"],
                          datasets_in_ray=config["datasets_in_ray"])
    trainer.fit()
