"""Pack / unpack speed of dbgen.nn.pack_signs on one CPU core (the paper RVAE has 54.53M binary weights).

python benchmarks/bench_packing.py [--numel 54530000] [--repeats 5] [--json out.json]
"""

import argparse
import json
import platform
import time

import torch

from dbgen.nn import pack_signs, unpack_signs


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--numel", type=int, default=54_530_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write results to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    w = torch.randn(args.numel, generator=torch.Generator().manual_seed(0))
    packed = pack_signs(w)
    assert torch.equal(unpack_signs(packed, w.shape), torch.where(w >= 0, 1.0, -1.0))
    result = {
        "numel": args.numel,
        "threads": torch.get_num_threads(),
        "pack_s": best_of(lambda: pack_signs(w), args.repeats),
        "unpack_s": best_of(lambda: unpack_signs(packed, w.shape), args.repeats),
        "packed_mb": packed.numel() / 1e6,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
    }
    print(f"{'numel':>12} {'pack s':>8} {'unpack s':>9} {'packed MB':>10}")
    print(f"{result['numel']:>12,} {result['pack_s']:>8.3f} {result['unpack_s']:>9.3f} {result['packed_mb']:>10.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
