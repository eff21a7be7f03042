"""``python -m dbgen.bench data``: data pipeline throughput and memory.

Measures, on a converted split (``--data DIR``):

* ``reader``: the raw Arrow reader, every row group of every shard in storage order -> (n, R*R*C) uint8 numpy
  (what both loader backends do per read unit), single process;
* ``loader_arrow``: :class:`dbgen.data.TrainLoader` with ``backend="arrow"`` (planned order, shuffle window,
  HWC -> NCHW tensors), single process;
* ``ray``: ``--workers N`` Ray actors (0.25 CPU each), each a rank of ``TrainLoader(backend="ray")`` reading
  its share of one epoch through Ray Data, after a warm-up pass that starts the Ray worker processes;
* RSS of this process, sampled while the reader and the arrow loader stream (start / end / peak) and of each
  Ray rank (peak).

``--page-checksums compare`` measures instead what checking every page's CRC32 on every read would cost (see
:mod:`dbgen.data.split`): the reader and the arrow loader with page verification off (what the loaders do)
and on, alternating ``--repeats`` times (so a change of machine load hits both alike), medians and the on/off
throughput ratio of one run, in images per wall second and per CPU second; and, for comparison, the seconds the
loaders' actual check takes (every shard's sha256, once per process). ``--page-checksums on`` runs the reader
and arrow loader with page verification (the Ray ranks never: their reads run in other processes).

``--synthetic-rows N`` first generates N random 32x32 rows as downsampled-ImageNet batch files (128,116 rows
per file like the real ImageNet32) under ``--data`` and converts them with the converter (timed, in a child
process whose peak RSS is reported apart), benchmarks the result and deletes everything it generated
(``--keep`` keeps it).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import resource
import shutil
import time
from pathlib import Path

import numpy as np

from ..atomic import sha256_file
from ..data import DataError, EvalLoader, TrainLoader, convert, open_split
from ..data import split as split_format
from ..data.loader import _cached_unit
from ..data.split import read_unit
from ..ray_local import init_ray

log = logging.getLogger(__name__)

ROWS_PER_IMAGENET_FILE = 128_116


def add_arguments(p) -> None:
    p.add_argument("--data", required=True, help="split directory (or work directory with --synthetic-rows)")
    p.add_argument("--workers", type=int, default=1, help="Ray ranks for the Ray Data measurement (0: skip)")
    p.add_argument("--batch-size", type=int, default=256, help="rows per batch and rank")
    p.add_argument("--shuffle-buffer", type=int, default=10_000)
    p.add_argument("--max-rows", type=int, default=None, help="stop each measurement after about this many rows")
    p.add_argument(
        "--synthetic-rows",
        type=int,
        default=None,
        help="generate and convert this many random 32x32 rows under --data first",
    )
    p.add_argument("--keep", action="store_true", help="keep the generated synthetic data")
    p.add_argument(
        "--page-checksums",
        choices=("off", "on", "compare"),
        default="off",
        help="check page CRCs on every read (reader and arrow loader); compare: measure what that "
        "costs, off vs on, alternating --repeats times",
    )
    p.add_argument("--repeats", type=int, default=5, help="rounds of off/on for --page-checksums compare")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def rss_mb() -> dict:
    """Resident memory of this process in MiB: total, private (anon) and shared memory (shmem; Ray's object
    store pages mapped into this process count here)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssShmem"):
                fields[key] = round(int(value.split()[0]) / 1024, 1)  # kB
    return {"rss": fields["VmRSS"], "anon": fields["RssAnon"], "shmem": fields["RssShmem"]}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


class RssTrace:
    """RSS while streaming: at the start and after each quarter of the rows, to show it stays flat."""

    def __init__(self, total: int):
        self.total, self.samples, self.next = total, {"start": rss_mb()}, 1

    def progress(self, done: int) -> None:
        while self.next <= 4 and done >= self.next * self.total / 4:
            self.samples[f"{25 * self.next}%"] = rss_mb()
            self.next += 1

    def summary(self) -> dict:
        return self.samples


def bench_reader(split, max_rows: int | None) -> dict:
    total = min(split.num_rows, max_rows or split.num_rows)
    trace, rows, t0, cpu0 = RssTrace(total), 0, time.perf_counter(), time.process_time()
    for shard, group, _, _ in split.units():
        x = read_unit(split, shard, group)  # (n, R*R*C) uint8
        rows += len(x)
        trace.progress(rows)
        if rows >= total:
            break
    dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {
        "rows": rows,
        "seconds": round(dt, 3),
        "images_per_s": round(rows / dt),
        "images_per_cpu_s": round(rows / cpu),
        "rss_mb": trace.summary(),
    }


