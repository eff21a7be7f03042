"""Benchmark the bitwise kernels against cuDNN bf16 convolution on the models' binary conv shapes.

    python benchmarks/bench_kernels.py [--batches 1 16 128] [--json out.json] [--no-sweep]

On a CUDA GPU, per shape and batch: cuDNN bf16 conv (channels-last, cudnn.benchmark) vs
  * ``binary``        fully binary conv on packed activations, bf16 output (1-bit tensor cores)
  * ``binary+pack``   the same plus packing the bf16 input's signs (a layer fed by a float tensor)
  * ``binary->bits``  fully binary conv emitting the packed signs of its output (fused, stacks of 1/1 layers)
  * ``packed-w``      bf16 activations x packed 1-bit weights (no dequantized weight in memory)
timed with CUDA graphs (median of replays; launch overhead excluded, as for a captured model), with the
launch config chosen by the library's heuristic and, unless --no-sweep, the best of a small sweep (tiles with
streamed weights x split-K 1..8, and the weight-stationary tiles 2, 3 and 4; tile 4 = tile 3 with the A
fragments in registers, 1 block/SM, for K = 9 steps only, which the heuristic never picks: the sweep decides).
TOPS count 2 ops per multiply-add; the 1-bit peak is 10,104 TOPS (mma.sync b1.and, measured on an H200 with a
dedicated microbenchmark). Each kernel's output is checked against an fp32 conv before it is timed (relative
errors in the table).

Without CUDA it runs the pure-PyTorch reference (what dbgen.kernels uses on CPU) against F.conv2d fp32 on the
CPU: those numbers describe the reference path only, not the goal. ``--emulate`` runs the GPU benchmark's code
on the host emulation of the kernels (a smoke test of this script without a GPU; its times mean nothing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dbgen.atomic import write_atomic  # noqa: E402
from dbgen.kernels import (  # noqa: E402
    PackedWeight,
    binary_act_conv2d,
    pack_activations,
    packed_weight_conv2d,
)

PEAK_1BIT_TOPS = 10_104
# name, C_in, C_out, H, W, kernel, padding
CASES = [
    ("rvae_res3x3", 256, 256, 16, 16, 3, 1),
    ("rvae_res5x5", 256, 256, 16, 16, 5, 2),
    ("flowpp_conv3x3", 240, 120, 32, 16, 3, 1),
    ("flowpp_gate1x1", 240, 240, 32, 16, 1, 0),
]
GOALS = {"binary_vs_cudnn_at_128": 8.0, "packed_weight_vs_cudnn_at_1": 3.0}


def ops_count(n, c, o, h, w, k):
    return 2.0 * n * o * h * w * c * k * k  # stride 1, "same" padding: Ho = H, Wo = W


# ----------------------------------------------------------------------------------------------- GPU
def time_gpu(fn, reps: int = 50, inner: int = 10) -> tuple[float, str]:
    """Median microseconds per call: CUDA-graph replays of ``inner`` calls, or eager event timing."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
        run, mode = graph.replay, "graph"
    except Exception:  # capture unsupported for this op: time eagerly (includes launch gaps)
        torch.cuda.synchronize()

        def run():
            for _ in range(inner):
                fn()

        mode = "eager"
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / inner)
    return statistics.median(times), mode


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def bench_case_gpu(name, c, o, h, w, k, pad, n, sweep: bool, dev: str = "cuda", timer=time_gpu) -> dict:
    from dbgen.kernels import cuda

    dev = torch.device(dev)
    time_gpu = timer
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(n, c, h, w, device=dev, generator=g, dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last
    )
    wt = torch.randn(o, c, k, k, device=dev, generator=g)
    scale = torch.rand(o, device=dev, generator=g) + 0.5
    bias = torch.randn(o, device=dev, generator=g)
    pw = PackedWeight.from_signs(wt)
    sx, sw = torch.where(x >= 0, 1.0, -1.0).to(torch.bfloat16), torch.where(wt >= 0, 1.0, -1.0)
    w_bf16 = (sw * scale.view(-1, 1, 1, 1)).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = True
    ops = ops_count(n, c, o, h, w, k)
    row = {"case": name, "batch": n, "C": c, "O": o, "H": h, "W": w, "k": k, "gops": ops / 1e9}

    def cudnn():
        return F.conv2d(x, w_bf16, bias.to(torch.bfloat16), 1, pad)

    row["cudnn_bf16_us"], _ = time_gpu(cudnn)
    ref_bin = F.conv2d(sx.float(), sw * scale.view(-1, 1, 1, 1), bias, 1, pad)
    ref_pw = F.conv2d(x.float(), sw * scale.view(-1, 1, 1, 1), bias, 1, pad)

    xp = pack_activations(x)  # packed activations, (N, H, W, Cw)

    def binary(tile=None, ksplit=None):
        return cuda.bconv_cuda(
            xp.words, c, pw, scale, bias, (1, 1), (pad, pad), out_dtype=torch.bfloat16, tile=tile, ksplit=ksplit
        )

    def packed_w(tile=None, ksplit=None):
        return cuda.pwconv_cuda(x, pw, scale, bias, (1, 1), (pad, pad), tile=tile, ksplit=ksplit)

    row["binary_err"] = rel_err(binary(), ref_bin)
    row["packed_w_err"] = rel_err(packed_w(), ref_pw)
    packed_out = binary_act_conv2d(xp, pw, scale, bias, 1, pad, pack_output=True)
    row["binary_bits_exact"] = bool(
        torch.equal(packed_out.words, pack_activations(binary_act_conv2d(xp, pw, scale, bias, 1, pad)).words)
    )
    row["binary_us"], row["timing"] = time_gpu(binary)
    row["binary_pack_us"], _ = time_gpu(lambda: binary_act_conv2d(x, pw, scale, bias, 1, pad, out_dtype=torch.bfloat16))
    row["binary_bits_us"], _ = time_gpu(lambda: binary_act_conv2d(xp, pw, scale, bias, 1, pad, pack_output=True))
    row["packed_w_us"], _ = time_gpu(packed_w)
    row["pack_input_us"], _ = time_gpu(lambda: pack_activations(x))
    if sweep:  # tiles 0/1 stream the weights (split-K 1..8); binary tiles 2/3/4 keep them in shared memory
        streamed = [(tile, ks) for tile in (0, 1) for ks in (1, 2, 4, 8)]
        stationary = [(2, 1), (3, 1), (4, 1)]
        for kind, fn, configs in (("binary", binary, streamed + stationary), ("packed_w", packed_w, streamed)):
            best = (row[f"{kind}_us"], "auto")
            for tile, ksplit in configs:
                t, _ = time_gpu(lambda fn=fn, tile=tile, ksplit=ksplit: fn(tile, ksplit), reps=20)
                if t < best[0]:
                    best = (t, f"tile{tile}/k{ksplit}")
            row[f"{kind}_best_us"], row[f"{kind}_best_cfg"] = best
    for kind in ("binary", "packed_w"):
        t = min(row[f"{kind}_us"], row.get(f"{kind}_best_us", float("inf")))
        row[f"{kind}_speedup"] = row["cudnn_bf16_us"] / t
        row[f"{kind}_tops"] = ops / (t * 1e-6) / 1e12
    row["binary_pct_peak"] = 100.0 * row["binary_tops"] / PEAK_1BIT_TOPS
    row["cudnn_tflops"] = ops / (row["cudnn_bf16_us"] * 1e-6) / 1e12
    return row


