"""What the link between data-parallel workers costs a training step, per communication mode.

The model (fitted to the two-namespace sweep in benchmarks/RESULTS.md): with no overlap of communication and
computation (``comm.overlap: false``: backward, then the collectives, then the optimizer)::

    step_s = compute_s + 8 * bytes_per_step / rate_bps + collectives_per_step * 2 (W - 1) * latency_s

With the overlapped schedule (``comm.overlap: true``, the default) the gradient bytes go during backward and
hide behind up to :data:`HIDDEN_FRACTION` of the compute; the weight bytes (the packed sign all-gather after
the optimizer step) and the rest stay exposed::

    step_s = compute_s + max(0, 8 * grad_bytes / rate_bps - HIDDEN_FRACTION * compute_s)
             + 8 * (weight_bytes + other_bytes) / rate_bps + latency term

``bytes_per_step`` is what one worker sends (:func:`step_bytes`, the formulas :mod:`dbgen.sync.accounting`
counts for each mode's collectives; tests/test_comm.py checks them against a real step), ``collectives_per_step``
the collective calls of a step (:data:`COLLECTIVES_PER_STEP`, counted in the sweep) and ``2 (W - 1)`` the
message rounds of a ring all-reduce over ``W`` workers (an upper bound for the other collectives). Within
``slowdown`` (10%) of compute-bound means ``8 * bytes / rate + latency term <= slowdown * compute_s``, so
:func:`needed_gbps` is ``8 * bytes / (slowdown * compute_s - latency term)``; overlapped,
:func:`needed_gbps_overlapped` solves the second formula for ``step_s = (1 + slowdown) * compute_s``.

GPU step times: :data:`TARGET_IMAGES_PER_S`, the targets of 4x the original code's H200 throughput
(method.md section 4: RVAE 1,399 img/s at batch 128, Flow++ 243 at batch 64), until a measured GPU step time
is recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

from .sync.layout import slice_size
from .sync.onebit import ONEBIT_CHUNK

__all__ = [
    "COLLECTIVES_PER_STEP",
    "HIDDEN_FRACTION",
    "MODES",
    "OVERLAPPED_MODES",
    "TARGET_IMAGES_PER_S",
    "format_link_report",
    "link_report",
    "needed_gbps",
    "needed_gbps_overlapped",
    "overlapped_step_s",
    "step_bytes",
    "target_step_s",
]

MODES = ("dp", "zero1", "packed", "packed_onebit")  # as in ``python -m dbgen.bench comm``
OVERLAPPED_MODES = ("dp", "packed", "packed_onebit")  # comm.overlap applies (zero1 keeps DeepSpeed's schedule)

# 4x the original code's H200 images/s (method.md section 4), the GPU target
TARGET_IMAGES_PER_S = {"rvae": 4 * 1399, "flowpp": 4 * 243}

# torch.distributed calls per training step per mode with 2 workers: dp and zero1 as counted by ``dbgen.bench
# comm`` on the paper RVAE (2 and 6); packed modes from their code (full-precision all-reduce, all_to_all, norm
# all-reduce, sign all-gather)
COLLECTIVES_PER_STEP = {"dp": 2, "zero1": 6, "packed": 4, "packed_onebit": 4}

# The share of a step's compute that the overlapped gradient exchange hides behind: backward's share of the step
# (the exchange starts with the first ready bucket). Fitted on `python -m dbgen.bench overlap`, paper RVAE, 2 CPU
# workers on the two-namespace link at the rate where dp's bytes take one compute step (benchmarks/RESULTS.md,
# 2026-12-07): dbgen dp hid 1.44 of 2.63 s of communication behind a 2.20 s step (0.65), PyTorch DDP 0.65.
HIDDEN_FRACTION = 0.65


def step_bytes(mode: str, params: int, binary_params: int, world: int) -> dict[str, int]:
    """Bytes one of ``world`` workers sends per (compressed, after warm-up) step, by kind, for a model with
    ``params`` fp32 parameters of which ``binary_params`` are binary latents. The formulas of the accounting
    (gloo; NCCL's ring reduce-scatter sends the same as the all_to_all used on gloo)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {MODES}")
    if world <= 1:
        return {"grad": 0, "weight": 0, "other": 0}
    w = world
    norm = 2 * (w - 1) * 4 // w  # the gradient norm's 4-byte all-reduce
    if mode in ("dp", "zero1"):
        grad = 2 * (w - 1) * 4 * params // w  # ring all-reduce of every fp32 gradient
        weight = (w - 1) * (4 * params // w) if mode == "zero1" else 0  # ZeRO-1's all-gather of the partitions
        return {"grad": grad, "weight": weight, "other": norm}
    s = slice_size(binary_params, w)  # binary elements per rank
    fp = 2 * (w - 1) * 4 * (params - binary_params) // w  # the full-precision gradients' all-reduce
    if mode == "packed":
        binary = (w - 1) * 4 * s  # all_to_all: each peer gets its slice of the fp32 binary gradients
    else:
        binary = (w - 1) * (s // 8 + 4 * s // ONEBIT_CHUNK)  # 1-bit: signs plus one fp32 scale per chunk
    return {"grad": fp + binary, "weight": (w - 1) * (s // 8), "other": norm}


def target_step_s(model: str, batch_size: int) -> float | None:
    """Seconds per step at the GPU target for ``model`` at ``batch_size`` (None for a model without one)."""
    rate = TARGET_IMAGES_PER_S.get(model)
    return batch_size / rate if rate else None


def latency_s(mode: str, world: int, latency: float) -> float:
    """The latency term of a step: collectives x message rounds x one-way ``latency`` seconds."""
    return COLLECTIVES_PER_STEP[mode] * 2 * (world - 1) * latency


def needed_gbps(
    nbytes: float,
    compute_s: float,
    latency: float = 0.0,
    slowdown: float = 0.10,
    mode: str = "dp",
    world: int = 2,
) -> float:
    """Link rate (Gbit/s) at which ``nbytes`` per step plus the latency term add at most ``slowdown`` x
    ``compute_s`` to a serial step; inf when the latency term alone exceeds that."""
    room = slowdown * compute_s - latency_s(mode, world, latency)
    return float("inf") if room <= 0 else 8 * nbytes / room / 1e9


def overlapped_step_s(kinds: dict, compute_s: float, gbps: float, latency: float = 0.0, mode="dp", world=2) -> float:
    """Seconds per overlapped step (the module's second formula) for bytes by kind ``kinds`` on a ``gbps`` link."""
    rate = gbps * 1e9
    hidden = max(0.0, 8 * kinds["grad"] / rate - HIDDEN_FRACTION * compute_s)
    return compute_s + hidden + 8 * (kinds["weight"] + kinds["other"]) / rate + latency_s(mode, world, latency)


def needed_gbps_overlapped(
    kinds: dict, compute_s: float, latency: float = 0.0, slowdown: float = 0.10, mode: str = "dp", world: int = 2
) -> float:
    """Link rate (Gbit/s) at which :func:`overlapped_step_s` is ``(1 + slowdown) x compute_s``: the larger of
    the rate where all bytes fit in ``(HIDDEN_FRACTION + slowdown) x compute_s`` and the rate where the exposed
    kinds (weight, other) alone fit in ``slowdown x compute_s``; inf when the latency term alone exceeds that."""
    lat = latency_s(mode, world, latency)
    exposed = kinds["weight"] + kinds["other"]
    rooms = [
        ((HIDDEN_FRACTION + slowdown) * compute_s - lat, sum(kinds.values())),
        (slowdown * compute_s - lat, exposed),
    ]
    if any(room <= 0 for room, _ in rooms):
        return float("inf")
    return max(8 * nbytes / room / 1e9 for room, nbytes in rooms)


def link_report(
    params: int,
    binary_params: int,
    world: int,
    link_gbps: float,
    compute_s: float | None,
    latency: float = 0.0,
    slowdown: float = 0.10,
) -> list[dict]:
    """Per mode: bytes per step, seconds on a ``link_gbps`` link, and (with ``compute_s``) the slowdown there
    and the rate needed to stay within ``slowdown`` of compute-bound."""
    rows = []
    for mode in MODES:
        kinds = step_bytes(mode, params, binary_params, world)
        nbytes = sum(kinds.values())
        comm_s = 8 * nbytes / (link_gbps * 1e9) + latency_s(mode, world, latency)
        row = {"mode": mode, "bytes_per_step": nbytes, "comm_s": comm_s}
        if compute_s:
            row["slowdown"] = comm_s / compute_s
            row["needed_gbps"] = needed_gbps(nbytes, compute_s, latency, slowdown, mode, world)
            row["needed_gbps_overlapped"] = (
                needed_gbps_overlapped(kinds, compute_s, latency, slowdown, mode, world)
                if mode in OVERLAPPED_MODES
                else row["needed_gbps"]
            )
        rows.append(row)
    return rows


def format_link_report(rows: list[dict], world: int, link_gbps: float, compute_s: float | None, latency: float) -> str:
    """The table ``python -m dbgen.inspect --link-gbps`` prints."""
    head = f"link             {link_gbps:g} Gbit/s, one-way latency {latency * 1e3:g} ms, {world} workers; " + (
        f"GPU step {compute_s * 1e3:.1f} ms (compute)" if compute_s else "no GPU step time (pass --step-ms)"
    )
    lines = [
        head,
        f"{'mode':<14} {'MB/step/worker':>15} {'link ms':>9}"
        + (f" {'slowdown':>9} {'Gbit/s for <=10%':>17} {'overlapped':>11}" if compute_s else ""),
    ]
    for r in rows:
        line = f"{r['mode']:<14} {r['bytes_per_step'] / 1e6:>15.2f} {r['comm_s'] * 1e3:>9.2f}"
        if compute_s:
            line += f" {r['slowdown']:>9.1%} {r['needed_gbps']:>17.1f} {r['needed_gbps_overlapped']:>11.1f}"
        lines.append(line)
    return "\n".join(lines)


def link_section(
    cfg, report: dict, link_gbps: float, world: int, latency_ms: float = 0.0, step_ms: float | None = None
) -> tuple[dict, str]:
    """``python -m dbgen.inspect --link-gbps``: (JSON part, text) for config ``cfg`` whose size report is
    ``report``; the GPU step time is ``step_ms`` or the model's target at the config's batch size."""
    if link_gbps <= 0 or world < 1 or latency_ms < 0 or (step_ms is not None and step_ms <= 0):
        raise ValueError("--link-gbps and --step-ms must be > 0, --workers >= 1, --link-latency-ms >= 0")
    compute_s = step_ms / 1e3 if step_ms else target_step_s(cfg.model.name, cfg.train.batch_size)
    rows = link_report(report["params"], report["binary_params"], world, link_gbps, compute_s, latency_ms / 1e3)
    part = {"link_gbps": link_gbps, "workers": world, "latency_ms": latency_ms, "step_s": compute_s, "modes": rows}
    return part, format_link_report(rows, world, link_gbps, compute_s, latency_ms / 1e3)
