"""``python -m dbgen.bench sample``: sampling and evaluation throughput and peak memory of the packed and float
engines.

    python -m dbgen.bench sample [--models rvae-1/1,rvae-1/32,flowpp-1/32] [--batch 1,64] [--device cpu]
        [--json-out out/sample.json]

For every model, batch and engine (:mod:`dbgen.eval_loop`: ``packed`` runs the binary layers on the bitwise
kernels, CUDA or CPU; ``float`` the training-time layers), one fresh process (so peak memory is that
measurement's alone) builds the paper model of the config, data-initializes it on 4 random images (seeded, so
both engines get the same weights), switches it to the engine and times ``model.sample(batch)`` and
``model.log_likelihood_bpd`` of ``batch`` random images (the evaluation's step): ``--warmup`` untimed calls of
each, then ``--repeats`` timed calls (each synchronized on CUDA); images/s is the batch over the median call.
Peak memory: on CUDA the maximum allocated during the timed calls; on CPU the process's maximum RSS (which
includes torch itself and the float model the engine was made from: compare engines, not absolute numbers).
"MB after": what is held after the timed calls (CUDA: allocated; CPU: resident).

Prints a table and writes JSON (``--json-out``). Defaults: batches 1 and 256 with 1 warm-up and 5 timed calls
on CUDA, batches 1 and 64 with 1 warm-up and 3 timed calls on CPU.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import resource
import statistics
import time
from pathlib import Path

import torch

from ..atomic import write_atomic
from ..config import load_config
from ..eval_loop import ENGINES, use_engine
from ..memory import proc_status_bytes
from ..models import build
from ..nn import data_dependent_init, size_report

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
# Model name -> the paper config it is built from (the model section only: data and training settings unused).
MODELS = {
    "rvae-1/1": "rvae_cifar10_binary_act.yaml",
    "rvae-1/32": "rvae_cifar10_binary.yaml",
    "flowpp-1/32": "flowpp_cifar10_binary.yaml",
    "flowpp-1/1": "flowpp_cifar10_binary_act.yaml",
}
DEFAULT_MODELS = "rvae-1/1,rvae-1/32,flowpp-1/32"


def add_arguments(p):
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--batch", default=None, help="comma-separated batch sizes (default: 1,256 on CUDA; 1,64 on CPU)")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of packed,float")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each first")
    p.add_argument("--repeats", type=int, default=None, help="timed calls of each (default: 5 on CUDA, 3 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json-out", default=None, help="write the results as JSON here")


def _config_path(model: str) -> Path:
    return ROOT / "configs" / MODELS[model]


def measure(
    model_name: str, engine: str, batch: int, device: str, warmup: int, repeats: int, threads: int | None
) -> dict:
    """One measurement, in the calling process (run it in a fresh one for a clean peak)."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    cfg = load_config(_config_path(model_name))
    torch.manual_seed(0)
    model = build(cfg.model)
    init_x = torch.randint(
        0, 256, (4, cfg.model.channels, cfg.model.image_size, cfg.model.image_size), dtype=torch.uint8
    )
    data_dependent_init(model, init_x)
    size = size_report(model)
    model = use_engine(model.to(dev).eval(), engine)
    images = torch.randint(
        0, 256, (batch, *init_x.shape[1:]), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    images = images.to(dev)

    def timed(call) -> float:
        """The median seconds of ``repeats`` calls after ``warmup`` untimed ones (seeded, synchronized)."""
        for _ in range(warmup):
            call()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times = []
        for i in range(repeats):
            torch.manual_seed(i)
            t0 = time.perf_counter()
            call()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with torch.no_grad():
        call_s = timed(lambda: model.sample(batch))
        eval_s = timed(lambda: model.log_likelihood_bpd(images))
    if dev.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(dev) / 2**20
        rss_mb = torch.cuda.memory_allocated(dev) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        rss_mb = proc_status_bytes("VmRSS") / 2**20
    return {
        "model": model_name,
        "engine": engine,
        "batch": batch,
        "device": device,
        "call_s": call_s,
        "images_per_s": batch / call_s,
        "eval_call_s": eval_s,
        "eval_images_per_s": batch / eval_s,
        "peak_mb": peak_mb,
        "rss_mb": rss_mb,
        "peak_kind": "cuda_allocated" if dev.type == "cuda" else "process_max_rss",
        "warmup": warmup,
        "repeats": repeats,
        "params": size["params"],
        "threads": torch.get_num_threads(),
    }


def _child(queue, *args):
    try:
        queue.put(measure(*args))
    except Exception as e:  # reported in the table; the other measurements go on
        queue.put({"error": f"{type(e).__name__}: {e}"})


def _in_fresh_process(*args) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, *args))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def _parse_list(text: str, allowed, what: str) -> list[str]:
    items = [s for s in text.split(",") if s]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise SystemExit(f"error: --{what}: unknown {bad or 'empty'}; choose from {', '.join(allowed)}")
    return items


def main(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device")
    models = _parse_list(args.models, MODELS, "models")
    engines = _parse_list(args.engines, ENGINES, "engines")
    batch_text = args.batch or ("1,256" if device == "cuda" else "1,64")
    try:
        batches = [int(b) for b in batch_text.split(",") if b]
    except ValueError:
        raise SystemExit(f"error: --batch: expected comma-separated integers, got {batch_text!r}") from None
    if not batches or min(batches) < 1:
        raise SystemExit(f"error: --batch: expected positive integers, got {batch_text!r}")
    warmup = args.warmup
    repeats = args.repeats if args.repeats is not None else (5 if device == "cuda" else 3)
    results = []
    for model_name in models:
        for batch in batches:
            for engine in engines:
                start = time.perf_counter()
                r = _in_fresh_process(model_name, engine, batch, device, warmup, repeats, args.threads)
                r = {"model": model_name, "engine": engine, "batch": batch, **r}
                results.append(r)
                log.info("%s %s batch %d: %s (%.0f s)", model_name, engine, batch, r, time.perf_counter() - start)
    summary = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "results": results}
    if args.json_out:
        write_atomic(args.json_out, json.dumps(summary, indent=1).encode())
    print(
        f"sampling on {summary['device']} (warm-up {warmup}, {repeats} timed call(s); peak: "
        f"{'max allocated' if device == 'cuda' else 'process max RSS'})"
    )
    print(
        f"{'model':<12} {'batch':>6} {'engine':<7} {'sample img/s':>13} {'packed/float':>13} {'eval img/s':>11} "
        f"{'packed/float':>13} {'peak MB':>9} {'MB after':>9}"
    )
    by_key = {(r["model"], r["batch"], r["engine"]): r for r in results if "error" not in r}
    for r in results:
        if "error" in r:
            print(f"{r['model']:<12} {r['batch']:>6} {r['engine']:<7} error: {r['error']}")
            continue
        ratios = ["", ""]
        other = by_key.get((r["model"], r["batch"], "float"))
        if r["engine"] == "packed" and other:
            ratios = [f"{r[k] / other[k]:.2f}x" for k in ("images_per_s", "eval_images_per_s")]
        print(
            f"{r['model']:<12} {r['batch']:>6} {r['engine']:<7} {r['images_per_s']:>13.2f} {ratios[0]:>13} "
            f"{r['eval_images_per_s']:>11.2f} {ratios[1]:>13} {r['peak_mb']:>9.0f} {r['rss_mb']:>9.0f}"
        )
    return 1 if any("error" in r for r in results) else 0
