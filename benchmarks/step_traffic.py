"""What bounds an eager training step, from its operator trace: launches, bytes moved and convolution FLOPs.

    python benchmarks/step_traffic.py --config configs/rvae_cifar10_binary.yaml --batch 128 [--json-out F]

Runs the trainer's step math (:func:`dbgen.step.run_step`, bf16 autocast, fused Adam, clip, EMA if configured)
eagerly on the CPU at two small batch sizes under a dispatch mode that records every ATen operator below
autograd: its name, the bytes of its tensor inputs and outputs, and (for convolutions) its FLOPs. Counts are
linear in the batch (parameter-side work is constant, activation-side work proportional), so two batches give
the counts at ``--batch`` exactly, without running it. Views and other metadata-only operators launch nothing
and are not counted.

The printed bounds are for an eager GPU step on a card with ``--bandwidth`` bytes/s and ``--peak`` FLOP/s:
``non-conv bytes / bandwidth`` (element-wise and optimizer work is memory-bound), ``conv FLOPs / peak`` (the
convolutions' floor), and the number of kernel launches (each costs host time in eager PyTorch: the dispatch
overhead per operator, measured on this CPU by timing the config's narrowest twin, where arithmetic is
negligible, bounds a step that is not compiled into few kernels or captured in a CUDA graph). They are bounds,
not timings: GPU timings come from ``dbgen.bench train``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter, defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dbgen.config import load_config
from dbgen.step import PhaseClock, autocast_dtype, run_step, single_device_setup

# Operators that only create views or read metadata: no kernel, no bytes.
NO_KERNEL = {
    "view",
    "_unsafe_view",
    "reshape",
    "expand",
    "permute",
    "t",
    "transpose",
    "as_strided",
    "detach",
    "alias",
    "slice",
    "select",
    "unsqueeze",
    "squeeze",
    "split",
    "split_with_sizes",
    "chunk",
    "unbind",
    "_reshape_alias",
    "lift_fresh",
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "is_same_size",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "_local_scalar_dense",
    "unsafe_split",
    "narrow",
    "diagonal",
    "view_as",
    "real",
    "set_",
    "resize_",
}
CONV = {"convolution", "convolution_backward", "mkldnn_convolution", "_convolution"}


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes an operator touches for ``t``: its elements, but no more than its storage (broadcast views)."""
    view = t.numel() * t.element_size()
    try:
        return min(view, t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return view


def _flat_tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, list | tuple):
        for y in x:
            yield from _flat_tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _flat_tensors(y)


def _conv_flops(name, args, out) -> int:
    """2 * MACs of a forward convolution; a backward counts the gradients it computes (input, weight)."""
    if name in ("convolution", "_convolution", "mkldnn_convolution"):
        x, w = args[0], args[1]
        transposed = name != "mkldnn_convolution" and bool(args[6])
        if transposed:  # each input element meets every weight of its channel
            return 2 * x.numel() * w.numel() // w.shape[0]
        return 2 * out.numel() * w.numel() // w.shape[0]
    if name == "convolution_backward":
        grad_out, x, w = args[0], args[1], args[2]
        # (grad_out, input, weight, bias_sizes, stride, padding, dilation, transposed, out_padding, groups, mask)
        transposed, mask = bool(args[7]), args[10]
        per = 2 * (x.numel() if transposed else grad_out.numel()) * w.numel() // w.shape[0]
        return per * (int(mask[0]) + int(mask[1]))
    return 0


