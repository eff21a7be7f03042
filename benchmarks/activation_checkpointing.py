"""Peak memory and time of one training step with and without ``train.activation_checkpointing`` on the CPU.

    python benchmarks/activation_checkpointing.py [--config C --batch B ...] [--json-out out.json]

Each (config, checkpointing) case runs in a fresh process (one torch thread): the model is built and
data-initialized on 16 random rows, then one step (forward, backward, Adam) runs at ``--batch`` rows. Peak
memory is the process's resident high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` after the
model is built) minus its resident size at that moment: the step's own memory (activations, materialized weights,
gradients, Adam state), not Python's and torch's. glibc's mmap threshold is pinned so large tensors are returned
to the system when freed. Defaults: the paper RVAE at batch 128 and the paper Flow++ at batch 64.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = [("configs/rvae_cifar10_binary.yaml", 128), ("configs/flowpp_cifar10_binary.yaml", 64)]


def one_case(config: str, batch: int, checkpointing: bool) -> dict:
    import torch

    from dbgen.config import load_config
    from dbgen.memory import proc_status_bytes, reset_peak_rss
    from dbgen.models import build, set_activation_checkpointing
    from dbgen.nn import data_dependent_init

    torch.set_num_threads(1)
    cfg = load_config(ROOT / config)
    torch.manual_seed(0)
    s = cfg.model.image_size
    model = build(cfg.model)
    data_dependent_init(model, torch.randint(0, 256, (16, 3, s, s), dtype=torch.uint8))
    set_activation_checkpointing(model, checkpointing)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8)
    base = reset_peak_rss()
    start = time.perf_counter()
    loss = model(x)
    forward_s = time.perf_counter() - start
    loss.backward()
    optimizer.step()
    step_s = time.perf_counter() - start
    return {
        "config": config,
        "batch": batch,
        "checkpointing": checkpointing,
        "loss": loss.item(),
        "step_s": round(step_s, 2),
        "forward_s": round(forward_s, 2),
        "peak_bytes": proc_status_bytes("VmHWM") - base,
        "process_peak_bytes": proc_status_bytes("VmHWM"),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", action="append", default=None)
    p.add_argument("--batch", action="append", type=int, default=None)
    p.add_argument("--json-out", default=None)
    p.add_argument("--one", nargs=3, metavar=("CONFIG", "BATCH", "CKPT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one_case(args.one[0], int(args.one[1]), args.one[2] == "1")))
        return 0
    cases = list(zip(args.config, args.batch, strict=True)) if args.config else DEFAULT
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    rows = []
    for config, batch in cases:
        for ckpt in (False, True):
            out = subprocess.run(
                [sys.executable, __file__, "--one", config, str(batch), "1" if ckpt else "0"],
                capture_output=True,
                text=True,
                check=True,
                env=env,
                cwd=ROOT,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(
                f"{config:40s} batch {batch:4d} ckpt {str(ckpt):5s} peak {r['peak_bytes'] / 2**20:9.1f} MiB "
                f"step {r['step_s']:7.2f} s (forward {r['forward_s']:.2f} s) loss {r['loss']:.4f}",
                flush=True,
            )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
