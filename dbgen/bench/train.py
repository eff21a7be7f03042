"""``python -m dbgen.bench train``: throughput of the trainer's training step on one device.

    python -m dbgen.bench train --config configs/rvae_cifar10_binary.yaml --device cuda \\
        --variant fp32:train.precision=fp32,train.channels_last=false \\
        --variant bf16_nhwc:train.precision=bf16,train.channels_last=true --json-out out/train.json

The step is exactly the trainer's (:func:`dbgen.step.run_step`): the model of the config, data-dependent init
on the benchmark batch, :func:`~dbgen.step.prepare_model` (``train.channels_last``, ``train.compile``),
:func:`~dbgen.step.build_optimizer` (fused Adam, device-side clip and skip, latent clamp),
:class:`~dbgen.sync.LocalSync` (one process, no DeepSpeed), bf16 autocast per ``train.precision``, the EMA when
the config keeps one, the learning rate of :func:`dbgen.step.lr_at`. Setup, in this order (tests rely on it):
``torch.manual_seed(train.seed)``, one random uint8 batch drawn on the CPU (so every device gets the same
numbers), then :func:`dbgen.step.single_device_setup` (build, init on that batch, prepare, optimizer, EMA).
That batch (moved once to the device, in NHWC when channels_last) is every step's input: this measures the
model and optimizer, not the input pipeline (``dbgen.bench data`` does).

Per config and variant (``--variant NAME:key=value,key=value``, overrides applied after the positional ones):
``--warmup`` untimed steps (torch.compile compiles here; their wall time is ``warmup_s``), then ``--repeats``
windows of ``--steps`` timed steps, each with one synchronize before and one after its loop and nothing in
between (as in training, the step never waits for the GPU); ``step_ms`` is the median window's mean. Then,
untimed: one more step under ``FlopCounterMode`` to count the convolution FLOPs of a step (forward and
backward; always counted on an eager run, ``torch.compiler.set_stance("force_eager")``, because the counter
cannot see inside compiled graphs; shapes and hence FLOPs are the same), and with
``--profile N`` N steps under ``torch.profiler`` whose top-20 kernels by self time go to a text file.

Reported: step ms, images/s, the mean phase times of :class:`~dbgen.step.PhaseClock`, peak memory (CUDA: max
allocated during the timed steps; CPU: the process's max RSS so far), the last timed step's loss (bits/dim),
conv TFLOP/s = conv FLOPs / step time and its fraction of the card's dense bf16 peak (:data:`BF16_PEAK`), and
for the paper configs the original implementation's throughput and the target of 4x it (:data:`REFERENCE`).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import re
import resource
import statistics
import time
import traceback
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..atomic import write_atomic
from ..config import Config, load_config
from ..nn import size_report
from ..step import (
    PhaseClock,
    autocast_dtype,
    batch_to_device,
    lr_at,
    resolve_stats,
    run_step,
    single_device_setup,
    use_channels_last,
)

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peak (FLOP/s, 2 per multiply-add) by device name. Names not listed (H100 NVL, H200
# NVL: lower clocks and power) get no fraction rather than a wrong one.
BF16_PEAK = [
    ("H200 NVL", None),
    ("H200", 989.4e12),
    ("H100 NVL", None),
    ("H100 PCIE", 756e12),
    ("H100", 989.4e12),  # "NVIDIA H100 80GB HBM3" is the SXM part
    ("A100", 312e12),
]

# The paper models' shapes (what makes a config "the paper's"), what the original implementation reached on one
# H200 (its fp32 defaults, random data, Adam + clip + clamp), and the throughput target: 4x the original.
PAPER_RVAE = {"name": "rvae", "width": 256, "zdim": 8, "num_stochastic": 12, "num_proc_layers": 4, "image_size": 32}
PAPER_FLOWPP = {"name": "flowpp", "hdim": 120, "blocks": 10, "mix_components": 8, "image_size": 32}
REFERENCE = [
    # (shape, binary weights, binary activations, batch, original images/s on H200, target images/s, note)
    (PAPER_RVAE, True, False, 128, 1399, 5600, "the original's binary RVAE also binarizes activations"),
    (PAPER_RVAE, True, True, 128, 1399, None, ""),
    (PAPER_RVAE, False, False, 128, 1413, None, ""),
    (PAPER_FLOWPP, True, False, 64, 243, 970, ""),
    (PAPER_FLOWPP, False, False, 64, 184, None, ""),
]


def add_arguments(p):
    p.add_argument("--config", action="append", required=True, help="experiment YAML (repeat for several)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:key=value,...",
        help="a named set of overrides, measured for every config (repeat; default: the config as is)",
    )
    p.add_argument("--batch", type=int, help="batch size (default: each config's train.batch_size)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per timing window")
    p.add_argument("--repeats", type=int, default=1, help="timing windows (step_ms is their median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 on a shared CPU)")
    p.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP-counting step")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="profile N extra steps; top-20 kernels by self time to profile_<config>_<variant>.txt",
    )
    p.add_argument("--json-out", type=Path, help="write the list of results here (profiles go beside it)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides for every run")


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME:k=v,k=v`` -> (NAME, [k=v, ...]). Commas inside a value (``optimizer.betas=[0.9,0.99]``) stay:
    a new override starts only at ``,dotted.key=``."""
    name, sep, rest = text.partition(":")
    if not sep or not re.fullmatch(r"[\w.-]+", name):
        raise ValueError(f"--variant {text!r}: expected NAME:key=value[,key=value...] (NAME of letters, digits, _ . -)")
    overrides = [o for o in re.split(r",(?=[\w.]+=)", rest) if o]
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"--variant {text!r}: override {o!r} is not dotted.key=value")
    return name, overrides


