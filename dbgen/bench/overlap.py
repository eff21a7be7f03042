"""``python -m dbgen.bench overlap --config C [--rate auto|MBIT] [--set-link CMD]``: what overlapping the gradient
exchange with backward (``comm.overlap``) buys, per communication mode, against plain PyTorch DDP.

One TorchTrainer (real Ray Train workers, DeepSpeed engines, gloo) measures every mode in turn, each worker
running, per mode, on the same model, data and per-worker batch:

1. ``compute_s``: the step with no communication at all (:class:`dbgen.sync.LocalSync`: forward, backward,
   Adam on this worker's batch), every worker at once so that they share the machine as in the other phases;
2. the link is set (rank 0 runs ``SET_LINK RATE LATENCY``; everything was built on a :data:`FAST_LINK_MBIT`
   link): ``--rate auto`` picks, per mode, the rate at which the mode's bytes per step
   (:func:`dbgen.linkmodel.step_bytes`) take as long as ``compute_s``, so serial communication costs about
   one compute step and overlap has the most to hide;
3. ``serial_s``: ``comm.overlap=false`` (backward, then every collective);
4. ``overlapped_s``: ``comm.overlap=true``, ``comm.bucket_mb`` buckets started during backward (``zero1``
   keeps DeepSpeed's own schedule, so for it this is a second serial run).

``ddp`` is the peer every user knows: ``torch.nn.parallel.DistributedDataParallel`` (gloo,
``bucket_cap_mb=25``) around the same model, with the same optimizer (:func:`dbgen.step.build_optimizer`), at
the ``dp`` rate; it only overlaps, so it has no ``serial_s``, and its ``bytes_per_step`` is the formula of one
ring all-reduce of every gradient (DDP's reducer calls gloo directly, past dbgen's byte counter).

Per row: ``mode``, ``rate_mbit`` (null without ``--set-link``), ``compute_s``, ``serial_s``, ``overlapped_s``
(median step times of rank 0 over ``--steps`` timed steps, data loading excluded), ``comm_s`` (exposed
communication: ``overlapped_s - compute_s``), ``bytes_per_step`` (what one worker sends), ``final_loss`` (the
last overlapped step's). Printed as a table; ``--json-out F`` writes ``{"link": {"rate_mbit", "latency_ms"},
"rows": [...], ...}``. Without ``--set-link`` the workers talk over whatever joins them (loopback on one
machine): a smoke run. The rate-limited two-node cluster is ``benchmarks/netns_cluster.sh`` (docs/communication.md).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from ..config import load_config
from ..data import resolve_split
from ..linkmodel import step_bytes
from ..nn import size_report
from ..ray_local import init_ray

log = logging.getLogger(__name__)

FAST_LINK_MBIT = 10_000.0  # the link while engines are built (their initial broadcasts) and compute is timed

MODES = {
    "dp": ["comm.binary_weights=dp", "comm.binary_grads=none", "scale.zero_stage=0"],
    # ZeRO 1 keeps DeepSpeed's schedule (comm.overlap applies at ZeRO 0): its overlapped row is a second serial run
    "zero1": ["comm.binary_weights=dp", "comm.binary_grads=none", "scale.zero_stage=1"],
    "packed": ["comm.binary_weights=packed", "comm.binary_grads=none", "scale.zero_stage=0"],
    "packed_onebit": ["comm.binary_weights=packed", "comm.binary_grads=onebit", "scale.zero_stage=0"],
    "ddp": ["comm.binary_weights=dp", "comm.binary_grads=none", "scale.zero_stage=0"],  # DDP's model; dp's config
}


def add_arguments(p):
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("--workers", type=int, default=2, help="data-parallel workers (Ray Train)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode and schedule (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (also the 1-bit warm-up)")
    p.add_argument("--batch", type=int, default=None, help="rows per worker per step (default: the config's)")
    p.add_argument("--init-rows", type=int, default=8, help="rows for data-dependent init")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    p.add_argument(
        "--rate",
        default="auto",
        help="link rate in Mbit/s for every mode, or 'auto': per mode, the rate at which its bytes per step "
        "take one compute step (needs --set-link)",
    )
    p.add_argument("--latency-ms", type=float, default=0.0, help="one-way link latency (needs --set-link)")
    p.add_argument(
        "--set-link",
        default=None,
        help="command that sets the link; rank 0 runs it with RATE LATENCY appended "
        "(e.g. 'bash benchmarks/netns_cluster.sh set DIR'); without it the link is left as it is",
    )
    p.add_argument("--json-out", default=None, help="also write the results as JSON to this file")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")


def _median_step_s(steps: list[dict]) -> float:
    return statistics.median(s["t_step"] - s["t_data_wait"] for s in steps)


def _compute_only(cfg, batches, init_x, device) -> float:
    """Median seconds of a step with no communication (LocalSync) on ``batches`` (one list per step)."""
    from ..step import PhaseClock, lr_at, resolve_stats, run_step, single_device_setup

    torch.manual_seed(cfg.train.seed)
    model, sync, ema = single_device_setup(cfg, init_x, device)
    times = []
    for i, step_batches in enumerate(batches):
        clock = PhaseClock(device)
        out = run_step(model, sync, step_batches, cfg.train, lr_at(cfg, i), None, clock, model, ema)
        (st,) = resolve_stats([{**out, "clock": clock}])
        times.append(st["t_step"])
    return statistics.median(times)


def _ddp_setup(cfg, init_x, device):
    """Plain DDP (gloo, 25 MB buckets) around the same model (same seed and init) with the same optimizer."""
    from torch.nn.parallel import DistributedDataParallel

    from ..models import build
    from ..nn import data_dependent_init
    from ..step import build_optimizer

    torch.manual_seed(cfg.train.seed)
    model = build(cfg.model).to(device)
    data_dependent_init(model, init_x.to(device))
    return DistributedDataParallel(model, bucket_cap_mb=25), build_optimizer(cfg, model)


def _ddp_steps(ddp, optimizer, batches) -> tuple[list[float], float]:
    """DDP steps on ``batches`` (one list of micro-batches per step): step seconds and the last loss."""
    times, loss = [], 0.0
    for step_batches in batches:
        start = time.perf_counter()
        total = 0.0
        for x in step_batches:
            loss = ddp(x) / len(step_batches)
            loss.backward()
            total += float(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times, total


def _overlap_loop(config: dict) -> None:
    """Ray Train worker: every mode in turn (one worker group for all: Ray's start-up once); rank 0 writes the
    rows."""
    import gc

    import ray.train

    rows = []
    for mode in config["modes"]:
        rows.append(_measure_mode(config, mode))
        gc.collect()  # the mode's engines and models, before the next mode builds its own
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["out"]).write_text(json.dumps(rows))


def _measure_mode(config: dict, mode: str) -> dict:
    """One mode: everything built on a fast link (the engines' initial broadcasts), the compute-only steps, the
    mode's link set, then the serial and the overlapped schedule (or DDP): its row."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from ..step import resolve_stats
    from ..trainer import Trainer

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device, warmup = ray.train.torch.get_device(), config["warmup"]
    n_steps = warmup + config["steps"]

    def set_link(rate_mbit: float | None) -> None:
        if config["set_link"] and rate_mbit is not None:
            dist.barrier()
            if rank == 0:
                latency = f"{config['latency_ms']}ms" if config["latency_ms"] else "0"
                link = [f"{max(1, round(rate_mbit * 1000))}kbit", latency]
                subprocess.run([*shlex.split(config["set_link"]), *link], check=True, timeout=60)
            dist.barrier()

    def trainer(overlap: bool) -> Trainer:
        cfg = load_config(config["cfgs"][mode], [f"comm.overlap={str(overlap).lower()}"])
        run_dir = Path(config["run_dir"]) / mode / ("overlap" if overlap else "serial")
        run_dir.mkdir(parents=True, exist_ok=True)
        return Trainer(cfg, run_dir, config["train_dir"], None, rank=rank, world_size=world, device=device)

    set_link(FAST_LINK_MBIT)
    serial = trainer(False)  # also the source of the batches every phase runs on
    cfg, ga = serial.cfg, serial.cfg.train.grad_accum
    data = iter(serial.loader)
    batches = [[next(data).to(device) for _ in range(ga)] for _ in range(n_steps)]
    init_x = batches[0][0]
    if mode == "ddp":
        ddp, ddp_optimizer = _ddp_setup(cfg, init_x, device)
    else:
        over = trainer(True)
    compute = torch.tensor(_compute_only(cfg, batches, init_x, device))
    dist.all_reduce(compute, op=dist.ReduceOp.MAX)  # one compute time (and rate) for every rank
    sizes = size_report(serial.model)
    nbytes = sum(step_bytes("dp" if mode == "ddp" else mode, sizes["params"], sizes["binary_params"], world).values())
    rate = 8 * nbytes / float(compute) / 1e6 if config["rate"] == "auto" else float(config["rate"])
    set_link(rate)

    flat = [x for step in batches for x in step]  # train_step reads grad_accum micro-batches per step

    def run(tr) -> list[dict]:
        """``n_steps`` steps of ``tr`` on the batches; the timed ones."""
        return resolve_stats([tr.train_step(iter(flat[i * ga : (i + 1) * ga])) for i in range(n_steps)])[warmup:]

    row: dict = {"mode": mode, "rate_mbit": rate if config["set_link"] else None, "compute_s": float(compute)}
    if mode == "ddp":
        times, loss = _ddp_steps(ddp, ddp_optimizer, batches)
        row.update(overlapped_s=statistics.median(times[warmup:]), bytes_per_step=nbytes, final_loss=loss)
    else:
        timed_serial, timed_over = run(serial), run(over)
        row.update(
            serial_s=_median_step_s(timed_serial),
            overlapped_s=_median_step_s(timed_over),
            bytes_per_step=sum(timed_over[-1]["comm_bytes"].values()),
            final_loss=timed_over[-1]["loss"],
        )
    row["comm_s"] = row["overlapped_s"] - row["compute_s"]
    return row


def run_modes(cfgs: dict, args, train_dir: str, work: str) -> list[dict]:
    """One TorchTrainer measuring every mode of ``cfgs`` (mode -> its config): a row per mode."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out, first = os.path.join(work, "rows.json"), next(iter(cfgs.values()))
    TorchTrainer(
        _overlap_loop,
        train_loop_config={
            "cfgs": {name: cfg.to_dict() for name, cfg in cfgs.items()},
            "modes": list(cfgs),
            "run_dir": work,
            "out": out,
            "train_dir": train_dir,
            "warmup": args.warmup,
            "steps": args.steps,
            "rate": args.rate,
            "latency_ms": args.latency_ms,
            "set_link": args.set_link,
        },
        scaling_config=ScalingConfig(
            num_workers=args.workers,
            resources_per_worker={"CPU": first.scale.cpus_per_worker},
            placement_strategy=first.scale.placement_strategy,
        ),
        run_config=RunConfig(name="bench-overlap", storage_path=os.path.join(work, "ray")),
    ).fit()
    return json.loads(Path(out).read_text())


def main(args) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or args.workers < 2 or args.steps < 1 or args.warmup < 1:
        raise SystemExit(f"--modes: unknown {unknown}" if unknown else "--workers >= 2, --steps and --warmup >= 1")
    if args.rate != "auto":
        try:
            args.rate = float(args.rate)
        except ValueError:
            raise SystemExit(f"--rate: expected 'auto' or Mbit/s, got {args.rate!r}") from None
    base = load_config(args.config, args.overrides)
    batch = args.batch or base.train.batch_size // args.workers
    train_dir = str(resolve_split(base.data.train, "train"))
    init_ray(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    common = [
        f"scale.num_workers={args.workers}",
        f"train.batch_size={batch * args.workers}",
        "train.grad_accum=1",
        f"train.init_batch_size={args.init_rows}",
        f"comm.onebit_warmup_steps={args.warmup}",
    ]
    cfgs = {name: load_config(base, [*MODES[name], *common]) for name in modes}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dbgen-bench-overlap-") as work:
        rows = run_modes(cfgs, args, train_dir, work)
    log.info("%d modes in %.0f s", len(rows), time.perf_counter() - start)
    summary = {
        "config": str(args.config),
        "workers": args.workers,
        "batch_per_worker": batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d"),
        "link": {"rate_mbit": args.rate if args.set_link else None, "latency_ms": args.latency_ms},
        "rows": rows,
    }
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=1))
    print(f"{args.config}, {args.workers} workers, batch {batch}/worker, link {summary['link']}")
    print(
        f"{'mode':<14} {'Mbit/s':>8} {'compute s':>10} {'serial s':>9} {'overlap s':>10} {'exposed s':>10} "
        f"{'ovl/serial':>10} {'bytes/step':>12} {'loss':>8}"
    )
    for r in rows:
        rate = "-" if r["rate_mbit"] is None else f"{r['rate_mbit']:.1f}"
        serial = "-" if r.get("serial_s") is None else f"{r['serial_s']:.3f}"
        ratio = "-" if r.get("serial_s") is None else f"{r['overlapped_s'] / r['serial_s']:.2f}"
        print(
            f"{r['mode']:<14} {rate:>8} {r['compute_s']:>10.3f} {serial:>9} {r['overlapped_s']:>10.3f} "
            f"{r['comm_s']:>10.3f} {ratio:>10} {r['bytes_per_step']:>12,.0f} {r['final_loss']:>8.4f}"
        )
    return 0
