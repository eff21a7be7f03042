"""The training worker: one DeepSpeed engine per Ray Train worker, the training step, eval, checkpoints.

Everything distributed lives here; model code is single-device. :func:`train_worker` is the function Ray Train
runs in every worker (``dbgen.train`` is the driver). One optimizer step (:meth:`Trainer.train_step`) is
:func:`dbgen.step.run_step` with the DeepSpeed engine as the forward and a :class:`GradientSync` as ``sync``::

    for each of train.grad_accum micro-batches:
        loss = engine(x)                      forward; bf16 autocast on GPU, fp32 on CPU (train.precision)
        sync.backward(loss, last)             local backward; in the last micro-step the gradient buckets'
                                              collectives start as they fill (comm.overlap; ZeRO 2: its own)
    sync.reduce()                             finish (wait for) the gradient reduction of this step
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
* **Gradient communication** (``cfg.comm``) is behind :class:`dbgen.sync.GradientSync` (``backward``/
  ``reduce``/``grad_norm``/``step``/``state_dict``), built by :func:`dbgen.sync.build_gradient_sync` from
  :data:`dbgen.sync.SYNC_MODES`. The default, :class:`dbgen.sync.DataParallelSync`, is plain DeepSpeed data
  parallelism (ZeRO 0/1/2). What every mode gets from here: a client optimizer (:class:`dbgen.step.ClientAdam`,
  binary latents in their own param group) handed to ``deepspeed.initialize``; the sync switches DeepSpeed's
  backward all-reduce off and reduces explicitly, and DeepSpeed's clipping is off (we clip on the agreed norm).
* **Metrics**: :meth:`Trainer.train_step` returns a stats dict (``loss`` tensor, ``grad_norm``, ``lr``,
  ``skipped``, ``images`` and per-phase seconds ``t_data_wait``, ``t_forward``, ``t_backward``,
  ``t_communication``, ``t_optimizer``, ``t_step``) and every event goes through one
  :class:`dbgen.reporter.Reporter` (``on_step``, ``on_interval``, ``on_eval``, ``on_checkpoint``,
  ``on_samples``).

Batch arithmetic: ``train.batch_size`` is the global batch of one optimizer step; each worker runs
``train.grad_accum`` micro-batches of :func:`dbgen.config.micro_batch_size` rows.

What a run writes, and the checkpoint format (``<run>/checkpoint_<step>``: every rank writes its part into
one directory, rank 0 commits it with checksums), are :mod:`dbgen.rundir`'s; evaluation is
:func:`dbgen.eval_loop.bpd_sum` on each rank's shard, summed over ranks. This module owns the worker's state
and loop (:class:`Trainer`), the DeepSpeed config derived from ours (:func:`deepspeed_config`) and the Ray
Train entry point (:func:`train_worker`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from .atomic import write_atomic, write_json_atomic
from .config import Config, config_hash, load_config, micro_batch_size, to_yaml
from .data import EvalLoader, TrainLoader
from .eval_loop import bpd_sum
from .failures import TrainingDiverged
from .images import save_grid
from .models import build, set_activation_checkpointing
from .nn import data_dependent_init
from .reporter import Reporter, metrics_exporter, restarts
from .resources import disk_full_is_fatal
from .rundir import (
    CONFIG_FILE,
    SUMMARY_FILE,
    checkpoint_meta,
    checkpoint_name,
    choose_checkpoint,
    commit_checkpoint,
    derive_seed,
    file_records,
    list_files,
    load_checkpoint,
    partial_dir,
    prune_checkpoints,
    restore_rng,
    resume_words,
    samples_path,
    save_checkpoint,
    seed_all,
)
from .step import (
    EMA,
    PhaseClock,
    autocast_context,
    autocast_dtype,
    batch_to_device,
    build_optimizer,
    eval_mode,
    lr_at,
    prepare_model,
    resolve_stats,
    run_step,
    use_channels_last,
)
from .sync import accounting, build_gradient_sync

__all__ = ["Trainer", "deepspeed_config", "train_worker"]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ config -> DeepSpeed
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


def load_deepspeed_cpu_comm_op() -> None:
    """Load (building once) DeepSpeed's shared-memory comm op of the CPU backend before DeepSpeed does.

    DeepSpeed builds and loads it through torch's ``FileBaton``: a ``lock`` file in the op's build directory that
    only its holder removes. A process killed while holding it (a killed worker group, ``kill -9`` of a run
    starting up, the driver's watchdog) leaves the file, and every later DeepSpeed start on the host waits for
    it forever (seen under load in the suite). dbgen takes an ``flock`` first, which the kernel releases with its
    holder: a baton found while holding the flock was left by a dead process and is removed, with a warning.
    DeepSpeed's own load then reuses the module (its op builder caches loaded ops per process). A non-dbgen
    process building the same op at that moment would lose its baton; nothing else on a dbgen host builds it."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    if get_accelerator().device_name() != "cpu":
        return
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    build_dir = Path(_get_build_directory(builder.NAME, verbose=False))
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / ".dbgen.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # waits while another dbgen process on this host builds or loads it
        baton = build_dir / "lock"
        if baton.exists():
            log.warning("removing %s: left by a process killed while it built or loaded %s", baton, builder.NAME)
            baton.unlink()
        builder.load(verbose=False)


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


# -------------------------------------------------------------------------------------------------- trainer
class Trainer:
    """One worker's training state: loaders, model, DeepSpeed engine, gradient sync, EMA, counters.

    Needs an initialized ``torch.distributed`` process group (Ray Train creates it before the train loop;
    tests may create their own). ``checkpoint_dir``: a checkpoint to resume from (None: a new run, with
    data-dependent init). ``datasets_in_ray``: the splits come as Ray Train datasets (``data.loader: ray``)
    instead of being read from ``train_dir``/``eval_dir`` in-process. ``stop_file``: when it exists (the driver
    creates it on SIGINT/SIGTERM), :meth:`fit` stops at the next logging interval, without a new checkpoint.
    Once the model is built or restored, rank 0 writes the run's ``config.yaml``: a run or resume that fails
    before that leaves the old one.
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        train_dir: str,
        eval_dir: str | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        checkpoint_dir: Path | None = None,
        submission: str | None = None,
        driver_start: float | None = None,
        datasets_in_ray: bool = False,
        stop_file: Path | None = None,
    ):
        # submission: id of the driver invocation; a checkpoint of the same one means a worker-group restart
        self.cfg, self.run_dir, self.submission = cfg, Path(run_dir), submission or uuid.uuid4().hex
        self.driver_start = time.time() if driver_start is None else driver_start
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.stop_file = None if stop_file is None else Path(stop_file)
        self.amp_dtype = autocast_dtype(cfg, self.device)
        self.micro = micro_batch_size(cfg, self.world_size)
        self.step, self.skipped, self.images_seen = 0, 0, 0
        self.resumed_from, self.last_checkpoint_step = None, None
        self.train_bpd, self.eval_bpd, self.eval_rows = None, None, None
        self.reporter = Reporter(
            self.run_dir,
            self.rank,
            cfg.train.max_steps,
            world_size,
            device=self.device,
            metrics=metrics_exporter(cfg, self.run_dir.name, rank),
            resume_point=self.resume_point,
        )
        self.loader, self.eval_loader = self._build_loaders(train_dir, eval_dir, datasets_in_ray)
        model = self._build_model(init_from=train_dir if checkpoint_dir is None else None)
        self.engine, self.optimizer = self._build_engine(model)
        self.model = self.engine.module
        self.sync = build_gradient_sync(cfg, self.engine, self.optimizer)
        self.ema = None
        self._restore_or_start(checkpoint_dir)
        self.workers = self._gather_workers()
        if self.rank == 0:  # the run (or resume) is accepted: the config now matches its checkpoints
            with disk_full_is_fatal(self.run_dir / CONFIG_FILE, CONFIG_FILE, self.resume_point):
                write_atomic(self.run_dir / CONFIG_FILE, to_yaml(cfg))

    # --------------------------------------------------------------------------------------------- setup
    def _build_loaders(
        self, train_dir: str, eval_dir: str | None, datasets_in_ray: bool
    ) -> tuple[TrainLoader, EvalLoader | None]:
        """This rank's training loader and (with an eval split) its eval loader: Ray Train's datasets, or the
        splits read in-process (``data.loader``)."""
        cfg, backend = self.cfg, "ray" if datasets_in_ray else "arrow"
        train = TrainLoader(
            None if datasets_in_ray else train_dir,
            batch_size=self.micro,
            seed=cfg.train.seed,
            rank=self.rank,
            world_size=self.world_size,
            shuffle_buffer=cfg.data.shuffle_buffer,
            drop_last=cfg.data.drop_last,
            backend=backend,
        )
        if eval_dir is None:
            return train, None
        evaluation = EvalLoader(
            None if datasets_in_ray else eval_dir,
            batch_size=cfg.train.eval_batch_size,
            rank=self.rank,
            world_size=self.world_size,
            backend=backend,
        )
        return train, evaluation

    def _build_model(self, init_from: str | None) -> nn.Module:
        """The model, identical on every rank: built from the same seed, data-dependent init on rank 0 from
        ``init_from`` rows (a new run; None when a checkpoint will be restored), then every parameter and
        buffer broadcast from rank 0; then channels-last / ``torch.compile`` (same math)."""
        seed_all(self.cfg.train.seed)  # identical construction on every rank (rank 0's init is broadcast anyway)
        model = build(self.cfg.model).to(self.device)
        set_activation_checkpointing(model, self.cfg.train.activation_checkpointing)
        if init_from is not None:
            self._data_dependent_init(model, init_from)
        accounting.install()  # count every collective from here on (accounting.COUNTER, taken once per step)
        self._broadcast(model)
        self.channels_last = use_channels_last(self.cfg, self.device)
        prepare_model(model, self.cfg, self.device)
        return model

    def _build_engine(self, model: nn.Module):
        """``(DeepSpeed engine, client optimizer)`` around ``model`` (:func:`deepspeed_config`)."""
        import deepspeed  # here: importing it starts DeepSpeed's accelerator detection and op builders

        optimizer = build_optimizer(self.cfg, model)
        deepspeed.utils.logger.setLevel(logging.WARNING)
        load_deepspeed_cpu_comm_op()
        with _without_deepspeed_broadcast():
            engine, _, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=deepspeed_config(self.cfg, self.world_size)
            )
        return engine, optimizer

    def _restore_or_start(self, checkpoint_dir: Path | None) -> None:
        """Restore ``checkpoint_dir`` (engine, counters, loader, sync, EMA, RNG), or seed this rank's RNG for a
        new run; then an EMA from the current weights if the run keeps one and the checkpoint had none."""
        if checkpoint_dir is not None:
            self._restore(Path(checkpoint_dir))
        else:
            seed_all(derive_seed(self.cfg.train.seed, self.rank))
        if self.cfg.train.ema_decay and self.ema is None:
            self.ema = EMA(self.model, self.cfg.train.ema_decay)  # from the initial (or restored) weights

    def _data_dependent_init(self, model: nn.Module, train_dir: str) -> None:
        """Rank 0 initializes gains and biases from ``train.init_batch_size`` training rows."""
        if self.rank == 0:
            rows = TrainLoader(
                train_dir,
                batch_size=self.cfg.train.init_batch_size,
                seed=self.cfg.train.seed,
                rank=0,
                world_size=1,
                shuffle_buffer=self.cfg.data.shuffle_buffer,
                backend="arrow",
            )
            x = next(iter(rows)).to(self.device)  # (init_batch_size, C, H, W) uint8
            n = data_dependent_init(model, x)
            log.info("data-dependent init of %d modules on %d rows", n, x.shape[0])

    @torch.no_grad()
    def _broadcast(self, model: nn.Module) -> None:
        """Every parameter and buffer from rank 0, before the first step (and before DeepSpeed sees them)."""
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)

    def _gather_workers(self) -> list[dict]:
        import ray  # here: only to ask whether this worker runs inside Ray (Ray is heavy to import)

        node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        me = {
            "rank": self.rank,
            "node_id": node_id,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "device": str(self.device),
        }
        out = [None] * self.world_size
        dist.all_gather_object(out, me)
        return out

    def _restore(self, ckpt: Path) -> None:
        client = load_checkpoint(ckpt, self.engine, self.cfg, self.world_size)
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
        if not restore_rng(ckpt, self.rank):  # more workers than the checkpoint had
            seed_all(derive_seed(self.cfg.train.seed + self.step, self.rank))
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
        clock.mark(None)  # the data wait is that host time, not a device phase
        lr = lr_at(self.cfg, self.step)
        out = run_step(self.engine, self.sync, batches, cfg, lr, self.amp_dtype, clock, self.model, self.ema)
        return {
            "step": self.step + 1,
            **out,
            "lr": lr,
            "images": cfg.batch_size,
            "t_data_wait": t_data,
            "clock": clock,
            "comm_bytes": accounting.COUNTER.take(),
        }  # bytes sent since the last step, by kind

    # ---------------------------------------------------------------------------------------- eval, samples
    def _eval_mode(self, seed: int):
        """Eval weights (EMA if kept), eval mode and a forked RNG: eval never perturbs training randomness."""
        self.sync.weights_ready()
        return eval_mode(self.model, self.ema, seed, self.device)

    @torch.no_grad()
    def evaluate(self) -> None:
        """Mean bits/dim (ELBO / dequantized bound, one sample) over the held-out split, all ranks together."""
        if self.eval_loader is None:
            return
        start = time.perf_counter()
        amp = autocast_context(self.device, self.amp_dtype)
        with self._eval_mode(derive_seed(self.cfg.train.seed + 1, self.rank)) as model, amp:
            bpd, rows = bpd_sum(
                model,
                self.eval_loader,
                max_batches=self.cfg.train.eval_batches,
                to_device=lambda x: batch_to_device(x, self.device, self.channels_last),
            )
        total = torch.stack([bpd, torch.tensor(float(rows), dtype=torch.float64, device=self.device)])
        dist.all_reduce(total)  # (sum of bpd, rows) over the ranks' shards
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
        path = samples_path(self.run_dir, self.step)
        with disk_full_is_fatal(path, f"the samples of step {self.step}", self.resume_point):
            save_grid(images, path)
        self.reporter.on_samples(self.step, path)
        return path

    # ------------------------------------------------------------------------------------------ checkpoint
    def checkpoint(self) -> None:
        """Write ``<run>/checkpoint_<step>``: every rank saves its part into ``.checkpoint_<step>.partial``
        (the storage is one file system every node sees), the ranks hash the files between them, and rank 0
        writes ``meta.json`` (checksums, finite flag) and renames the directory, so a checkpoint is complete or
        absent; then it deletes the ones beyond ``train.keep_checkpoints`` (:func:`dbgen.rundir.prune_checkpoints`
        keeps the newest finite one)."""
        self.sync.weights_ready()
        start = time.perf_counter()
        state = {
            "step": self.step,
            "skipped": self.skipped,
            "images_seen": self.images_seen,
            "loader": self.loader.state_dict(),
            "sync": self.sync.state_dict(),
            "ema": self.ema.state_dict(self.model) if self.ema is not None else None,
            "world_size": self.world_size,
            "submission": self.submission,
            "resumed_from": self.resumed_from,
            "train_bpd": self.train_bpd,
        }
        partial = partial_dir(self.run_dir, self.step)
        # A full disk stops the run with one line (not retried); the driver removes the partial folder once
        # every worker has stopped (dbgen.train), and committed checkpoints are never touched.
        with disk_full_is_fatal(partial, checkpoint_name(self.step), self.resume_point):
            if self.rank == 0:
                shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted attempt
                partial.mkdir(parents=True)
            dist.barrier()
            save_checkpoint(partial, self.engine, state, self.rank)
            self.sync.save_partition(partial)
            dist.barrier()
            names = list_files(partial)
            records = [None] * self.world_size
            dist.all_gather_object(records, file_records(partial, names[self.rank :: self.world_size]))
            files = {name: rec for part in records for name, rec in part.items()}
            finite = torch.tensor([float(self._weights_finite())], device=self.device)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # packed modes: each rank checks its own latents too
            if self.rank == 0:
                meta = checkpoint_meta(
                    self.cfg,
                    self.step,
                    self.world_size,
                    self.ema is not None,
                    self.images_seen,
                    bool(finite.item()),
                    files,
                )
                commit_checkpoint(partial, meta)
        if self.rank == 0:
            prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
        dist.barrier()  # the checkpoint is committed before any rank goes on (or stops)
        self.last_checkpoint_step = self.step
        nbytes = sum(rec["bytes"] for rec in files.values())
        self.reporter.on_checkpoint(self.step, time.perf_counter() - start, nbytes)

    def resume_point(self) -> str:
        """Where the same command resumes this run now, in words (for a fatal error's message)."""
        last = self.last_checkpoint_step
        return resume_words(self.run_dir, trusted=self.run_dir / checkpoint_name(last) if last is not None else None)

    @torch.no_grad()
    def _weights_finite(self) -> bool:
        self.sync.weights_ready()
        tensors = [*self.model.parameters(), *self.sync.rank_tensors()]  # packed modes: this rank's latent slice
        if self.ema is not None:
            tensors += [t for t in self.ema.state_dict(self.model).values() if torch.is_tensor(t)]
        return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())

    def _stop_requested(self) -> bool:
        """Whether the driver asked the run to stop: rank 0 looks, every rank gets its answer (the ranks must
        leave the loop at the same step)."""
        flag = torch.tensor(
            [float(self.rank == 0 and self.stop_file is not None and self.stop_file.exists())], device=self.device
        )
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    # ----------------------------------------------------------------------------------------------- loop
    def fit(self) -> dict:
        """Train to ``train.max_steps`` (eval, samples and checkpoints on their schedules and at the end);
        returns the run's summary, which rank 0 also writes to ``summary.json``. The metrics exporter is closed
        at the end, also when training fails."""
        try:
            return self._fit()
        finally:
            self.reporter.close()

    def _fit(self) -> dict:
        t = self.cfg.train
        start_step, data = self.step, iter(self.loader)
        pending: list[dict] = []  # steps whose device results are not read yet
        interval = _Interval()
        interrupted = False  # whether the driver asked to stop
        while self.step < t.max_steps:
            pending.append(self.train_step(data))
            self.step += 1
            self.images_seen += t.batch_size
            due = self._due()
            if not due.anything:
                continue
            stats = self._read_steps(pending, interval)  # the one host sync per interval
            pending = []
            self._stop_if_diverged(interval.bad_steps)
            if due.log:
                self._log_interval(interval, stats)
            if due.eval:
                self.evaluate()
            if due.samples:
                self.save_samples()
            if due.checkpoint:
                self.checkpoint()
            if self._stop_requested():
                interrupted = True
                break
        samples = None
        if interrupted:
            log.info("stopped at step %d on the driver's request", self.step)
        else:  # the end of a run: a last eval, samples and checkpoint
            self.evaluate()
            samples = self.save_samples()
            if self.last_checkpoint_step != self.step:
                self.checkpoint()
        summary = self._summary(self.step - start_step, interval.seconds, interrupted, samples)
        if self.rank == 0:
            with disk_full_is_fatal(self.run_dir / SUMMARY_FILE, SUMMARY_FILE, self.resume_point):
                write_json_atomic(self.run_dir / SUMMARY_FILE, summary)
            log.info(
                "done: %d steps, train bpd %s, eval bpd %s, %s img/s",
                self.step,
                _fmt(self.train_bpd),
                _fmt(self.eval_bpd),
                _fmt(summary["images_per_s"], ".1f"),
            )
        return summary

    def _due(self) -> _Due:
        """What the step just taken is due for: a log line (every ``train.log_every`` steps and at the end),
        eval, samples, checkpoint (every ``*_every`` steps before the end; the end has its own)."""
        t, step = self.cfg.train, self.step
        eval_, samples, ckpt = (
            bool(every) and step % every == 0 and step < t.max_steps
            for every in (t.eval_every, t.sample_every, t.checkpoint_every)
        )
        log_now = step % t.log_every == 0 or step == t.max_steps
        return _Due(log_now, eval_, samples, ckpt, log_now or eval_ or samples or ckpt or step == t.max_steps)

    def _read_steps(self, pending: list[dict], interval: _Interval) -> dict:
        """Read the pending steps' device results (one host sync), count them into ``interval`` and the run's
        counters and report each in order; returns the last step's stats."""
        for stats in resolve_stats(pending):
            self.skipped += int(stats["skipped"])
            interval.bad_steps = interval.bad_steps + 1 if stats["skipped"] else 0
            interval.steps += 1
            interval.step_s += stats["t_step"]
            interval.loss += stats["loss"]
            interval.seconds += stats["t_step"]
            self.reporter.on_step(stats)
        return stats

    def _stop_if_diverged(self, bad_steps: int) -> None:
        """Raise :class:`TrainingDiverged` after ``train.max_bad_steps`` skipped steps in a row. Every rank
        agrees: the skip decision is on the all-reduced norm."""
        t = self.cfg.train
        if bad_steps >= t.max_bad_steps:
            raise TrainingDiverged(
                f"{self.run_dir}: the run diverged: steps {self.step - bad_steps + 1}-{self.step} were all "
                f"skipped (gradient norm not finite or above train.skip_threshold={t.skip_threshold:g}; "
                f"train.max_bad_steps={t.max_bad_steps}). Lower optimizer.lr: "
                f"{self.resume_point()}"
            )

    def _log_interval(self, interval: _Interval, stats: dict) -> None:
        """The logging interval's record: mean training bits/dim over every rank's micro-batches, throughput
        and ETA from the training steps alone (not eval or checkpoints), the last step's phase times."""
        t = self.cfg.train
        loss = torch.tensor([interval.loss], dtype=torch.float64, device=self.device)
        dist.all_reduce(loss)  # every rank's micro-batches count equally
        self.train_bpd = loss.item() / (self.world_size * interval.steps)
        step_s = interval.step_s / interval.steps
        self.reporter.on_interval(
            {
                "step": self.step,
                "bpd": self.train_bpd,
                "grad_norm": stats["grad_norm"],
                "lr": stats["lr"],
                "skipped": self.skipped,
                "images_per_s": t.batch_size / step_s,
                "step_s": step_s,
                "eta_s": (t.max_steps - self.step) * step_s,
                **{k: stats[k] for k in ("t_data_wait", "t_forward", "t_backward", "t_communication", "t_optimizer")},
            }
        )
        interval.step_s, interval.steps, interval.loss = 0.0, 0, 0.0

    def _summary(self, trained: int, step_seconds: float, interrupted: bool, samples: Path | None) -> dict:
        """This attempt's summary (``summary.json``): ``trained`` steps in ``step_seconds`` of training steps."""
        t = self.cfg.train
        return {
            "run": self.run_dir.name,
            "steps": self.step,
            "images_seen": self.images_seen,
            "final_train_bpd": self.train_bpd,
            "final_eval_bpd": self.eval_bpd,
            "eval_rows": self.eval_rows,
            "skipped_steps": self.skipped,
            "wall_s": round(time.time() - self.driver_start, 3),
            # training throughput of this attempt: optimizer steps incl. data wait, not eval or checkpoints
            "images_per_s": trained * t.batch_size / step_seconds if trained else None,
            "steps_this_attempt": trained,
            "resumed_from": self.resumed_from,
            "interrupted": interrupted,
            "last_checkpoint_step": self.last_checkpoint_step,
            "recovered_from": restarts(self.run_dir, self.submission) if self.rank == 0 else [],
            "world_size": self.world_size,
            "micro_batch_size": self.micro,
            "grad_accum": t.grad_accum,
            "zero_stage": self.cfg.scale.zero_stage,
            "precision": str(self.amp_dtype or torch.float32).removeprefix("torch."),
            "checkpoint": (
                str(self.run_dir / checkpoint_name(self.last_checkpoint_step))
                if self.last_checkpoint_step is not None
                else None
            ),
            "samples": str(samples) if samples else None,
            "config_hash": config_hash(self.cfg),
            "submission": self.submission,
            "workers": self.workers,
        }


@dataclass
class _Interval:
    """What the loop accumulates between log lines (``step_s``, ``steps``, ``loss``, reset at each), and over the
    attempt (``seconds`` of training steps; ``bad_steps``: skipped steps in a row)."""

    step_s: float = 0.0
    steps: int = 0
    loss: float = 0.0
    seconds: float = 0.0
    bad_steps: int = 0


class _Due(NamedTuple):
    """What a step is due for (:meth:`Trainer._due`); ``anything``: read the pending steps now."""

    log: bool
    eval: bool
    samples: bool
    checkpoint: bool
    anything: bool


def _fmt(x, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


# ------------------------------------------------------------------------------------------ Ray entry point
def train_worker(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``. ``config``: ``cfg`` (a config dict), ``run_dir``, ``train_dir``,
    ``eval_dir``, ``submission`` (id of this driver invocation), ``driver_start`` (epoch seconds),
    ``datasets_in_ray`` (whether the splits come as Ray Datasets), ``resume_from`` (the checkpoint the driver
    chose and verified, or None) and ``stop_file``.

    The checkpoint to start from is chosen here, on every attempt, the way the driver chose it
    (:func:`dbgen.rundir.choose_checkpoint`; rank 0 chooses, the others get its choice): on the first attempt that is
    the driver's, after a worker-group restart it is the newest checkpoint this run has committed since. Ray's
    own checkpoint registry is not used."""
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, force=True, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import ray.train
    import ray.train.torch

    cfg = load_config(config["cfg"])
    ctx = ray.train.get_context()
    rank, run_dir = ctx.get_world_rank(), Path(config["run_dir"])
    choice = [None]
    if rank == 0:
        found = choose_checkpoint(run_dir, trusted=config["resume_from"])  # a resume: verified, finite
        choice[0] = str(found[0]) if found is not None else None
    dist.broadcast_object_list(choice, src=0)
    trainer = Trainer(
        cfg,
        run_dir,
        config["train_dir"],
        config["eval_dir"],
        rank=rank,
        world_size=ctx.get_world_size(),
        device=ray.train.torch.get_device(),
        checkpoint_dir=Path(choice[0]) if choice[0] is not None else None,
        submission=config["submission"],
        driver_start=config["driver_start"],
        datasets_in_ray=config["datasets_in_ray"],
        stop_file=config["stop_file"],
    )
    trainer.fit()