def bf16_peak(device_name: str) -> float | None:
    """The card's dense bf16 peak in FLOP/s from :data:`BF16_PEAK`, None if unknown (or CPU)."""
    n = device_name.upper()
    for key, peak in BF16_PEAK:
        if key in n:
            return peak
    return None


def reference_for(cfg: Config, batch: int) -> tuple[float, float | None, str] | None:
    """(original images/s, target images/s, note) when the config is a paper model at the measured batch."""
    m = cfg.model
    for shape, bw, ba, b, original, target, note in REFERENCE:
        if (
            all(getattr(m, k) == v for k, v in shape.items())
            and m.binary_weights == bw
            and m.binary_activations == ba
            and batch == b
        ):
            return original, target, note
    return None


def conv_flops(counts: dict) -> int:
    """Convolution FLOPs (forward ``convolution`` and ``convolution_backward`` ops) of a FlopCounterMode's
    ``get_flop_counts()["Global"]``."""
    return sum(v for op, v in counts.items() if "convolution" in str(op))


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"  # KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _profile(one_step, n: int, device: torch.device, path: Path) -> dict:
    """``n`` steps under torch.profiler; the top-20 kernels (CUDA) or ops (CPU) by self time to ``path``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            one_step()
        _sync(device)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = events.table(sort_by=sort, row_limit=20)
    out = {"steps": n, "wall_ms_per_step": 1e3 * wall / n, "file": str(path)}
    if cuda:  # device busy time vs wall time says whether the step is kernel-bound or launch-bound
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        busy_us = sum(e.self_device_time_total for e in kernels)
        out["kernels_per_step"] = sum(e.count for e in kernels) / n
        out["device_busy_ms_per_step"] = busy_us / 1e3 / n
        out["device_busy_fraction"] = out["device_busy_ms_per_step"] / out["wall_ms_per_step"]
    header = (
        f"# {n} profiled steps, {out['wall_ms_per_step']:.2f} ms/step wall"
        + (
            f", kernels {out['kernels_per_step']:.0f}/step, device busy {out['device_busy_ms_per_step']:.2f} "
            f"ms/step ({100 * out['device_busy_fraction']:.0f}% of wall)"
            if cuda
            else ""
        )
        + "\n"
    )
    write_atomic(path, header + table + "\n")
    return out


def bench(
    cfg: Config,
    *,
    batch: int | None = None,
    steps: int = 10,
    warmup: int = 2,
    repeats: int = 1,
    device: str = "cpu",
    flops: bool = True,
    profile: int = 0,
    profile_path: Path | None = None,
) -> dict:
    """Measure the trainer's step for one config (see the module docstring); returns the result dict."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda: no CUDA device is available")
    if steps < 1 or warmup < 0 or repeats < 1:
        raise ValueError(f"need steps >= 1, warmup >= 0, repeats >= 1; got {steps}, {warmup}, {repeats}")
    t = cfg.train
    batch = batch or t.batch_size
    if batch % t.grad_accum:
        raise ValueError(f"batch {batch} is not divisible by train.grad_accum={t.grad_accum}")
    m = cfg.model

    start = time.perf_counter()
    torch.manual_seed(t.seed)
    x_cpu = torch.randint(0, 256, (batch, m.channels, m.image_size, m.image_size), dtype=torch.uint8)
    model, sync, ema = single_device_setup(cfg, x_cpu, device)
    channels_last = use_channels_last(cfg, device)
    x = batch_to_device(x_cpu, device, channels_last)  # (batch, C, H, W) uint8, NHWC in memory if channels_last
    batches = list(x.chunk(t.grad_accum))  # train.grad_accum micro-batches per optimizer step, as the trainer
    amp_dtype = autocast_dtype(cfg, device)
    step_index = 0

    def one_step() -> dict:
        nonlocal step_index
        clock = PhaseClock(device)
        out = run_step(model, sync, batches, t, lr_at(cfg, step_index), amp_dtype, clock, model, ema)
        step_index += 1
        return {**out, "clock": clock}

    _sync(device)
    setup_s = time.perf_counter() - start

    log.info("setup %.1fs; %d warm-up steps (torch.compile compiles here)", setup_s, warmup)
    t0 = time.perf_counter()
    for _ in range(warmup):
        one_step()
    _sync(device)
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    timed, windows = [], []
    for _ in range(repeats):  # a synchronize only between windows, never inside one
        t0 = time.perf_counter()
        timed += [one_step() for _ in range(steps)]
        _sync(device)
        windows.append((time.perf_counter() - t0) / steps)
    step_s = statistics.median(windows)
    peak_mb, peak_kind = _peak_memory_mb(device)
    stats = resolve_stats(timed)  # one device-to-host copy, after the clock stopped

    sizes = size_report(model)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {
        "model": m.name,
        "binary_weights": m.binary_weights,
        "binary_activations": m.binary_activations,
        "params": sizes["params"],
        "binary_params": sizes["binary_params"],
        "device": device_name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "precision": str(amp_dtype).removeprefix("torch.") if amp_dtype else "fp32",
        "channels_last": channels_last,
        "compile": t.compile,
        "ema": ema is not None,
        "batch": batch,
        "grad_accum": t.grad_accum,
        "warmup": warmup,
        "steps": steps,
        "repeats": repeats,
        "setup_s": setup_s,
        "warmup_s": warmup_s,
        "step_ms": 1e3 * step_s,
        "step_ms_windows": [1e3 * w for w in windows],
        "images_per_s": batch / step_s,
        "phase_ms": {
            p: 1e3 * sum(s[f"t_{p}"] for s in stats) / len(stats)
            for p in ("forward", "backward", "communication", "optimizer")
        },
        "peak_mem_mb": peak_mb,
        "peak_mem_kind": peak_kind,
        "first_loss_bpd": stats[0]["loss"],
        "final_loss_bpd": stats[-1]["loss"],
        "final_grad_norm": stats[-1]["grad_norm"],
        "skipped_steps": sum(s["skipped"] for s in stats),
    }
    if device.type == "cuda":
        result["cudnn"] = {"benchmark": torch.backends.cudnn.benchmark, "allow_tf32": torch.backends.cudnn.allow_tf32}

    peak = bf16_peak(device_name)
    result["bf16_peak_tflops"] = peak / 1e12 if peak else None
    if flops:
        # Eager, also for a compiled model: FlopCounterMode counts dispatched aten ops, which a compiled graph
        # hides. The model's shapes are the same, so the count is the compiled step's too.
        with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
            one_step()
        _sync(device)
        counts = counter.get_flop_counts()["Global"]
        result["conv_flops"] = conv_flops(counts)
        result["total_flops"] = counter.get_total_flops()
        result["flops_by_op"] = {str(op): v for op, v in counts.items()}
        result["flops_counted"] = "eager (force_eager stance on the compiled model)" if t.compile else "eager"
        result["conv_tflops"] = result["conv_flops"] / step_s / 1e12
        result["frac_bf16_peak"] = result["conv_flops"] / step_s / peak if peak else None
    ref = reference_for(cfg, batch)
    if ref is not None:
        original, target, note = ref
        result.update(
            original_images_per_s=original,
            vs_original=result["images_per_s"] / original,
            target_images_per_s=target,
            original_note=note,
        )
        if target:
            result["target_met"] = result["images_per_s"] >= target
    if profile > 0:
        try:  # a profiler failure must not cost the timing already measured
            result["profile"] = _profile(one_step, profile, device, profile_path or Path("profile.txt"))
        except Exception as e:  # noqa: BLE001
            log.exception("profile failed")
            result["profile"] = {"error": repr(e)}
    return result


