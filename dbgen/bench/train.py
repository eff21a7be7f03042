"""``python -m dbgen.bench train``: throughput of one full training step of a model config.

The step is the trainer's math on one device: forward (bits/dim), backward, global-norm gradient clip, Adam,
latent clamp. Data are random uint8 images already on the device, so this measures the model and optimizer, not
the input pipeline (``dbgen.bench data`` measures that). Timing starts after ``--warmup`` steps; on CUDA the
clock is read after a synchronize.
"""

from __future__ import annotations

import json
import logging
import resource
import time

import torch

from ..config import load_config
from ..models import build
from ..nn import clamp_latents_, data_dependent_init, size_report

log = logging.getLogger(__name__)


def add_arguments(p):
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("--batch", type=int, help="batch size (default: the config's train.batch_size)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(args) -> int:
    cfg = load_config(args.config, args.overrides)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    batch = args.batch or cfg.train.batch_size
    torch.manual_seed(cfg.train.seed)
    model = build(cfg).to(device)
    m = cfg.model
    shape = (batch, m.channels, m.image_size, m.image_size)
    x = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    data_dependent_init(model, x)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optimizer.lr, betas=cfg.optimizer.betas,
                           eps=cfg.optimizer.eps)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(x)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        clamp_latents_(model)
        return loss, norm

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss, _ = step()
    loss = float(loss)  # one host sync at the end, not per step
    if device.type == "cuda":
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / args.steps
    sizes = size_report(model)
    result = {
        "config": str(args.config),
        "model": m.name,
        "binary_weights": m.binary_weights,
        "binary_activations": m.binary_activations,
        "params": sizes["params"],
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "batch": batch,
        "steps": args.steps,
        "step_s": step_s,
        "images_per_s": batch / step_s,
        "peak_mem_mb": peak_memory_mb(device),
        "final_loss_bpd": loss,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{'config':<40} {'batch':>5} {'step s':>8} {'images/s':>9} {'peak MB':>8}")
        print(f"{result['config']:<40} {batch:>5} {step_s:>8.3f} {result['images_per_s']:>9.1f} "
              f"{result['peak_mem_mb']:>8.0f}")
    return 0