# ----------------------------------------------------------------------------------------------- CPU
def time_cpu(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def bench_case_cpu(name, c, o, h, w, k, pad, n) -> dict:
    g = torch.Generator().manual_seed(0)
    x, wt = torch.randn(n, c, h, w, generator=g), torch.randn(o, c, k, k, generator=g)
    scale, bias = torch.rand(o, generator=g) + 0.5, torch.randn(o, generator=g)
    pw = PackedWeight.from_signs(wt)
    weff = torch.where(wt >= 0, 1.0, -1.0) * scale.view(-1, 1, 1, 1)
    sx = torch.where(x >= 0, 1.0, -1.0)
    reps = 3 if n <= 16 else 1
    xp = pack_activations(x)
    row = {"case": name, "batch": n, "C": c, "O": o, "H": h, "W": w, "k": k, "gops": ops_count(n, c, o, h, w, k) / 1e9}
    row["conv2d_fp32_us"] = time_cpu(lambda: F.conv2d(x, weff, bias, 1, pad), reps)
    row["ref_binary_us"] = time_cpu(lambda: binary_act_conv2d(xp, pw, scale, bias, 1, pad), reps)
    row["ref_packed_w_us"] = time_cpu(lambda: packed_weight_conv2d(x, pw, scale, bias, 1, pad), reps)
    exact = torch.equal(
        binary_act_conv2d(xp, pw, None, None, 1, pad), F.conv2d(sx, torch.where(wt >= 0, 1.0, -1.0), None, 1, pad)
    )
    row["ref_binary_exact"] = bool(exact)
    return row


# ---------------------------------------------------------------------------------------------- main
def fmt_gpu(rows) -> str:
    head = (
        f"{'case':<15} {'N':>4} {'cuDNN bf16':>10} {'binary':>8} {'x':>6} {'TOPS':>6} {'%1bit':>6} "
        f"{'+pack':>8} {'->bits':>8} {'packed-w':>9} {'x':>6}  best cfg (bin / pw)"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        t_bin = min(r["binary_us"], r.get("binary_best_us", 1e9))
        t_pw = min(r["packed_w_us"], r.get("packed_w_best_us", 1e9))
        lines.append(
            f"{r['case']:<15} {r['batch']:>4} {r['cudnn_bf16_us']:>8.1f}us {t_bin:>6.1f}us "
            f"{r['binary_speedup']:>5.1f}x {r['binary_tops']:>6.0f} {r['binary_pct_peak']:>5.1f}% "
            f"{r['binary_pack_us']:>6.1f}us {r['binary_bits_us']:>6.1f}us "
            f"{t_pw:>7.1f}us {r['packed_w_speedup']:>5.1f}x  "
            f"{r.get('binary_best_cfg', '-')} / {r.get('packed_w_best_cfg', '-')}"
            f"  err {r['binary_err']:.1e}/{r['packed_w_err']:.1e}"
        )
    return "\n".join(lines)


def fmt_cpu(rows) -> str:
    head = f"{'case':<15} {'N':>4} {'F.conv2d fp32':>14} {'ref binary':>12} {'ref packed-w':>13} {'exact':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['case']:<15} {r['batch']:>4} {r['conv2d_fp32_us'] / 1e3:>11.1f} ms "
            f"{r['ref_binary_us'] / 1e3:>9.1f} ms {r['ref_packed_w_us'] / 1e3:>10.1f} ms "
            f"{str(r['ref_binary_exact']):>6}"
        )
    return "\n".join(lines)


def goals(rows) -> list[str]:
    out = []
    for r in rows:
        if r["batch"] == 128:
            ok = r["binary_speedup"] >= GOALS["binary_vs_cudnn_at_128"]
            out.append(
                f"goal fully binary >= 8x cuDNN bf16 at batch 128, {r['case']}: "
                f"{r['binary_speedup']:.1f}x {'MET' if ok else 'NOT MET'}"
            )
        if r["batch"] == 1:
            ok = r["packed_w_speedup"] >= GOALS["packed_weight_vs_cudnn_at_1"]
            out.append(
                f"goal packed-weight >= 3x cuDNN bf16 at batch 1, {r['case']}: "
                f"{r['packed_w_speedup']:.1f}x {'MET' if ok else 'NOT MET'}"
            )
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 16 128 (CPU: 1 16)")
    ap.add_argument("--cases", nargs="+", default=None, help=f"subset of {[c[0] for c in CASES]}")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here (default benchmarks/out/...)")
    ap.add_argument("--no-sweep", action="store_true", help="GPU: only the heuristic launch config")
    ap.add_argument("--emulate", action="store_true", help="GPU code path on the CPU host emulation (smoke test)")
    args = ap.parse_args(argv)
    on_gpu = torch.cuda.is_available() and os.environ.get("DBGEN_KERNELS", "auto") != "reference"
    dev, timer = "cuda", time_gpu
    if args.emulate:
        import tempfile

        from dbgen.kernels import cuda, ops

        cuda.set_emulator(cuda.load_library(cuda.build_emulator(Path(tempfile.mkdtemp(prefix="dbgen-emu-")))))
        ops.backend = lambda device: "cuda"  # CPU tensors go to the emulated kernels
        on_gpu, dev = True, "cpu"

        def timer(fn, reps=1, inner=1):
            return time_cpu(fn, 1), "emulated"

    batches = args.batches or ([1, 16, 128] if on_gpu else [1, 16])
    cases = [c for c in CASES if args.cases is None or c[0] in args.cases]
    if args.emulate:
        device = "host emulation (times meaningless)"
    elif on_gpu:
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "torch": torch.__version__,
        "device": device,
        "mode": "gpu kernels vs cuDNN bf16" if on_gpu else "CPU REFERENCE path vs F.conv2d fp32 (not the goal)",
    }
    rows = []
    for name, c, o, h, w, k, pad in cases:
        for n in batches:
            row = (
                bench_case_gpu(name, c, o, h, w, k, pad, n, not args.no_sweep, dev, timer)
                if on_gpu
                else bench_case_cpu(name, c, o, h, w, k, pad, n)
            )
            rows.append(row)
            print(f"done {name} batch {n}", file=sys.stderr, flush=True)
    print(f"# {meta['mode']} | {meta['device']} | torch {meta['torch']} | {meta['date']}")
    print(fmt_gpu(rows) if on_gpu else fmt_cpu(rows))
    summary = goals(rows) if on_gpu else []
    for line in summary:
        print(line)
    path = args.json or Path(__file__).parent / "out" / f"kernels_{'gpu' if on_gpu else 'cpu'}.json"
    write_atomic(path, json.dumps({"meta": meta, "rows": rows, "goals": summary}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
