"""``python -m dbgen.bench kernels --device cpu [--json-out F]``: the packed ops on the CPU against the float conv.

Per op, layer shape, batch, instruction-set path and thread count: microseconds of one call (the median of
``--repeats`` after a warm-up) next to ``F.conv2d`` (oneDNN) on the same shape in the same run, so the ratio
holds on a shared, noisy machine. Paths: ``reference`` (the pure-PyTorch ops, ``DBGEN_KERNELS=reference``) and
each family of the CPU kernels this CPU runs (``DBGEN_CPU_ISA``: scalar, avx2, avx512). Ops:

* ``binary_act_conv2d``: packed activations x packed weights (1/1), float output;
* ``binary_act_conv2d->bits``: the same, emitting the packed signs of its output (stacked 1/1 layers);
* ``packed_weight_conv2d``: float activations x packed weights (1/32): the kernels expand the bits into a float
  weight (one layer at a time) for oneDNN's conv.

Shapes: the paper RVAE's binary convs (256 -> 256, 3x3 and 1x1, at 16x16 and 8x8) and Flow++'s coupling
convs (hdim 120, 3x3 and 1x1, 16x16). The reference at batch 64 takes tens of seconds per call: it is timed
once there (``--reference-batches`` limits it). JSON: ``{"cpu", "date", "torch", "results": [rows]}``, each
row ``op, shape, batch, isa, threads, us, float_us``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

# (name, in channels, out channels, kernel, spatial size)
SHAPES = [
    ("rvae-3x3-16", 256, 256, 3, 16),
    ("rvae-3x3-8", 256, 256, 3, 8),
    ("rvae-1x1-16", 256, 256, 1, 16),
    ("rvae-1x1-8", 256, 256, 1, 8),
    ("flowpp-3x3-16", 120, 120, 3, 16),
    ("flowpp-1x1-16", 120, 120, 1, 16),
]
OPS = ("binary_act_conv2d", "binary_act_conv2d->bits", "packed_weight_conv2d")


def add_arguments(p) -> None:
    p.add_argument("--device", default="cpu", choices=["cpu"], help="only the CPU so far")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--shapes", nargs="+", default=[s[0] for s in SHAPES], choices=[s[0] for s in SHAPES])
    p.add_argument("--repeats", type=int, default=5, help="timed calls per row (the median is reported)")
    p.add_argument("--reference-batches", type=int, nargs="+", default=[1, 64], help="batches timing the reference")
    p.add_argument("--json-out", default=None, help="write the results as JSON here")


def _time_us(fn, repeats: int, budget_s: float = 5.0) -> float:
    """Median microseconds of ``fn()`` over up to ``repeats`` calls after one warm-up (fewer when a call is slow:
    at most ~``budget_s`` seconds per row)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    n = max(1, min(repeats, int(budget_s / max(first, 1e-9))))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _families() -> list[str]:
    """The CPU kernels' families this CPU runs, slowest first (none where they do not build)."""
    from dbgen.kernels import cpu
    from dbgen.kernels.sources import KernelUnavailable

    found = []
    for family in cpu.ISAS:
        try:
            cpu.isa(family)
            found.append(family)
        except KernelUnavailable:
            continue
    return found


def main(args) -> int:
    import dbgen.kernels as K

    saved = {k: os.environ.get(k) for k in ("DBGEN_KERNELS", "DBGEN_CPU_ISA")}
    threads_before = torch.get_num_threads()
    families, rows = _families(), []
    g = torch.Generator().manual_seed(0)
    try:
        for name, c, o, k, hw in (s for s in SHAPES if s[0] in args.shapes):
            w = torch.randn(o, c, k, k, generator=g)
            pw = K.PackedWeight.from_signs(w)
            ws = torch.where(w >= 0, 1.0, -1.0)
            scale, bias = torch.rand(o, generator=g) + 0.1, torch.randn(o, generator=g)
            for batch in args.batches:
                x = torch.randn(batch, c, hw, hw, generator=g)
                xs = torch.where(x >= 0, 1.0, -1.0)
                packed = K.pack_activations(x)
                pad = k // 2
                calls = {
                    "binary_act_conv2d": partial(K.binary_act_conv2d, packed, pw, scale, bias, 1, pad),
                    "binary_act_conv2d->bits": partial(
                        K.binary_act_conv2d, packed, pw, scale, bias, 1, pad, pack_output=True
                    ),
                    "packed_weight_conv2d": partial(K.packed_weight_conv2d, x, pw, scale, bias, 1, pad),
                }
                for threads in args.threads:
                    torch.set_num_threads(threads)
                    float_us = _time_us(partial(F.conv2d, xs, ws, padding=pad), args.repeats)
                    paths = (["reference"] if batch in args.reference_batches else []) + families
                    for path in paths:
                        os.environ["DBGEN_KERNELS"] = "reference" if path == "reference" else "cpu"
                        if path != "reference":
                            os.environ["DBGEN_CPU_ISA"] = path
                        for op in OPS:
                            repeats = 1 if path == "reference" and batch > 1 else args.repeats
                            us = _time_us(calls[op], repeats)
                            rows.append(
                                {
                                    "op": op,
                                    "shape": name,
                                    "batch": batch,
                                    "isa": path,
                                    "threads": threads,
                                    "us": round(us, 1),
                                    "float_us": round(float_us, 1),
                                }
                            )
                            r = rows[-1]
                            print(
                                f"{op:24s} {name:14s} b{batch:<3d} {path:9s} t{threads} {r['us']:>12.1f} us "
                                f"float {r['float_us']:>10.1f} us  x{r['float_us'] / r['us']:.2f}",
                                flush=True,
                            )
    finally:
        torch.set_num_threads(threads_before)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    result = {
        "cpu": _cpu_model(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "results": rows,
    }
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    return 0