def bench_arrow_loader(split, batch_size: int, shuffle_buffer: int, max_rows: int | None) -> dict:
    loader = TrainLoader(
        split, batch_size=batch_size, shuffle_buffer=shuffle_buffer, backend="arrow", rank=0, world_size=1
    )
    n = len(loader) if not max_rows else min(len(loader), -(-max_rows // batch_size))
    trace, t0, cpu0, it = RssTrace(n), time.perf_counter(), time.process_time(), iter(loader)
    for i in range(n):
        next(it)
        trace.progress(i + 1)
    dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {
        "rows": n * batch_size,
        "seconds": round(dt, 3),
        "images_per_s": round(n * batch_size / dt),
        "images_per_cpu_s": round(n * batch_size / cpu),
        "rss_mb": trace.summary(),
    }


def _ray_rank(
    split_dir: str, rank: int, world: int, batch_size: int, shuffle_buffer: int, max_rows: int | None
) -> dict:
    """One Ray rank: warm up (starts the read workers), then time one epoch of its share."""
    for _ in EvalLoader(split_dir, batch_size=batch_size, rank=rank, world_size=max(world, 64), backend="ray"):
        pass  # warm-up: a small slice through the same Ray Data path
    loader = TrainLoader(
        split_dir, batch_size=batch_size, shuffle_buffer=shuffle_buffer, rank=rank, world_size=world, backend="ray"
    )
    n = len(loader) if not max_rows else min(len(loader), -(-max_rows // (batch_size * world)))
    trace, t0, it = RssTrace(n), time.perf_counter(), iter(loader)
    for i in range(n):
        next(it)
        trace.progress(i + 1)
    dt = time.perf_counter() - t0
    return {
        "rank": rank,
        "rows": n * batch_size,
        "seconds": round(dt, 3),
        "images_per_s": round(n * batch_size / dt),
        "rss_mb": trace.summary(),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def bench_ray(split_dir: str, workers: int, batch_size: int, shuffle_buffer: int, max_rows: int | None) -> dict:
    import ray  # here: only the Ray Data measurement needs Ray

    started = not ray.is_initialized()
    if started:
        init_ray(include_dashboard=False, log_to_driver=False)
    try:
        rank_fn = ray.remote(num_cpus=0.25)(_ray_rank)
        t0 = time.perf_counter()
        results = ray.get(
            [rank_fn.remote(split_dir, r, workers, batch_size, shuffle_buffer, max_rows) for r in range(workers)]
        )
        wall = time.perf_counter() - t0
    finally:
        if started:
            ray.shutdown()
    rows = sum(r["rows"] for r in results)
    return {
        "workers": workers,
        "per_worker": results,
        "images_per_s_per_worker": round(float(np.mean([r["images_per_s"] for r in results]))),
        "images_per_s_total": round(sum(r["images_per_s"] for r in results)),
        "rows": rows,
        "wall_seconds_with_warmup": round(wall, 1),
    }


def compare_page_checksums(split, batch_size: int, shuffle_buffer: int, max_rows: int | None, repeats: int) -> dict:
    """Throughput of the reader and the arrow loader with page verification off and on, alternating: images
    per wall second and per CPU second of this process (all its threads; less moved by other jobs). Also the
    loaders' own check: every shard's sha256 (median seconds, wall and CPU)."""
    if not split.page_checksums:
        raise DataError(f"{split.path}: written without page checksums; convert it again to compare")
    runs = {
        (path, unit, mode): []
        for path in ("reader", "loader_arrow")
        for unit in ("images_per_s", "images_per_cpu_s")
        for mode in ("off", "on")
    }
    try:
        for _ in range(repeats):
            for mode in ("off", "on"):
                split_format.PAGE_CHECKSUM_VERIFICATION = mode == "on"
                _cached_unit.cache_clear()  # the loader's few cached row groups were read in the other mode
                results = {
                    "reader": bench_reader(split, max_rows),
                    "loader_arrow": bench_arrow_loader(split, batch_size, shuffle_buffer, max_rows),
                }
                for (path, unit, m), values in runs.items():
                    if m == mode:
                        values.append(results[path][unit])
    finally:
        split_format.PAGE_CHECKSUM_VERIFICATION = False
    sha_wall, sha_cpu = [], []
    for _ in range(repeats):
        t0, cpu0 = time.perf_counter(), time.process_time()
        for s in split.shards:  # what check_shards does in a fresh process
            sha256_file(s.path)
        sha_wall.append(time.perf_counter() - t0)
        sha_cpu.append(time.process_time() - cpu0)
    out = {
        "sha256_once": {"wall_s": round(float(np.median(sha_wall)), 3), "cpu_s": round(float(np.median(sha_cpu)), 3)}
    }
    for path in ("reader", "loader_arrow"):
        for unit in ("images_per_s", "images_per_cpu_s"):
            off, on = runs[path, unit, "off"], runs[path, unit, "on"]
            out[f"{path} {unit}"] = {
                "off": off,
                "on": on,
                "median_off": round(float(np.median(off))),
                "median_on": round(float(np.median(on))),
                "on_off_ratio": round(float(np.median(on) / np.median(off)), 3),
            }
    return out


def make_synthetic(work: Path, rows: int) -> tuple[Path, dict]:
    """:func:`_synthetic` in a child process, so that this process's peak RSS is the streaming's alone."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_synthetic, work, rows).result()


def _synthetic(work: Path, rows: int) -> tuple[Path, dict]:
    """Random 32x32 downsampled-ImageNet batch files -> converted split; returns it and the timings."""
    src = work / "src"
    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for i, start in enumerate(range(0, rows, ROWS_PER_IMAGENET_FILE), 1):
        n = min(ROWS_PER_IMAGENET_FILE, rows - start)
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)  # planar R, G, B rows
        np.savez(src / f"train_data_batch_{i}.npz", data=data, labels=rng.integers(1, 1001, n))
        del data
    generated = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = convert("imagenet-batches", src, work / "split", overwrite=True)
    converted = time.perf_counter() - t0
    shutil.rmtree(src)
    return out, {
        "rows": rows,
        "generate_s": round(generated, 1),
        "convert_s": round(converted, 1),
        "convert_rows_per_s": round(rows / converted),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def main(args) -> int:
    synthetic, work = None, Path(args.data)
    try:
        if args.synthetic_rows:
            split_dir, synthetic = make_synthetic(work, args.synthetic_rows)
        else:
            split_dir = work
        split = open_split(split_dir)
        res = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": f"{platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
            f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB",
            "data": str(split.path),
            "rows": split.num_rows,
            "resolution": split.resolution,
            "bytes": sum(s.bytes for s in split.shards),
            "synthetic": synthetic,
        }
        if args.page_checksums == "compare":
            res["page_checksums"] = compare_page_checksums(
                split, args.batch_size, args.shuffle_buffer, args.max_rows, args.repeats
            )
            return _print_page_checksums(res, args.json)
        split_format.PAGE_CHECKSUM_VERIFICATION = args.page_checksums == "on"
        res["page_checksums"] = args.page_checksums
        res["reader"] = bench_reader(split, args.max_rows)
        res["loader_arrow"] = bench_arrow_loader(split, args.batch_size, args.shuffle_buffer, args.max_rows)
        split_format.PAGE_CHECKSUM_VERIFICATION = False
        if args.workers > 0:
            res["ray"] = bench_ray(str(split.path), args.workers, args.batch_size, args.shuffle_buffer, args.max_rows)
    finally:
        if synthetic is not None and not args.keep:
            shutil.rmtree(work / "split", ignore_errors=True)
    res["reader_images_per_s"] = res["reader"]["images_per_s"]
    res["loader_arrow_images_per_s"] = res["loader_arrow"]["images_per_s"]
    res["ray_images_per_s_per_worker"] = res["ray"]["images_per_s_per_worker"] if "ray" in res else None
    res["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if args.json:
        print(json.dumps(res))
        return 0
    print(
        f"{res['data']}: {res['rows']:,} rows {res['resolution']}x{res['resolution']}, "
        f"{res['bytes'] / 2**30:.2f} GiB ({res['machine']})"
    )
    if synthetic:
        print(
            f"synthetic: generated in {synthetic['generate_s']} s, converted in {synthetic['convert_s']} s "
            f"({synthetic['convert_rows_per_s']:,} rows/s), peak RSS {synthetic['peak_rss_mb']} MiB"
        )
    print(f"{'path':<16}{'rows':>11}{'images/s':>10}   RSS MiB (private anon + shared) at start, 25/50/75/100%")
    ranks = [(f"ray rank {r['rank']}", r) for r in res["ray"]["per_worker"]] if "ray" in res else []
    for name, r in [("reader", res["reader"]), ("loader_arrow", res["loader_arrow"])] + ranks:
        rss = "  ".join(f"{v['anon']:.0f}+{v['shmem']:.0f}" for v in r["rss_mb"].values())
        print(f"{name:<16}{r['rows']:>11,}{r['images_per_s']:>10,}   {rss}")
    print(f"peak RSS of this process: {res['peak_rss_mb']} MiB")
    return 0


def _print_page_checksums(res: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps(res))
        return 0
    print(
        f"{res['data']}: {res['rows']:,} rows {res['resolution']}x{res['resolution']}, "
        f"{res['bytes'] / 2**30:.2f} GiB ({res['machine']})"
    )
    results = dict(res["page_checksums"])
    sha = results.pop("sha256_once")
    print(f"{'path':<30}{'median off':>12}{'median on':>11}{'on/off':>8}   per round (off | on)")
    for path, r in results.items():
        print(
            f"{path:<30}{r['median_off']:>12,}{r['median_on']:>11,}{r['on_off_ratio']:>8.3f}   "
            f"{' '.join(f'{v:,}' for v in r['off'])} | {' '.join(f'{v:,}' for v in r['on'])}"
        )
    print(f"sha256 of every shard (the loaders' check, once per process): {sha['wall_s']} s wall, {sha['cpu_s']} s CPU")
    return 0
