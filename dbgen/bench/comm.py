"""``python -m dbgen.bench comm --config C --workers 2 [--steps S] [--json]``: bytes on the wire per mode.

Over a rate-limited link (benchmarks/netns_cluster.sh: two network namespaces, one Ray node and one worker in
each): ``--links 1gbit/0,100mbit/0 --set-link "bash benchmarks/netns_cluster.sh set DIR"`` times every mode at
each link setting in turn, one TorchTrainer per mode (rank 0 runs ``SET_LINK RATE LATENCY`` between settings).

Runs the same model and data under each communication mode in real Ray Train workers (one TorchTrainer per
mode, each worker a DeepSpeed engine, gloo on CPU / NCCL on GPU):

==============  ===========================================================================================
dp              plain data parallelism (ZeRO 0): one all-reduce of every gradient
zero1           DeepSpeed ZeRO-1: the same all-reduce, then an all-gather of the updated parameter partitions
packed          binary latents sharded: binary gradients reduce-scattered, signs all-gathered 8 per byte
packed_onebit   packed, with the binary gradients sent as 1-bit messages (after ``--warmup`` steps)
==============  ===========================================================================================

Per mode: ``weight_bytes_per_step``, ``grad_bytes_per_step``, ``other_bytes_per_step``, ``total_bytes_per_step``
(bytes one worker sends per step, counted by :mod:`dbgen.sync.accounting` for the algorithm each collective runs;
rank 0's, averaged over the timed steps), ``step_s`` (mean wall time of a timed step on rank 0), ``comm_s`` (of
which inside ``torch.distributed`` calls: sending, and waiting for the peers; the modes run the serial schedule,
``comm.overlap=false``, in which every collective of dbgen and of DeepSpeed's ZeRO 0/1 paths returns when done),
``compute_s`` (the rest), ``link_tx_bytes_per_step`` (what rank 0's network namespace sent on its interfaces other
than ``lo``, from ``/sys/class/net/*/statistics/tx_bytes``: TCP/IP headers, acknowledgements and Ray's own traffic
included; ``link_idle_tx_bytes_per_s``: the same while rank 0 idles after the steps, Ray's share; meaningful only
where each worker has a namespace of its own), ``final_loss`` (the last timed step's) and the model's
``params``/``binary_params``; with ``--links``, one row per mode and link setting. The first ``--warmup`` steps of
every mode are not measured (the first also carries the initial broadcast; 1-bit modes send uncompressed during
them). Data-dependent init uses ``--init-rows`` rows (the paper config's 1,024 take minutes on a CPU); it does not
change bytes.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import shlex
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from ..config import load_config
from ..data import resolve_split
from ..nn import size_report
from ..ray_local import init_ray
from ..step import resolve_stats
from ..trainer import Trainer

log = logging.getLogger(__name__)

# The serial schedule (comm.overlap=false): every collective returns when it is done, so the time inside them
# is the step's communication; `python -m dbgen.bench overlap` measures the overlapped schedule.
MODES = {
    "dp": ["comm.binary_weights=dp", "comm.binary_grads=none", "scale.zero_stage=0", "comm.overlap=false"],
    "zero1": ["comm.binary_weights=dp", "comm.binary_grads=none", "scale.zero_stage=1", "comm.overlap=false"],
    "packed": ["comm.binary_weights=packed", "comm.binary_grads=none", "scale.zero_stage=0", "comm.overlap=false"],
    "packed_onebit": [
        "comm.binary_weights=packed",
        "comm.binary_grads=onebit",
        "scale.zero_stage=0",
        "comm.overlap=false",
    ],
}


def add_arguments(p):
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("--workers", type=int, default=2, help="data-parallel workers (Ray Train)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (also the 1-bit warm-up)")
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="rows per worker per step (default: the config's train.batch_size / workers)",
    )
    p.add_argument("--init-rows", type=int, default=8, help="rows for data-dependent init")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL)")
    p.add_argument(
        "--links",
        default=None,
        help="comma-separated RATE/LATENCY link settings (e.g. "
        "10gbit/0,1gbit/0); each mode runs --steps timed steps at each, in this order (needs --set-link)",
    )
    p.add_argument(
        "--set-link",
        default=None,
        help="command that sets the link; rank 0 runs it with RATE LATENCY "
        "appended before each setting (e.g. 'bash benchmarks/netns_cluster.sh set DIR')",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides (e.g. data.train=...)")


# torch.distributed entry points timed in the bench workers (every collective dbgen or DeepSpeed issues)
TIMED_OPS = (
    "all_reduce",
    "all_reduce_coalesced",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_coalesced",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "send",
    "recv",
    "barrier",
    "all_gather_object",
    "broadcast_object_list",
)


class CollectiveClock:
    """Seconds this process spends inside ``torch.distributed`` collectives: wraps :data:`TIMED_OPS`. Made
    before the trainer (and so before DeepSpeed's engine, which keeps references to some of them, and before
    :func:`dbgen.sync.accounting.install`, whose counting wrappers then sit outside)."""

    def __init__(self):
        import torch.distributed as dist

        self.seconds, self.calls = 0.0, 0
        for name in TIMED_OPS:
            fn = getattr(dist, name, None)
            if fn is not None:
                setattr(dist, name, self._timed(fn))

    def _timed(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        return timed

    def take(self) -> tuple[float, int]:
        """(seconds, calls) since the last take."""
        out = (self.seconds, self.calls)
        self.seconds, self.calls = 0.0, 0
        return out


def link_tx_bytes() -> int:
    """Bytes sent so far on this network namespace's interfaces other than ``lo``."""
    return sum(
        int((d / "statistics" / "tx_bytes").read_text()) for d in Path("/sys/class/net").iterdir() if d.name != "lo"
    )


