"""``python -m dbgen.bench scale [--small] [--json-out F]``: sharded state at scale, through ``python -m dbgen.train``.

Trains a binary RVAE of about 300M parameters (``configs/rvae_cifar10_wide_binary.yaml`` at width 480, or
``--width``: 24 stochastic layers) for a few steps with 2 CPU workers (``--workers``), once per mode of ``--modes``:
``dp`` (``comm.binary_weights=dp``), ``packed-floats`` (``packed`` holding +-1 floats,
``comm.resident_bits=false``) and ``packed`` (resident bits), and compares each worker's peak memory and bytes
sent per step with the planner (:func:`dbgen.memory.plan_memory`). ``--small`` runs the same on the tiny binary
RVAE (what the slow test runs).

Measured, per worker (the Ray Train worker processes, found as descendants of the ``dbgen.train`` driver and
matched to the pids in ``summary.json``):

* peak memory: the process's resident high-water mark (``/proc/<pid>/status`` ``VmHWM``), polled every 0.1 s:
  ``peak_rss`` as read just after the worker's step counter shows its last step (``peak_through_step``: the
  training steps' peak, before the final checkpoint's save, which serializes the state and peaks higher:
  ``run_peak_rss``, the whole run); ``model_peak`` subtracts the framework's share (Python, torch, Ray,
  DeepSpeed, loader): the peak of a worker training the tiny RVAE (made first in the same invocation);
* bytes sent per step: the worker's ``ray_dbgen_comm_bytes_total`` Prometheus counters (``train.metrics_port``),
  read between the second and the last step (the first also carries the initial broadcast).

Before each run the planner's total for both workers (plus 3 GiB for Ray and the framework) is checked against
``MemAvailable``; a run that would not fit is refused unless ``--force``.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from ..memory import plan_memory, proc_status_bytes

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
FULL = (ROOT / "configs" / "rvae_cifar10_wide_binary.yaml", [])
SMALL = (ROOT / "configs" / "rvae_binary_tiny.yaml", [])
MODES = {  # the planner's mode names -> config overrides
    "dp": ["comm.binary_weights=dp"],
    "packed-floats": ["comm.binary_weights=packed", "comm.resident_bits=false"],
    "packed": ["comm.binary_weights=packed", "comm.resident_bits=true"],
}
MARGIN = 3 * 2**30
COUNTER = re.compile(r"^ray_dbgen_(comm_bytes|steps)_total\{([^}]*)\} ([0-9.e+]+)$", re.M)


def add_arguments(p) -> None:
    p.add_argument("--small", action="store_true", help="the tiny binary RVAE instead of the ~300M one")
    p.add_argument("--width", type=int, default=480, help="model.width of the wide RVAE (480: ~300M parameters)")
    p.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)} (dp always runs small)"
    )
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=2, help="global batch (1 row per worker by default)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--port", type=int, default=29650, help="Prometheus port of rank 0 (rank r: port + r)")
    p.add_argument("--storage", default=None, help="run directories (default: a temporary directory)")
    p.add_argument("--force", action="store_true", help="run even if the planner says it does not fit")
    p.add_argument(
        "--no-plan",
        action="store_true",
        help="skip the planner (it measures a step of the model on this CPU: minutes at a billion parameters)",
    )
    p.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=None,
        help="MALLOC_MMAP_THRESHOLD_ for the run (glibc: tensors above it go back to the system when "
        "freed; by default glibc raises it up to 32 MiB and keeps smaller freed tensors in its heap)",
    )
    p.add_argument("--json-out", default=None)


def _mem_available() -> int:
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"MemAvailable:\s+(\d+) kB", text)[1]) * 1024


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.extend(tree.get(p, []))
        todo.extend(tree.get(p, []))
    return out


def _counters(port: int) -> dict | None:
    """``{"steps": n, "bytes": {kind: n}}`` from one worker's exporter, None if it is not serving."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
            text = r.read().decode()
    except (OSError, http.client.HTTPException):  # not serving yet, or closing
        return None
    out = {"steps": 0, "bytes": {}}
    for name, labels, value in COUNTER.findall(text):
        if name == "steps":
            out["steps"] = int(float(value))
        else:
            kind = re.search(r'kind="([^"]+)"', labels)[1]
            out["bytes"][kind] = int(float(value))
    return out


