"""Memory planner: the bytes one worker needs to train a config, per communication mode, before renting a cluster.

:func:`plan_memory` returns a :class:`MemoryPlan` (one :class:`ModeMemory` per mode); ``python -m dbgen.inspect
--memory`` prints it as a table or as JSON. Per worker, in bytes, with ``P`` = all parameters, ``B`` = the binary
latents, ``F = P - B``, ``W`` workers, 4 bytes per fp32 element (the engine is always fp32):

=============  ===================  ====================  =================  ===================  ==================
term           dp (ZeRO 0)          zero1 / zero2         packed-floats      packed               packed + onebit
=============  ===================  ====================  =================  ===================  ==================
parameters     P                    P                     P (binary: +-1)    F (binary: bits)     F
gradients      P                    P / P/W + 1 bucket    F + b              F + b                F + b
optimizer      Adam 2P              (2P + fp32 copy P)/W  2F + 3B/W (slice)  2F + 3B/W            2F + 3B/W
binary signs   -                    -                     B/32 (all ranks)   B/32 (the weights)   B/32 + error B
reduce bufs    1 bucket             P (flat bucket)       B/W + (W + 1) b    B/W + (W + 1) b      + B (flat)
=============  ===================  ====================  =================  ===================  ==================

``packed`` is ``comm.binary_weights: packed`` with ``comm.resident_bits`` (the default): the binary layers read
their weights from the all-gathered signs; ``packed-floats`` keeps a +-1 fp32 copy of every binary weight
(``comm.resident_bits: false``). In both the binary gradients leave in buckets of ``b = comm.bucket_mb`` (all of
``B`` with ``comm.overlap: false``): at most one bucket's gradients wait for it, and one bucket's send and receive
buffers are in flight (the receive buffer counted for the worker that owns all of a bucket's chunks: the worst
one, ``W b``, at most ``B``). With ``comm.overlap`` the packed exchange runs during backward, so the step's peak
is the sum of both phases rather than the larger one.

Plus, during forward and backward, the **materialized weights** (every layer's weight as the forward pass uses it,
``gain * v/||v||`` or ``where(v >= 0, s, -s)``, saved for the backward pass; a resident binary layer expands its
operand only while it computes, so that term is measured on a resident model for the resident modes) and the
**activations** at the per-worker micro-batch. The step's peak is the larger of the forward/backward phase
(materialized weights + activations, nothing reduced yet) and the reduce phase (gradients + reduce buffers), on
top of parameters, optimizer state and signs (their sum in the resident modes, see above).

Activations are measured, not modelled: one forward/backward at 1 and at 2 rows on this machine's CPU, following
every tensor storage that an operator allocates (a ``TorchDispatchMode``; in-place results and views of existing
storages are not new) and taking the peak of the live bytes over the whole step: what autograd saves, the
temporaries (each operator's output, the activation gradients of the backward pass) and the materialized weights.
Parameters and their existing gradients are not counted (they are terms of their own). The two runs give a line
``peak(b) = fixed + b * per_row``: ``fixed`` is the materialized weights (and whatever else does not grow with
the batch), ``per_row`` scales linearly to the micro-batch. With ``train.activation_checkpointing`` the same
measurement includes the recomputation of one block during the backward pass. Operator-internal scratch (a
convolution's workspace) is not seen; measured in fp32 on CPU: bf16 autocast on GPU roughly halves activations
and materialized weights (not modelled).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .config import Config, load_config, micro_batch_size
from .models import build, set_activation_checkpointing
from .nn import binary_layers, data_dependent_init, pack_signs
from .sync.layout import slice_size

__all__ = [
    "MODES",
    "MemoryPlan",
    "ModeMemory",
    "largest_width",
    "measure_step_bytes",
    "plan_memory",
    "proc_status_bytes",
    "reset_peak_rss",
]

FP32 = 4
# mode name -> (comm.binary_weights, comm.binary_grads, scale.zero_stage, comm.resident_bits)
MODES = {
    "dp": ("dp", "none", 0, False),
    "zero1": ("dp", "none", 1, False),
    "zero2": ("dp", "none", 2, False),
    "packed-floats": ("packed", "none", 0, False),
    "packed": ("packed", "none", 0, True),
    "packed+onebit": ("packed", "onebit", 0, True),
}
ZERO2_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements)


@dataclass
class ModeMemory:
    """Bytes per worker in one mode; ``total`` without and ``total_checkpointed`` with activation checkpointing."""

    mode: str
    parameters: int
    gradients: int
    optimizer: int
    binary_signs: int
    reduce_buffers: int
    materialized_weights: int
    activations: int
    activations_checkpointed: int
    total: int
    total_checkpointed: int
    fits: bool | None = None  # with --gpu-memory: whether the total fits (None: not asked)
    fits_checkpointed: bool | None = None


@dataclass
class MemoryPlan:
    model: str
    params: int
    binary_params: int
    workers: int
    batch: int  # global batch
    micro_batch: int  # rows per worker per forward pass
    activation_bytes_per_row: int
    activation_bytes_per_row_checkpointed: int
    gpu_memory: int | None
    modes: list[ModeMemory] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _fake_images(cfg: Config, n: int) -> torch.Tensor:
    s, c = cfg.model.image_size, cfg.model.channels
    return torch.randint(0, 256, (n, c, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))


class _LiveBytes(TorchDispatchMode):
    """The live bytes of the storages allocated by the operators run under it, and their peak."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}  # storage address -> (weak reference, bytes)
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(key)[1]
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in inputs or key in self.live or storage.nbytes() == 0:
                continue  # in place, a view, or already counted
            self.live[key] = (StorageWeakRef(storage), storage.nbytes())
            self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        return out