def parse_links(text: str | None) -> list[tuple[str, str]]:
    """``"1gbit/0,100mbit/1ms"`` -> ``[("1gbit", "0"), ("100mbit", "1ms")]``."""
    if not text:
        return []
    links = [tuple(x.strip().split("/")) for x in text.split(",") if x.strip()]
    bad = [x for x in links if len(x) != 2 or not all(x)]
    if bad:
        raise SystemExit(f"--links: expected RATE/LATENCY[,RATE/LATENCY...] (e.g. 1gbit/0), got {text!r}")
    return links


def _bench_loop(config: dict) -> None:
    """Ray Train worker: ``warmup`` untimed steps, then ``steps`` timed steps per link setting (rank 0 sets the
    link first); rank 0 writes its per-step numbers."""
    import ray.train  # Ray here and below: importing it takes seconds, and --help needs none of it
    import ray.train.torch
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    cfg = load_config(config["cfg"])
    collectives = CollectiveClock()  # before DeepSpeed's engine, which keeps references to some collectives
    tr = Trainer(
        cfg,
        config["run_dir"],
        config["train_dir"],
        None,
        rank=rank,
        world_size=world,
        device=ray.train.torch.get_device(),
    )
    data = iter(tr.loader)
    links = config["links"] or [None]

    def set_link(link):
        if link is not None:
            dist.barrier()  # nobody is mid-step while the link changes
            if rank == 0:
                subprocess.run([*shlex.split(config["set_link"]), *link], check=True, timeout=60)
            dist.barrier()
        collectives.take()  # those barriers are no step's

    def timed_step():
        tx = link_tx_bytes()
        stats = tr.train_step(data)
        stats["t_collectives"], stats["collectives"] = collectives.take()  # on CUDA: launch time only
        stats["link_tx"] = link_tx_bytes() - tx
        return stats

    set_link(links[0])
    resolve_stats([tr.train_step(data) for _ in range(config["warmup"])])
    collectives.take()  # the warm-up's
    rows = []
    for i, link in enumerate(links):
        if i:
            set_link(link)
        steps = resolve_stats([timed_step() for _ in range(config["steps"])])
        # Ray's own traffic out of rank 0's namespace while training runs (controller, GCS): measured with rank 0
        # idle for as long as the timed steps took (at most 5 s) while the others wait in a barrier (no traffic)
        idle_s, idle_rate = min(sum(s["t_step"] for s in steps), 5.0), 0.0
        if rank == 0:
            tx = link_tx_bytes()
            time.sleep(idle_s)
            idle_rate = (link_tx_bytes() - tx) / idle_s
        dist.barrier()
        collectives.take()
        rows.append(
            {
                "link": link,
                "bytes": [s["comm_bytes"] for s in steps],
                "step_s": [s["t_step"] for s in steps],
                "collective_s": [s["t_collectives"] for s in steps],
                "collectives": [s["collectives"] for s in steps],
                "link_tx": [s["link_tx"] for s in steps],
                "link_idle_tx_per_s": idle_rate,
                "loss": [s["loss"] for s in steps],
            }
        )
    if rank == 0:
        sizes = size_report(tr.model)
        with open(config["out"], "w") as f:
            json.dump({"params": sizes["params"], "binary_params": sizes["binary_params"], "rows": rows}, f)


