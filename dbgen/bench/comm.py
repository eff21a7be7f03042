"""``python -m dbgen.bench comm --config C --workers 2 [--steps S] [--json]``: bytes on the wire per mode.

Runs the same model and data under each communication mode in real Ray Train workers (one TorchTrainer per
mode, each worker a DeepSpeed engine, gloo on CPU / NCCL on GPU):

==============  ===========================================================================================
dp              plain data parallelism (ZeRO 0): one all-reduce of every gradient
zero1           DeepSpeed ZeRO-1: the same all-reduce, then an all-gather of the updated parameter partitions
packed          binary latents sharded: binary gradients reduce-scattered, signs all-gathered 8 per byte
packed_onebit   packed, with the binary gradients sent as 1-bit messages (after ``--warmup`` steps)
==============  ===========================================================================================

Per mode: ``weight_bytes_per_step``, ``grad_bytes_per_step``, ``other_bytes_per_step``,
``total_bytes_per_step`` (bytes one worker sends per step, counted by :mod:`dbgen.sync.accounting` for the
algorithm each collective runs; rank 0's, averaged over the timed steps), ``step_s`` (mean wall time of a timed
step on rank 0) and the model's ``params``/``binary_params``. The first ``--warmup`` steps of every mode are not
measured (the first also carries the initial broadcast; 1-bit modes send uncompressed during them). Data-dependent
init uses ``--init-rows`` rows (the paper config's 1,024 take minutes on a CPU); it does not change bytes.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time

import torch

from ..config import load_config
from ..data import resolve_split
from ..nn import size_report
from ..ray_local import init_ray
from ..step import resolve_stats
from ..trainer import Trainer

log = logging.getLogger(__name__)

MODES = {
    "dp": ["comm.binary_weights=dp", "comm.binary_grads=none", "scale.zero_stage=0"],
    "zero1": ["comm.binary_weights=dp", "comm.binary_grads=none", "scale.zero_stage=1"],
    "packed": ["comm.binary_weights=packed", "comm.binary_grads=none", "scale.zero_stage=0"],
    "packed_onebit": ["comm.binary_weights=packed", "comm.binary_grads=onebit", "scale.zero_stage=0"],
}


def add_arguments(p):
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("--workers", type=int, default=2, help="data-parallel workers (Ray Train)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (also the 1-bit warm-up)")
    p.add_argument("--batch", type=int, default=None, help="rows per worker per step (default: the config's "
                   "train.batch_size / workers)")
    p.add_argument("--init-rows", type=int, default=8, help="rows for data-dependent init")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides (e.g. data.train=...)")


def _bench_loop(config: dict) -> None:
    """Ray Train worker: ``warmup`` + ``steps`` training steps; rank 0 writes its per-step numbers."""
    import ray.train  # Ray here and below: importing it takes seconds, and --help needs none of it
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    cfg = load_config(config["cfg"])
    tr = Trainer(cfg, config["run_dir"], config["train_dir"], None, rank=rank, world_size=world,
                 device=ray.train.torch.get_device(), persist=lambda *a: None)
    data = iter(tr.loader)
    steps = resolve_stats([tr.train_step(data) for _ in range(config["warmup"] + config["steps"])])
    steps = steps[config["warmup"]:]
    if rank == 0:
        sizes = size_report(tr.model)
        out = {"params": sizes["params"], "binary_params": sizes["binary_params"],
               "bytes": [s["comm_bytes"] for s in steps], "step_s": [s["t_step"] for s in steps],
               "loss": [s["loss"] for s in steps]}
        with open(config["out"], "w") as f:
            json.dump(out, f)


def run_mode(name: str, cfg, args, train_dir: str, work: str) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = os.path.join(work, f"{name}.json")
    resources = {"CPU": cfg.scale.cpus_per_worker, **({"GPU": 1} if args.gpu else {})}
    TorchTrainer(_bench_loop,
                 train_loop_config={"cfg": cfg.to_dict(), "run_dir": os.path.join(work, name), "out": out,
                                    "train_dir": train_dir, "warmup": args.warmup, "steps": args.steps},
                 scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.gpu,
                                              resources_per_worker=resources),
                 run_config=RunConfig(name=f"bench-comm-{name}", storage_path=os.path.join(work, "ray"))).fit()
    with open(out) as f:
        r = json.load(f)
    n = len(r["bytes"])
    per = {k: sum(b[k] for b in r["bytes"]) / n for k in ("grad", "weight", "other")}
    return {"mode": name, "weight_bytes_per_step": per["weight"], "grad_bytes_per_step": per["grad"],
            "other_bytes_per_step": per["other"], "total_bytes_per_step": sum(per.values()),
            "step_s": sum(r["step_s"]) / n, "params": r["params"], "binary_params": r["binary_params"],
            "final_loss": r["loss"][-1]}


def main(args) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or args.workers < 1 or args.steps < 1 or args.warmup < 1:
        raise SystemExit(f"--modes: unknown {unknown}" if unknown else "--workers, --steps, --warmup must be >= 1")
    base = load_config(args.config, args.overrides)
    batch = args.batch or base.train.batch_size // args.workers
    train_dir = str(resolve_split(base.data.train, "train"))
    # RAY_ADDRESS (a cluster) if set, else a local Ray on loopback; worker logs stay off stdout
    init_ray(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    results = []
    with tempfile.TemporaryDirectory(prefix="dbgen-bench-comm-") as work:
        for name in modes:
            cfg = load_config(base, [*MODES[name], f"scale.num_workers={args.workers}",
                                     f"train.batch_size={batch * args.workers}", "train.grad_accum=1",
                                     f"train.init_batch_size={args.init_rows}",
                                     f"comm.onebit_warmup_steps={args.warmup}", f"scale.use_gpu={args.gpu}"])
            start = time.perf_counter()
            results.append(run_mode(name, cfg, args, train_dir, work))
            log.info("%s: %s (%.0f s)", name, results[-1], time.perf_counter() - start)
    by = {r["mode"]: r for r in results}
    if "zero1" in by:
        for r in results:
            r["total_vs_zero1"] = r["total_bytes_per_step"] / by["zero1"]["total_bytes_per_step"]
    summary = {"config": str(args.config), "workers": args.workers, "batch_per_worker": batch,
               "steps": args.steps, "warmup": args.warmup, "machine": f"{platform.machine()} "
               f"{os.cpu_count()} CPUs{', GPU' if args.gpu else ''}", "date": time.strftime("%Y-%m-%d"),
               "overrides": list(args.overrides), "modes": results}
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{args.config}, {args.workers} workers, batch {batch}/worker, {results[0]['params']:,} params "
          f"({results[0]['binary_params']:,} binary)")
    print(f"{'mode':<14} {'weight B/step':>14} {'grad B/step':>14} {'total B/step':>14} {'vs zero1':>9} "
          f"{'step s':>8}")
    for r in results:
        ratio = f"{r['total_vs_zero1']:.3f}" if "total_vs_zero1" in r else "-"
        print(f"{r['mode']:<14} {r['weight_bytes_per_step']:>14,.0f} {r['grad_bytes_per_step']:>14,.0f} "
              f"{r['total_bytes_per_step']:>14,.0f} {ratio:>9} {r['step_s']:>8.2f}")
    return 0