def measure_step_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Peak bytes of the tensors allocated during one forward and backward of ``model`` on ``x`` (see the module
    docstring). The parameters' gradients exist before it starts (zeros), so the backward pass only adds into
    them: they are a term of their own."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    with _LiveBytes() as live:
        model(x).backward()
    model.zero_grad(set_to_none=True)
    return live.peak


def _activation_lines(cfg: Config) -> dict:
    """fixed and per-row peak bytes of one step, plain and checkpointed, with the binary layers holding floats
    and (``resident`` keys, when the model has binary layers) holding their signs as bits."""
    torch.manual_seed(0)
    model = build(cfg.model)
    data_dependent_init(model, _fake_images(cfg, 4))
    model.train()
    lines = {}
    layers = [m for _, m in binary_layers(model)]
    for resident in (False, True) if layers else (False,):
        if resident:  # every binary layer's signs in one buffer, as the packed sync keeps them
            words = pack_signs(torch.cat([m.weight.detach().reshape(-1) for m in layers]))
            offset = 0
            for m in layers:
                m.keep_signs_resident(words, offset)
                offset += m.weight.numel()
        for checkpointed in (False, True):
            set_activation_checkpointing(model, checkpointed)
            one, two = (measure_step_bytes(model, _fake_images(cfg, n)) for n in (1, 2))
            lines[resident, checkpointed] = (max(0, 2 * one - two), max(0, two - one))  # (fixed, per row)
    out = {}
    for (resident, checkpointed), (fixed, per_row) in lines.items():
        suffix = ("_resident" if resident else "") + ("_checkpointed" if checkpointed else "")
        out["materialized" + suffix], out["per_row" + suffix] = fixed, per_row
    return out


def plan_memory(
    config, overrides=(), *, workers: int | None = None, batch: int | None = None, gpu_memory: int | None = None
) -> MemoryPlan:
    """The per-worker memory of ``config`` (path, dict or Config) with ``workers`` workers (default
    ``scale.num_workers``) at global ``batch`` (default ``train.batch_size``), in every mode of :data:`MODES`."""
    cfg = _sized(config, overrides, workers, batch)
    return _plan(cfg, _activation_lines(cfg), gpu_memory)


def _sized(config, overrides, workers: int | None, batch: int | None) -> Config:
    cfg = load_config(config, overrides)
    workers = workers or cfg.scale.num_workers
    batch = batch or cfg.train.batch_size
    return load_config(cfg, [f"scale.num_workers={workers}", f"train.batch_size={batch}"])