def _free(device: torch.device, compiled: bool) -> None:
    """Release what a run left behind (its tensors are unreachable once ``bench`` returned or raised)."""
    gc.collect()
    if compiled:
        torch.compiler.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_all(
    configs: list[str],
    variants: list[tuple[str, list[str]]],
    overrides: list[str] = (),
    *,
    profile_dir: Path | None = None,
    on_result=None,
    **kwargs,
) -> list[dict]:
    """Every config under every variant, one after the other in this process. A run that fails (out of memory,
    a compile error) gives a result with ``error`` and the others still run. ``on_result(results)`` is called
    after each run (the CLI writes its JSON there, so a run killed by a timeout keeps the earlier ones)."""
    results = []
    for path in configs:
        for name, extra in variants or [("config", [])]:
            row = {"config": Path(path).stem, "config_path": str(path), "variant": name, "overrides": list(extra)}
            log.info("bench train: %s / %s %s", row["config"], name, " ".join(extra))
            compiled = False
            try:
                cfg = load_config(path, [*overrides, *extra])
                compiled = cfg.train.compile
                profile_path = (profile_dir or Path(".")) / f"profile_{row['config']}_{name}.txt"
                row.update(bench(cfg, profile_path=profile_path, **kwargs))
            except Exception as e:  # noqa: BLE001  (reported in the result; the process goes on)
                log.error("bench train %s / %s failed:\n%s", row["config"], name, traceback.format_exc())
                row["error"] = f"{type(e).__name__}: {e}"
            results.append(row)
            _free(torch.device(kwargs.get("device", "cpu")), compiled)
            if on_result is not None:
                on_result(results)
    return results