def run_mode(name: str, cfg, args, train_dir: str, work: str) -> list[dict]:
    """One TorchTrainer for mode ``name``: a result row per link setting (one row without ``--links``)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = os.path.join(work, f"{name}.json")
    resources = {"CPU": cfg.scale.cpus_per_worker, **({"GPU": 1} if args.gpu else {})}
    TorchTrainer(
        _bench_loop,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "run_dir": os.path.join(work, name),
            "out": out,
            "train_dir": train_dir,
            "warmup": args.warmup,
            "steps": args.steps,
            "links": parse_links(args.links),
            "set_link": args.set_link,
        },
        scaling_config=ScalingConfig(
            num_workers=args.workers,
            use_gpu=args.gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.scale.placement_strategy,
        ),
        run_config=RunConfig(name=f"bench-comm-{name}", storage_path=os.path.join(work, "ray")),
    ).fit()
    with open(out) as f:
        r = json.load(f)
    rows = []
    for row in r["rows"]:
        n = len(row["bytes"])
        per = {k: sum(b[k] for b in row["bytes"]) / n for k in ("grad", "weight", "other")}
        step_s, comm_s = sum(row["step_s"]) / n, sum(row["collective_s"]) / n
        rows.append(
            {
                "mode": name,
                **({"link_rate": row["link"][0], "link_latency": row["link"][1]} if row["link"] else {}),
                "weight_bytes_per_step": per["weight"],
                "grad_bytes_per_step": per["grad"],
                "other_bytes_per_step": per["other"],
                "total_bytes_per_step": sum(per.values()),
                "link_tx_bytes_per_step": sum(row["link_tx"]) / n,
                "link_idle_tx_bytes_per_s": row["link_idle_tx_per_s"],
                "step_s": step_s,
                "comm_s": comm_s,
                "compute_s": step_s - comm_s,
                "collectives_per_step": sum(row["collectives"]) / n,
                "params": r["params"],
                "binary_params": r["binary_params"],
                "final_loss": row["loss"][-1],
            }
        )
    return rows


def main(args) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or args.workers < 1 or args.steps < 1 or args.warmup < 1:
        raise SystemExit(f"--modes: unknown {unknown}" if unknown else "--workers, --steps, --warmup must be >= 1")
    if bool(parse_links(args.links)) != bool(args.set_link):
        raise SystemExit("--links and --set-link go together (the command that sets each RATE/LATENCY)")
    base = load_config(args.config, args.overrides)
    batch = args.batch or base.train.batch_size // args.workers
    train_dir = str(resolve_split(base.data.train, "train"))
    # RAY_ADDRESS (a cluster) if set, else a local Ray on loopback; worker logs stay off stdout
    init_ray(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    results = []
    with tempfile.TemporaryDirectory(prefix="dbgen-bench-comm-") as work:
        for name in modes:
            cfg = load_config(
                base,
                [
                    *MODES[name],
                    f"scale.num_workers={args.workers}",
                    f"train.batch_size={batch * args.workers}",
                    "train.grad_accum=1",
                    f"train.init_batch_size={args.init_rows}",
                    f"comm.onebit_warmup_steps={args.warmup}",
                    f"scale.use_gpu={args.gpu}",
                ],
            )
            start = time.perf_counter()
            results += run_mode(name, cfg, args, train_dir, work)
            log.info("%s: %s (%.0f s)", name, results[-1], time.perf_counter() - start)
    zero1 = {r.get("link_rate"): r for r in results if r["mode"] == "zero1"}
    for r in results:
        if r.get("link_rate") in zero1:
            r["total_vs_zero1"] = r["total_bytes_per_step"] / zero1[r.get("link_rate")]["total_bytes_per_step"]
    summary = {
        "config": str(args.config),
        "workers": args.workers,
        "batch_per_worker": batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs{', GPU' if args.gpu else ''}",
        "date": time.strftime("%Y-%m-%d"),
        "overrides": list(args.overrides),
        "links": args.links,
        "modes": results,
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    print(
        f"{args.config}, {args.workers} workers, batch {batch}/worker, {results[0]['params']:,} params "
        f"({results[0]['binary_params']:,} binary)"
    )
    print(
        f"{'mode':<14} {'link':>12} {'weight B/step':>14} {'grad B/step':>14} {'total B/step':>14} "
        f"{'vs zero1':>9} {'link tx B':>14} {'step s':>8} {'comm s':>8} {'loss':>8}"
    )
    for r in results:
        ratio = f"{r['total_vs_zero1']:.3f}" if "total_vs_zero1" in r else "-"
        link = f"{r['link_rate']}/{r['link_latency']}" if "link_rate" in r else "-"
        print(
            f"{r['mode']:<14} {link:>12} {r['weight_bytes_per_step']:>14,.0f} {r['grad_bytes_per_step']:>14,.0f} "
            f"{r['total_bytes_per_step']:>14,.0f} {ratio:>9} {r['link_tx_bytes_per_step']:>14,.0f} "
            f"{r['step_s']:>8.2f} {r['comm_s']:>8.2f} {r['final_loss']:>8.4f}"
        )
    return 0