def _counts(cfg: Config) -> tuple[int, int]:
    """(parameters, binary parameters) of ``cfg``'s model, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        meta = build(cfg.model)
    return sum(p.numel() for p in meta.parameters()), sum(m.weight.numel() for _, m in binary_layers(meta))


def largest_width(
    config, overrides=(), *, budget: int, workers: int | None = None, batch: int | None = None, step: int = 16
) -> dict[str, int | None]:
    """Per mode, the largest ``model.width`` (a multiple of ``step``) whose planned total fits ``budget`` bytes
    per worker (None: not even ``step``). Parameters are counted exactly at every width; the step's activations
    are measured once, at the config's width ``w0``, and scaled: per-row activations as ``w / w0`` (channels),
    the materialized weights as ``(w / w0)**2`` (convolution weights). An estimate for sizing a run: check the
    width it gives with a measured run (``python -m dbgen.bench scale --width``)."""
    cfg = _sized(config, overrides, workers, batch)
    w0, acts = cfg.model.width, _activation_lines(cfg)
    totals: dict[int, dict[str, int]] = {}  # width -> mode -> planned total

    def total(width: int, mode: str) -> int:
        if width not in totals:
            c = load_config(cfg, [f"model.width={width}"])
            r = width / w0
            scaled = {k: round(v * (r * r if k.startswith("materialized") else r)) for k, v in acts.items()}
            totals[width] = {m.mode: m.total for m in _plan(c, scaled, None).modes}
        return totals[width][mode]

    out = {}
    for mode in [m.mode for m in _plan(cfg, acts, None).modes]:
        lo, hi = 0, step  # lo fits (0: nothing yet), hi does not or is untested
        while total(hi, mode) <= budget:
            lo, hi = hi, 2 * hi
        while hi - lo > step:
            mid = (lo + hi) // 2 // step * step
            lo, hi = (mid, hi) if total(mid, mode) <= budget else (lo, mid)
        out[mode] = lo or None
    return out


def _plan(cfg: Config, acts: dict, gpu_memory: int | None) -> MemoryPlan:
    """The plan of a sized config from its measured activation lines (:func:`_activation_lines`)."""
    workers, batch = cfg.scale.num_workers, cfg.train.batch_size
    micro = micro_batch_size(cfg, workers)
    n_params, n_binary = _counts(cfg)
    P, B = FP32 * n_params, FP32 * n_binary
    F, S = P - B, FP32 * slice_size(n_binary, workers)  # S: one worker's latent slice (padded)
    plan = MemoryPlan(
        model=cfg.model.name,
        params=n_params,
        binary_params=n_binary,
        workers=workers,
        batch=batch,
        micro_batch=micro,
        activation_bytes_per_row=acts["per_row"],
        activation_bytes_per_row_checkpointed=acts["per_row_checkpointed"],
        gpu_memory=gpu_memory,
    )
    # what one gradient bucket holds at most (comm.bucket_mb; everything in the serial schedule)
    bucket_bytes = round(cfg.comm.bucket_mb * 2**20) if cfg.comm.overlap else P
    for mode, (weights, grads, zero, resident) in MODES.items():
        if weights == "packed" and n_binary == 0:
            continue  # packed modes need binary layers
        signs, parameters = 0, P
        if weights == "dp":
            optimizer = 2 * P if zero == 0 else 3 * P // workers
            gradients = P if zero < 2 else P // workers + FP32 * min(n_params, ZERO2_BUCKET_ELEMENTS)
            # ZeRO 0: one bucket's flat copy at a time (ours); ZeRO 1/2: DeepSpeed's flat buffer
            reduce_buffers = min(P, bucket_bytes) if zero == 0 else P
        else:
            optimizer = 2 * F + 3 * S
            signs = workers * S // (8 * FP32)  # the all-gathered packed signs
            if resident:
                parameters = F  # the binary weights are those signs
            # binary gradients wait for their bucket only; this worker's averaged slice (S), a bucket's send
            # rows and the all-to-all's receive buffer (W rows of it where one worker owns all of a bucket's
            # chunks, as small buckets in gradient order do; at most B)
            bucket = min(B, bucket_bytes)
            gradients = F + bucket
            reduce_buffers = S + bucket + min(workers * bucket, B)
            if grads == "onebit":
                signs += workers * S  # the sender's error buffer (padded latents, fp32)
                reduce_buffers += B  # the 1-bit step's flat vector, which becomes the next error
        static = parameters + optimizer + signs
        key = "_resident" if resident else ""
        materialized, materialized_ckpt = acts["materialized" + key], acts[f"materialized{key}_checkpointed"]
        activations = micro * acts["per_row" + key]
        activations_ckpt = micro * acts[f"per_row{key}_checkpointed"]
        if weights == "packed" and cfg.comm.overlap:  # the exchange runs during backward: both phases at once
            total = static + materialized + activations + gradients + reduce_buffers
            total_ckpt = static + materialized_ckpt + activations_ckpt + gradients + reduce_buffers
        else:
            total = static + max(materialized + activations, gradients + reduce_buffers)
            total_ckpt = static + max(materialized_ckpt + activations_ckpt, gradients + reduce_buffers)
        plan.modes.append(
            ModeMemory(
                mode=mode,
                parameters=parameters,
                gradients=gradients,
                optimizer=optimizer,
                binary_signs=signs,
                reduce_buffers=reduce_buffers,
                materialized_weights=materialized,
                activations=activations,
                activations_checkpointed=activations_ckpt,
                total=total,
                total_checkpointed=total_ckpt,
                fits=None if gpu_memory is None else total <= gpu_memory,
                fits_checkpointed=None if gpu_memory is None else total_ckpt <= gpu_memory,
            )
        )
    return plan


# ------------------------------------------------------------------------------------- measured memory (Linux)
def proc_status_bytes(field: str, pid: int | str = "self") -> int | None:
    """A memory field of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``: the resident high-water mark) in bytes;
    None when the process is gone or the field is absent. What the planner is checked against."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    return None


def reset_peak_rss() -> int:
    """Reset this process's ``VmHWM`` to its current resident size (``/proc/self/clear_refs``) and return that
    size: a later ``VmHWM`` minus it is the peak of what ran in between."""
    Path("/proc/self/clear_refs").write_text("5")
    return proc_status_bytes("VmRSS")
