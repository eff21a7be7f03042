"""Gradient synchronization: the :class:`GradientSync` protocol that :func:`dbgen.step.run_step` drives, its
implementations, and the communication they rest on. One package, so that a communication mode is one class
next to the others, with the shared parts (norm, backward, step) written once in :mod:`.base`.

=====================  ===========================================================================================
module                 owns
=====================  ===========================================================================================
:mod:`.base`           the protocol; the global norm, the engine backward, the lr/skip/clip step, base classes
:mod:`.local`          :class:`LocalSync`: one process, no DeepSpeed (bench, single-device setup and tests)
:mod:`.data_parallel`  :class:`DataParallelSync`: ``dp/none``, DeepSpeed data parallelism, ZeRO 0/1/2
:mod:`.packed`         :class:`PackedSync`: ``packed/none``, ``packed/onebit``: sharded latents, packed signs
:mod:`.dp_onebit`      :class:`DataParallelOnebitSync`: ``dp/onebit``: 1-bit compressed all-reduce
:mod:`.counted`        :class:`CountedSync`: each phase's collectives counted as grad/weight/other bytes
:mod:`.accounting`     the byte counter: every ``torch.distributed`` collective of the process, by kind
:mod:`.collectives`    the flat reduce-scatter/all-gather/all-reduce the modes issue, per backend
:mod:`.buckets`        ``comm.overlap``: gradient buckets whose collectives start during backward
:mod:`.onebit`         1-bit messages (signs + per-chunk scales) and the error-feedback exchange
:mod:`.layout`         the binary latents as one flat vector sharded over ranks; per-rank checkpoint files
=====================  ===========================================================================================

:data:`SYNC_MODES` maps ``(comm.binary_weights, comm.binary_grads)`` to a builder of the mode's sync;
:func:`build_gradient_sync` builds the configured one, wrapped in :class:`CountedSync`. Dependencies point
one way: this package imports :mod:`dbgen.nn` only, and :mod:`dbgen.step` and :mod:`dbgen.trainer` import it.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import GradientSync
from .counted import CountedSync
from .data_parallel import DataParallelSync
from .dp_onebit import DataParallelOnebitSync
from .local import LocalSync
from .packed import PackedSync

__all__ = [
    "SYNC_MODES",
    "CountedSync",
    "DataParallelOnebitSync",
    "DataParallelSync",
    "GradientSync",
    "LocalSync",
    "PackedSync",
    "build_gradient_sync",
]

# (comm.binary_weights, comm.binary_grads) -> builder(engine, optimizer, comm) of the mode's GradientSync, where
# comm is the config's ``comm`` section: one entry for every pair of values the config accepts.
SYNC_MODES: dict[tuple[str, str], Callable[..., GradientSync]] = {
    ("dp", "none"): lambda engine, optimizer, comm: DataParallelSync(engine, optimizer, comm.overlap, comm.bucket_mb),
    ("packed", "none"): lambda engine, optimizer, comm: PackedSync(
        engine, optimizer, None, comm.overlap, comm.bucket_mb, comm.resident_bits
    ),
    ("packed", "onebit"): lambda engine, optimizer, comm: PackedSync(
        engine, optimizer, comm.onebit_warmup_steps, comm.overlap, comm.bucket_mb, comm.resident_bits
    ),
    ("dp", "onebit"): lambda engine, optimizer, comm: DataParallelOnebitSync(
        engine, optimizer, comm.onebit_warmup_steps
    ),
}


def build_gradient_sync(cfg, engine, optimizer) -> CountedSync:
    """The mode of ``cfg.comm`` for a DeepSpeed ``engine`` and its client ``optimizer`` (a ClientAdam), wrapped
    so that its collectives count as grad/weight/other bytes (:mod:`dbgen.sync.accounting`)."""
    comm = cfg.comm
    return CountedSync(SYNC_MODES[(comm.binary_weights, comm.binary_grads)](engine, optimizer, comm))
