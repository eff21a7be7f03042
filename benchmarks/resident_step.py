"""Step time of the packed mode with binary weights resident as bits against +-1 floats, 2 ranks on the CPU.

    python benchmarks/resident_step.py [--config C] [--batch 8] [--steps 5] [--rounds 3] [--json-out out.json]
                                       [k=v ...]

Two gloo ranks on 127.0.0.1 (spawned processes, one torch thread each), each the real
:class:`dbgen.trainer.Trainer` (DeepSpeed engine, packed sync, loader on ``builtin:photos32``), once with
``comm.resident_bits=false`` and once with ``true``, built side by side in the same processes. After 2 untimed
steps each, the two take turns: ``--rounds`` rounds of ``--steps`` steps each, timed per round on rank 0 (the
ranks wait for each other in every step), so both see the same machine load; each trainer keeps its own RNG
stream, so the two must train identically (the losses are compared). Reports the median step time per mode and
their ratio. Default: the paper RVAE (``configs/rvae_cifar10_binary.yaml``) at global batch 8.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
MODES = {"floats": ["comm.resident_bits=false"], "resident": ["comm.resident_bits=true"]}


def _worker(rank: int, world: int, port: int, args, out: str) -> None:
    import torch.distributed as dist

    from dbgen.config import load_config
    from dbgen.data import resolve_split
    from dbgen.step import resolve_stats
    from dbgen.trainer import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))  # fmt: skip
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    train = str(resolve_split("builtin:photos32", "train"))
    common = ["comm.binary_weights=packed", f"train.batch_size={args.batch}", "train.init_batch_size=8",
              "data.shuffle_buffer=64", f"scale.num_workers={world}", *args.overrides]  # fmt: skip
    trainers, data, rng = {}, {}, {}
    for mode, overrides in MODES.items():
        cfg = load_config(ROOT / args.config, [*common, *overrides])
        run = Path(out) / mode
        run.mkdir(parents=True, exist_ok=True)
        trainers[mode] = Trainer(cfg, run, train, None, rank=rank, world_size=world)  # seeds the RNG
        data[mode] = iter(trainers[mode].loader)
        rng[mode] = torch.get_rng_state()  # each trainer draws its latent noise from its own stream

    def steps(mode: str, n: int) -> list[dict]:
        torch.set_rng_state(rng[mode])
        out = resolve_stats([trainers[mode].train_step(data[mode]) for _ in range(n)])
        rng[mode] = torch.get_rng_state()
        return out

    times = {mode: [] for mode in MODES}
    losses = {mode: [s["loss"] for s in steps(mode, 2)] for mode in MODES}  # untimed: Adam's state, buckets
    for _ in range(args.rounds):
        for mode in MODES:
            dist.barrier()
            t0 = time.perf_counter()
            stats = steps(mode, args.steps)
            times[mode].append((time.perf_counter() - t0) / args.steps)
            losses[mode] += [s["loss"] for s in stats]
    if rank == 0:
        Path(out, "result.json").write_text(json.dumps({"times": times, "losses": losses}))
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/rvae_cifar10_binary.yaml")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json-out", default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="dbgen-resident-") as out:
        mp.start_processes(_worker, args=(2, port, args, out), nprocs=2, join=True, start_method="spawn")
        res = json.loads(Path(out, "result.json").read_text())
    median = {mode: statistics.median(t) for mode, t in res["times"].items()}
    same = res["losses"]["floats"] == res["losses"]["resident"]
    print(f"{'mode':10s} {'step ms (median)':>17s} {'rounds':>30s}")
    for mode, t in res["times"].items():
        print(f"{mode:10s} {1000 * median[mode]:>17.1f} {' '.join(f'{1000 * x:.1f}' for x in t):>30s}")
    ratio = median["resident"] / median["floats"]
    print(f"resident / floats: {ratio:.3f}; losses identical: {same}")
    if args.json_out:
        result = {"config": args.config, "batch": args.batch, "times": res["times"], "median_s": median,
                  "ratio": ratio, "losses_identical": same}  # fmt: skip
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