def _f(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_table(results: list[dict]) -> str:
    """The results as an aligned text table (one row per run)."""
    cols = [
        ("config", "<28"),
        ("variant", "<26"),
        ("batch", ">5"),
        ("step ms", ">9"),
        ("images/s", ">9"),
        ("conv TFLOP/s", ">12"),
        ("% bf16 peak", ">11"),
        ("peak MB", ">8"),
        ("final bpd", ">9"),
        ("vs orig", ">7"),
        ("target", ">13"),
    ]
    lines = [" ".join(format(c, s) for c, s in cols)]
    lines.append(" ".join("-" * int(s[1:]) for _, s in cols))
    for r in results:
        if "error" in r:
            lines.append(f"{r['config']:<28} {r['variant']:<26} ERROR {r['error'][:160]}")
            continue
        frac = r.get("frac_bf16_peak")
        target = r.get("target_images_per_s")
        target_txt = f">={target} {'ok' if r['target_met'] else 'NO'}" if target else "-"
        vals = [
            r["config"][:28],
            r["variant"][:26],
            r["batch"],
            _f(r["step_ms"], ".1f"),
            _f(r["images_per_s"], ".1f"),
            _f(r.get("conv_tflops"), ".3f"),
            _f(100 * frac if frac is not None else None, ".1f"),
            _f(r["peak_mem_mb"], ".0f"),
            _f(r["final_loss_bpd"], ".4f"),
            _f(r.get("vs_original"), ".2f"),
            target_txt,
        ]
        lines.append(" ".join(format(v, s) for v, (_, s) in zip(vals, cols, strict=True)))
    devices = sorted({r["device"] for r in results if "device" in r})
    notes = [
        f"device: {', '.join(devices)}; conv FLOPs of one step (forward + backward) counted on an eager step; "
        "% bf16 peak = conv TFLOP/s over the card's dense bf16 peak"
    ]
    if any(r.get("bf16_peak_tflops") is None and "device" in r for r in results):
        notes.append("no bf16 peak known for this device (CPU or a card not in BF16_PEAK): no % given")
    if any("original_images_per_s" in r for r in results):
        notes.append(
            "vs orig: images/s over the original implementation's on one H200 (its fp32 defaults); "
            "target: 4x the original"
        )
    return "\n".join(lines + [f"# {n}" for n in notes])


def main(args) -> int:
    try:
        variants = [parse_variant(v) for v in args.variant]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    names = [n for n, _ in variants]
    if len(set(names)) != len(names):
        raise SystemExit(f"--variant names must be unique, got {names}")
    if args.threads:
        torch.set_num_threads(args.threads)
    profile_dir = args.json_out.parent if args.json_out else Path(".")

    def write_json(results):
        if args.json_out:
            write_atomic(args.json_out, json.dumps(results, indent=1))

    results = run_all(
        args.config,
        variants,
        args.overrides,
        profile_dir=profile_dir,
        on_result=write_json,
        batch=args.batch,
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        device=args.device,
        flops=args.flops,
        profile=args.profile,
    )
    print(json.dumps(results) if args.json else format_table(results))
    return 1 if any("error" in r for r in results) else 0
