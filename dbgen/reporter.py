"""Where every training event goes: the run's ``metrics.jsonl``, the workers' log lines and the Prometheus
exporter (:mod:`dbgen.metrics`), behind one object, :class:`Reporter`, that the trainer calls.

All ranks call every method (cheap); rank 0 writes the ``metrics.jsonl`` records (``kind``: train, eval,
checkpoint, samples, resume) and logs each as :func:`dbgen.console.format_record` words it (the driver prints
the same lines from the file); every rank feeds its own exporter.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .atomic import write_atomic
from .config import Config, config_hash
from .console import format_record
from .metrics import TrainMetrics
from .resources import disk_full_is_fatal
from .rundir import METRICS_FILE

__all__ = ["Reporter", "metrics_exporter", "restarts"]

log = logging.getLogger(__name__)


class Reporter:
    """The trainer's events: ``on_step``, ``on_interval``, ``on_eval``, ``on_checkpoint``, ``on_samples``,
    ``on_resume``; :meth:`close` at the end of the run stops the exporter's server."""

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        max_steps: int,
        world_size: int = 1,
        metrics: TrainMetrics | None = None,
        device: torch.device | None = None,
        resume_point: Callable[[], str] = lambda: "the same command resumes the run",
    ):
        self.run_dir, self.rank, self.max_steps, self.world_size = run_dir, rank, max_steps, world_size
        self.metrics_path = run_dir / METRICS_FILE
        self.metrics = metrics  # Prometheus exporter (dbgen.metrics); None records nothing
        self.device = device or torch.device("cpu")
        self.resume_point = resume_point  # words for a full disk's error: where the run resumes

    def _peak_memory_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    def _record(self, record: dict) -> None:
        if self.rank == 0:
            line = (json.dumps({"time": round(time.time(), 3), **record}) + "\n").encode()
            with (
                disk_full_is_fatal(self.metrics_path, METRICS_FILE, self.resume_point),
                open(self.metrics_path, "ab", buffering=0) as f,
            ):
                end = f.seek(0, os.SEEK_END)
                try:
                    written = 0
                    while written < len(line):
                        written += f.write(line[written:])
                except OSError:
                    os.ftruncate(f.fileno(), end)  # no torn line: every line in the file is a whole record
                    raise
            line = format_record(record, self.max_steps)
            if line is not None:
                log.info(line)

    def on_step(self, stats: dict) -> None:
        """Every optimizer step, every rank, with its stats as host numbers (:func:`dbgen.step.resolve_stats`);
        ``fit`` calls it for the interval's steps when it reads them, once per ``train.log_every`` steps."""
        if self.metrics is not None:
            self.metrics.record_step(stats, images=stats["images"] // self.world_size)

    def on_interval(self, rec: dict) -> None:
        """Every ``log_every`` steps with the interval's job-level numbers (bpd averaged over ranks)."""
        self._record({"kind": "train", **rec})
        if self.metrics is not None:
            self.metrics.record_interval(
                rec["bpd"],
                rec["step_s"],
                rec["images_per_s"] / self.world_size,
                rec["images_per_s"] if self.rank == 0 else None,
                self._peak_memory_bytes(),
            )

    def on_eval(self, step: int, bpd: float, rows: int, seconds: float) -> None:
        self._record({"kind": "eval", "step": step, "eval_bpd": bpd, "rows": rows, "seconds": round(seconds, 3)})
        if self.metrics is not None and bpd is not None:
            self.metrics.record_eval(bpd)

    def on_checkpoint(self, step: int, seconds: float, nbytes: int) -> None:
        """``nbytes``: the whole checkpoint (all ranks' files; the ranks write into one directory)."""
        self._record({"kind": "checkpoint", "step": step, "seconds": round(seconds, 3), "bytes": nbytes})
        if self.metrics is not None:
            self.metrics.record_checkpoint(seconds, nbytes)

    def on_samples(self, step: int, path: Path) -> None:
        self._record({"kind": "samples", "step": step, "path": str(path)})

    def on_resume(self, step: int, submission: str, restart: bool) -> None:
        """Before anything else is recorded: drop records of steps after the checkpoint (a failed attempt)."""
        if self.rank == 0 and self.metrics_path.exists():
            kept = [
                line
                for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step
            ]
            with disk_full_is_fatal(self.metrics_path, METRICS_FILE, self.resume_point):
                write_atomic(self.metrics_path, "".join(line + "\n" for line in kept))
        self._record({"kind": "resume", "step": step, "submission": submission, "restart": restart})

    def close(self) -> None:
        """The end of the run: stop the exporter's HTTP server (``train.metrics_port``), if any."""
        if self.metrics is not None:
            self.metrics.close()


def restarts(run_dir: Path, submission: str) -> list[int]:
    """Steps from which worker-group restarts of ``submission`` resumed (from the run's resume records)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [
        r["step"]
        for r in records
        if r.get("kind") == "resume" and r.get("submission") == submission and r.get("restart")
    ]


def metrics_exporter(cfg: Config, run: str, rank: int) -> TrainMetrics | None:
    """Prometheus metrics of this worker: on ``train.metrics_port`` if set, else through Ray's metrics agent
    when running inside Ray, else none (a bare process group, e.g. in unit tests)."""
    import ray  # here: a worker without a metrics port asks whether it runs inside Ray (Ray is heavy to import)

    if cfg.train.metrics_port is not None:
        backend = "http"
    elif ray.is_initialized():
        backend = "ray"
    else:
        return None
    return TrainMetrics(run, rank, cfg.model.name, config_hash(cfg), backend=backend, port=cfg.train.metrics_port)