class OpTrace(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.launches = Counter()
        self.bytes = Counter()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name in NO_KERNEL:
            return out
        moved = (
            sum(_tensor_bytes(t) for t in _flat_tensors(args))
            + sum(_tensor_bytes(t) for t in _flat_tensors(kwargs or {}))
            + sum(_tensor_bytes(t) for t in _flat_tensors(out))
        )
        self.launches[name] += 1
        self.bytes[name] += moved
        if name in CONV:
            self.flops += _conv_flops(name, args, out)
        return out


def _step_fn(cfg, batch: int, seed: int = 0):
    """The trainer's single-device step on a random CPU batch, as ``step(amp_dtype)``."""
    torch.manual_seed(seed)
    m = cfg.model
    x = torch.randint(0, 256, (batch, m.channels, m.image_size, m.image_size), dtype=torch.uint8)
    model, sync, ema = single_device_setup(cfg, x, x.device)
    return lambda amp: run_step(model, sync, [x], cfg.train, 1e-4, amp, PhaseClock(x.device), model, ema)


def trace_step(cfg, batch: int, seed: int = 0) -> OpTrace:
    step = _step_fn(cfg, batch, seed)
    amp = autocast_dtype(cfg, torch.device("cuda"))  # the GPU's precision, emulated with CPU autocast
    step(amp)  # the optimizer state exists from here on
    trace = OpTrace()
    with trace:
        step(amp)
    return trace


# The narrowest model of each kind: the same operators (same count), almost no arithmetic.
NARROW = {"rvae": ["model.width=8"], "flowpp": ["model.hdim=8", "model.dequant_context_hdim=8"]}


def host_us_per_op(path: str, overrides: list[str], steps: int = 5) -> tuple[float, int]:
    """Host time per operator of the eager step (Python, modules, autograd, dispatch), measured on the config's
    narrowest twin at batch 1 where the arithmetic is negligible: (microseconds per operator, operators)."""
    cfg = load_config(path, overrides)
    cfg = load_config(path, [*overrides, *NARROW[cfg.model.name], "train.batch_size=1"])
    step = _step_fn(cfg, 1)
    amp = autocast_dtype(cfg, torch.device("cuda"))
    step(amp)
    trace = OpTrace()
    with trace:
        step(amp)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # host overhead, not parallel arithmetic (and no OpenMP waits on a busy machine)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        step(amp)
        times.append(time.perf_counter() - t0)
    torch.set_num_threads(threads)
    ops = sum(trace.launches.values())
    return min(times[1:]) / ops * 1e6, ops


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, nargs="+")
    p.add_argument("--batch", type=int, help="batch to report (default: the config's train.batch_size)")
    p.add_argument("--probe-batches", type=int, nargs=2, default=(2, 4))
    p.add_argument("--bandwidth", type=float, default=3.0e12, help="bytes/s (H100 SXM measured copy: ~3.0e12)")
    p.add_argument("--peak", type=float, default=989.4e12, help="dense bf16 FLOP/s (H100/H200: 989.4e12)")
    p.add_argument("--top", type=int, default=8, help="operators listed by bytes")
    p.add_argument("--json-out")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    results = []
    for path in args.config:
        cfg = load_config(path, ["train.precision=bf16", *args.overrides])
        batch = args.batch or cfg.train.batch_size
        b1, b2 = args.probe_batches
        t1, t2 = trace_step(cfg, b1), trace_step(cfg, b2)
        overhead, _ = host_us_per_op(path, ["train.precision=fp32", *args.overrides])

        def at(v1, v2, batch=batch, b1=b1, b2=b2):  # linear in the batch
            return v1 + (v2 - v1) * (batch - b1) / (b2 - b1)

        conv_bytes = at(sum(t1.bytes[k] for k in CONV), sum(t2.bytes[k] for k in CONV))
        other_bytes = at(
            sum(v for k, v in t1.bytes.items() if k not in CONV), sum(v for k, v in t2.bytes.items() if k not in CONV)
        )
        flops = at(t1.flops, t2.flops)
        launches = sum(t2.launches.values())
        by_op = defaultdict(float)
        for k in set(t1.bytes) | set(t2.bytes):
            if k not in CONV:
                by_op[k] = at(t1.bytes[k], t2.bytes[k])
        top = sorted(by_op.items(), key=lambda kv: -kv[1])[: args.top]
        r = {
            "config": path,
            "batch": batch,
            "launches": launches,
            "conv_launches": sum(t2.launches[k] for k in CONV),
            "conv_flops": flops,
            "conv_bytes": conv_bytes,
            "non_conv_bytes": other_bytes,
            "conv_floor_ms": flops / args.peak * 1e3,
            "non_conv_floor_ms": other_bytes / args.bandwidth * 1e3,
            "host_dispatch_us_per_op": overhead,
            "host_floor_ms": launches * overhead / 1e3,
            "top_non_conv_ops_bytes": dict(top),
            "bandwidth": args.bandwidth,
            "peak": args.peak,
            "launches_by_op": dict(t2.launches.most_common()),
        }
        floor = max(r["conv_floor_ms"] + r["non_conv_floor_ms"], r["host_floor_ms"])
        r["images_per_s_bound"] = batch / floor * 1e3
        results.append(r)
        print(f"\n{path}  batch {batch} (bf16 autocast, eager; linear fit of batches {b1} and {b2})")
        print(f"  kernel launches per step      {launches:>10,d}   (convolutions {r['conv_launches']:,d})")
        print(
            f"  conv FLOPs                    {flops / 1e12:>10.2f} T -> {r['conv_floor_ms']:.2f} ms at "
            f"{args.peak / 1e12:.0f} TFLOP/s"
        )
        print(
            f"  non-conv bytes                {other_bytes / 1e9:>10.2f} GB -> {r['non_conv_floor_ms']:.2f} ms at "
            f"{args.bandwidth / 1e12:.1f} TB/s"
        )
        print(
            f"  host time (this CPU, eager)   {overhead:>10.1f} us/op -> {r['host_floor_ms']:.2f} ms per step "
            "(+ CUDA launch cost on a GPU)"
        )
        print(f"  bound (max(GPU floors, host)) {r['images_per_s_bound']:>10,.0f} images/s")
        print("  non-conv bytes by operator: " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in top))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
