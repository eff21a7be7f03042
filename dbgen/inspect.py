"""Parameter counts and stored sizes of a config's model, or (``--memory``) the memory one worker needs.

    python -m dbgen.inspect --config configs/rvae_cifar10_binary.yaml [--json] [model.width=128 ...]
    python -m dbgen.inspect --config C --memory [--workers W] [--batch B] [--gpu-memory 80GiB [--largest-width]]
                            [--json] [k=v ...]

``--memory``: the per-worker bytes of :func:`dbgen.memory.plan_memory` in every communication mode (see
:mod:`dbgen.memory` for what each term is and how activations are measured). The counts come from
:func:`dbgen.nn.size_report` on the model :func:`dbgen.models.build` returns, so they are
what training and checkpoints see; binary layers are found by their type (:func:`dbgen.nn.binary_layers`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter

import torch

from .config import ConfigError, load_config
from .linkmodel import link_section
from .memory import MemoryPlan, largest_width, plan_memory
from .models import build
from .nn import binary_layers, size_report

__all__ = ["inspect_config", "main"]


def inspect_config(config, overrides=()) -> dict:
    """Size report of the model of ``config`` (path, dict or Config), plus the model name and binary layer types."""
    cfg = load_config(config, overrides)
    model = build(cfg)
    report = size_report(model)
    report["model"] = cfg.model.name
    report["binary_weights"] = cfg.model.binary_weights
    report["binary_activations"] = cfg.model.binary_activations
    report["binary_layer_types"] = dict(Counter(type(m).__name__ for _, m in binary_layers(model)))
    return report


def _human(report: dict, config: str) -> str:
    kind = {(False, False): "32/32", (True, False): "1/32", (True, True): "1/1", (False, True): "32/1"}[
        (report["binary_weights"], report["binary_activations"])
    ]
    types = ", ".join(f"{n} x{c}" for n, c in report["binary_layer_types"].items()) or "none"
    return "\n".join(
        [
            f"config           {config}",
            f"model            {report['model']} (weights/activations {kind})",
            f"params           {report['params']:,} ({report['params'] / 1e6:.2f}M)",
            f"binary params    {report['binary_params']:,} in {report['binary_tensors']} tensors",
            f"binary fraction  {report['binary_fraction']:.4f}",
            f"binary layers    {types}",
            f"fp32 size        {report['fp32_mb']:.2f} MB",
            f"packed size      {report['packed_mb']:.2f} MB (binary 1 bit, rest fp32); "
            f"{report['packed_fp16_mb']:.2f} MB with fp16 rest",
        ]
    )


UNITS = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(text: str) -> int:
    """``80GiB``, ``141GB``, ``512MiB`` or a plain number of bytes."""
    m = re.fullmatch(r"([0-9.]+)\s*([A-Za-z]*)", text.strip())
    number, unit = (m[1], m[2].upper()) if m else (text, "?")
    try:
        if unit not in UNITS:
            raise ValueError
        return int(float(number) * UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected bytes, e.g. 80GiB, 141GB or 1048576") from None


MEMORY_ROWS = [
    ("parameters", "parameters"),
    ("gradients", "gradients"),
    ("optimizer state", "optimizer"),
    ("binary signs", "binary_signs"),
    ("reduce buffers", "reduce_buffers"),
    ("materialized weights", "materialized_weights"),
    ("activations", "activations"),
    ("activations (ckpt)", "activations_checkpointed"),
    ("total", "total"),
    ("total (ckpt)", "total_checkpointed"),
]


def _memory_table(plan: MemoryPlan, config: str) -> str:
    """One column per mode, one row per term, in bytes (and GiB for the totals)."""
    names = [m.mode for m in plan.modes]
    lines = [
        f"config  {config}",
        f"model   {plan.model}: {plan.params:,} parameters, {plan.binary_params:,} binary",
        f"per worker: {plan.workers} workers, global batch {plan.batch} = {plan.workers} x {plan.micro_batch} "
        f"rows; activations {plan.activation_bytes_per_row:,} B/row "
        f"({plan.activation_bytes_per_row_checkpointed:,} with checkpointing), measured on CPU fp32",
        f"{'bytes':22s}" + "".join(f"{n:>16s}" for n in names),
    ]
    for label, key in MEMORY_ROWS:
        lines.append(f"{label:22s}" + "".join(f"{getattr(m, key):>16,}" for m in plan.modes))
    lines.append(f"{'total GiB':22s}" + "".join(f"{m.total / 2**30:>16.2f}" for m in plan.modes))
    if plan.gpu_memory is not None:
        for label, key in (("fits", "fits"), ("fits (ckpt)", "fits_checkpointed")):
            lines.append(
                f"{label + f' {plan.gpu_memory / 2**30:.1f} GiB':22s}"
                + "".join(f"{'yes' if getattr(m, key) else 'no':>16s}" for m in plan.modes)
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dbgen.inspect", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--link-gbps",
        type=float,
        default=None,
        help="also: bytes per step per communication "
        "mode, their time on a link of this rate and the rate each needs (dbgen.linkmodel)",
    )
    parser.add_argument("--workers", type=int, default=2, help="data-parallel workers (with --link-gbps, --memory)")
    parser.add_argument("--memory", action="store_true", help="per-worker memory plan in every comm mode")
    parser.add_argument("--batch", type=int, default=None, help="--memory: global batch (default train.batch_size)")
    parser.add_argument(
        "--gpu-memory",
        type=parse_bytes,
        default=None,
        help="--memory: the device memory per worker, e.g. 80GiB: which modes fit",
    )
    parser.add_argument(
        "--largest-width",
        action="store_true",
        help="--memory with --gpu-memory: per mode, the largest model.width that fits (dbgen.memory.largest_width)",
    )
    parser.add_argument("--link-latency-ms", type=float, default=0.0, help="one-way link latency (with --link-gbps)")
    parser.add_argument(
        "--step-ms",
        type=float,
        default=None,
        help="compute time of a step (with --link-gbps; default: the model's GPU target at the config's batch size)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    args = parser.parse_intermixed_args(argv)  # overrides may stand before, between and after the flags
    if args.memory:
        return _memory_main(args)
    try:
        report = inspect_config(args.config, args.overrides)
        if args.link_gbps is not None:
            link, link_text = link_section(
                load_config(args.config, args.overrides),
                report,
                args.link_gbps,
                args.workers,
                args.link_latency_ms,
                args.step_ms,
            )
            report["link"] = link
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else _human(report, args.config))
    if args.link_gbps is not None and not args.json:
        print(link_text)
    return 0


def _memory_main(args) -> int:
    if args.largest_width and args.gpu_memory is None:
        print("error: --largest-width needs --gpu-memory (the budget per worker)", file=sys.stderr)
        return 2
    try:
        plan = plan_memory(
            args.config, args.overrides, workers=args.workers, batch=args.batch, gpu_memory=args.gpu_memory
        )
        widths = None
        if args.largest_width:
            widths = largest_width(
                args.config, args.overrides, budget=args.gpu_memory, workers=args.workers, batch=args.batch
            )
            widths = {mode: {"width": w, "params": _params_at(args, w)} for mode, w in widths.items()}
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**plan.to_dict(), **({"largest_width": widths} if widths else {})}))
        return 0
    print(_memory_table(plan, args.config))
    if widths:
        gib = args.gpu_memory / 2**30
        budget = f"{gib:.1f} GiB" if gib >= 1 else f"{args.gpu_memory / 2**20:.1f} MiB"
        print(f"largest model.width per worker within {budget} (estimate, activations scaled):")
        for mode, w in widths.items():
            print(f"  {mode:14s} {w['width'] or '-':>6}  {w['params'] or 0:>15,} parameters")
    return 0


def _params_at(args, width: int | None) -> int | None:
    """Parameters of the config's model at ``model.width=width``."""
    if width is None:
        return None
    with torch.device("meta"):
        return sum(
            p.numel()
            for p in build(load_config(args.config, [*args.overrides, f"model.width={width}"]).model).parameters()
        )


if __name__ == "__main__":
    sys.exit(main())