def run_mode(config: Path, overrides: list[str], mode: str, args, storage: Path, steps: int) -> dict:
    """One ``python -m dbgen.train`` run; its workers' peak memory and bytes per step."""
    name = f"scale-{'small' if args.small else 'full'}-{mode}-{int(time.time())}"
    cmd = [
        sys.executable,
        "-m",
        "dbgen.train",
        "--config",
        str(config),
        "--name",
        name,
        "--storage",
        str(storage),
        *overrides,
        *MODES[mode],
        f"scale.num_workers={args.workers}",
        f"train.batch_size={args.batch}",
        f"train.max_steps={steps}",
        "train.init_batch_size=2",
        "train.log_every=1",
        "train.num_samples=0",
        "train.checkpoint_every=0",
        "train.eval_every=0",
        "train.sample_every=0",
        "data.shuffle_buffer=64",
        "data.loader=arrow",
        "data.train=builtin:photos32",
        "data.eval=null",  # no eval: the check is about the training step
        f"train.metrics_port={args.port}",
    ]
    log.info("%s", " ".join(cmd))
    log_path = storage / f"{name}.log"  # a file, not a pipe: nothing here reads while the run goes on
    storage.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as out:
        env = dict(os.environ)
        if args.malloc_mmap_threshold is not None:
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)  # Ray's workers inherit it
        driver = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    peaks: dict[int, int] = {}  # pid -> VmHWM over the whole run (the final checkpoint included)
    # rank -> (its step counter, {pid: VmHWM}) read after the counter: the training steps' peak, kept up to date
    # until the counter shows the last step (then frozen: the final checkpoint's save comes after)
    step_peaks: dict[int, tuple[int, dict[int, int]]] = {}
    readings: list[list[dict]] = [[] for _ in range(args.workers)]
    try:
        while driver.poll() is None:
            hwms = {pid: proc_status_bytes("VmHWM", pid) for pid in _descendants(driver.pid)}
            for pid, hwm in hwms.items():
                if hwm is not None:
                    peaks[pid] = max(peaks.get(pid, 0), hwm)
            for r in range(args.workers):
                c = _counters(args.port + r)
                if c is not None and (not readings[r] or c["steps"] != readings[r][-1]["steps"]):
                    readings[r].append(c)
                if c is not None and c["steps"] >= 1 and step_peaks.get(r, (0,))[0] < steps:
                    step_peaks[r] = (c["steps"], {pid: proc_status_bytes("VmHWM", pid) for pid in hwms})
            time.sleep(0.1)
    finally:
        if driver.poll() is None:  # this loop failed: stop the run it started
            driver.kill()
            driver.wait()
    if driver.returncode != 0:
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"dbgen.train ({mode}) failed with code {driver.returncode} ({log_path}):\n{tail}")
    summary = json.loads((storage / name / "summary.json").read_text())
    workers = []
    for w in sorted(summary["workers"], key=lambda w: w["rank"]):
        seen = [c for c in readings[w["rank"]] if c["steps"] >= 1]
        first, last = (seen[0], seen[-1]) if seen else (None, None)
        per_step, by_kind = None, None
        if first is not None and last["steps"] > first["steps"]:
            n = last["steps"] - first["steps"]
            by_kind = {k: (v - first["bytes"].get(k, 0)) // n for k, v in last["bytes"].items()}
            per_step = sum(by_kind.values())
        peak_step, step_hwms = step_peaks.get(w["rank"], (None, {}))
        step_peak = step_hwms.get(w["pid"])
        workers.append(
            {
                "rank": w["rank"],
                "pid": w["pid"],
                "peak_rss": step_peak,
                "run_peak_rss": peaks.get(w["pid"]),
                "peak_through_step": peak_step,
                "bytes_per_step": per_step,
                "bytes_per_step_by_kind": by_kind,
            }
        )
    return {"mode": mode, "run": name, "workers": workers, "final_train_bpd": summary["final_train_bpd"]}


def main(args) -> int:
    storage = Path(args.storage or tempfile.mkdtemp(prefix="dbgen-scale-"))
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        raise SystemExit(f"error: --modes: unknown {unknown}; expected some of {', '.join(MODES)}")
    full = (FULL[0], [*FULL[1], f"model.width={args.width}"])
    cases = [("small", *SMALL)] + ([] if args.small else [("full", *full)])
    result = {"workers": args.workers, "batch": args.batch, "steps": args.steps, "width": args.width, "runs": {}}
    for size, config, overrides in cases:
        plan = (
            None
            if args.no_plan and size == "full"
            else plan_memory(config, overrides, workers=args.workers, batch=args.batch)
        )
        planned = {m.mode: m for m in plan.modes} if plan else {}
        for mode in modes if size == "full" or args.small else ("dp",):
            need = args.workers * planned[mode].total + MARGIN if plan else 0
            if need > _mem_available() and not args.force:
                raise SystemExit(
                    f"error: {size} {mode}: the planner needs {need / 2**30:.1f} GiB "
                    f"({args.workers} x {planned[mode].total / 2**30:.2f} + 3 GiB), "
                    f"{_mem_available() / 2**30:.1f} GiB available (--force runs it anyway)"
                )
            # the tiny model's steps take milliseconds: enough of them for the counters to be read mid-run
            steps = args.steps if size == "full" else max(args.steps, 20)
            run = run_mode(config, overrides, mode, args, storage, steps)
            run["planned"] = {k: v for k, v in vars(planned[mode]).items() if isinstance(v, int)} if plan else None
            if plan:
                run["params"], run["binary_params"] = plan.params, plan.binary_params
            result["runs"][f"{size}-{mode}"] = run
    baseline = max(w["peak_rss"] for w in result["runs"]["small-dp"]["workers"])
    result["framework_rss"] = baseline
    print(
        f"{'run':14s} {'rank':>4s} {'peak RSS MiB':>13s} {'- framework':>12s} {'planned MiB':>12s} "
        f"{'ratio':>6s} {'run peak MiB':>13s} {'bytes/step':>14s}"
    )
    for key, run in result["runs"].items():
        for w in run["workers"]:
            model_peak = w["peak_rss"] - baseline
            w["model_peak"] = model_peak
            total = run["planned"]["total"] if run["planned"] else float("nan")
            ratio = model_peak / total if key != "small-dp" else float("nan")
            print(
                f"{key:14s} {w['rank']:>4d} {w['peak_rss'] / 2**20:>13.1f} {model_peak / 2**20:>12.1f} "
                f"{total / 2**20:>12.1f} {ratio:>6.2f} {w['run_peak_rss'] / 2**20:>13.1f} "
                f"{w['bytes_per_step'] or 0:>14,}"
            )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    return 0
