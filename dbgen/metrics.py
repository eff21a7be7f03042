"""Prometheus metrics of throughput and training health, exported from every training worker.

One table (:data:`METRICS`) defines every metric; it drives both exporters and the table of docs/monitoring.md:

* ``ray`` (default inside Ray): ``ray.util.metrics``, served by each node's metrics agent (the port given to
  ``ray start --metrics-export-port``); Ray prefixes ``ray_`` and appends ``_total`` to counters.
* ``http``: ``prometheus_client`` on ``127.0.0.1:<port + worker rank>`` (``train.metrics_port=P``), for
  setups without a Ray metrics endpoint. Names are the same as the Ray ones
  (``ray_dbgen_...``), so one scrape config and one dashboard serve both.

Labels are bounded: ``run``, ``worker`` (rank), ``kind`` (a fixed set per metric); the info metric carries the
run's model name and config hash once.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

from .resources import port_taken_error
from .sync.accounting import KINDS as COMM_KINDS

log = logging.getLogger(__name__)

__all__ = ["METRICS", "Metric", "TrainMetrics", "exported_name", "metrics_markdown"]

PHASES = ("data_wait", "forward", "backward", "optimizer", "communication")


@dataclass(frozen=True)
class Metric:
    name: str  # without the ray_ prefix / _total suffix
    type: str  # counter | gauge
    labels: tuple[str, ...]
    unit: str
    help: str


METRICS = [
    Metric(
        "dbgen_run_info",
        "gauge",
        ("run", "model", "config_hash"),
        "1",
        "constant 1; labels name the run's model and config hash",
    ),
    Metric("dbgen_steps", "counter", ("run", "worker"), "steps", "optimizer steps taken (skipped ones included)"),
    Metric(
        "dbgen_skipped_steps",
        "counter",
        ("run", "worker"),
        "steps",
        "steps skipped because the global gradient norm exceeded train.skip_threshold or was not finite",
    ),
    Metric("dbgen_images", "counter", ("run", "worker"), "images", "training images processed by this worker"),
    Metric(
        "dbgen_images_per_second",
        "gauge",
        ("run", "worker"),
        "images/s",
        "this worker's training throughput over the last logging interval",
    ),
    Metric(
        "dbgen_job_images_per_second",
        "gauge",
        ("run",),
        "images/s",
        "whole-job training throughput (global batch / step time), set by rank 0",
    ),
    Metric("dbgen_step_seconds", "gauge", ("run", "worker"), "s", "mean wall time of one step, last interval"),
    Metric(
        "dbgen_step_phase_seconds",
        "counter",
        ("run", "worker", "kind"),
        "s",
        "time spent per step phase; kind: " + ", ".join(PHASES),
    ),
    Metric("dbgen_train_bpd", "gauge", ("run", "worker"), "bits/dim", "training loss of the last step"),
    Metric("dbgen_eval_bpd", "gauge", ("run",), "bits/dim", "bits/dim on the held-out split, last evaluation"),
    Metric("dbgen_grad_norm", "gauge", ("run", "worker"), "1", "global gradient norm before clipping, last step"),
    Metric("dbgen_learning_rate", "gauge", ("run", "worker"), "1", "learning rate of the last step"),
    Metric("dbgen_checkpoint_seconds", "gauge", ("run", "worker"), "s", "duration of the last checkpoint save"),
    Metric(
        "dbgen_checkpoint_bytes", "gauge", ("run", "worker"), "bytes", "size of the last checkpoint, all workers' files"
    ),
    Metric(
        "dbgen_comm_bytes",
        "counter",
        ("run", "worker", "kind"),
        "bytes",
        "bytes this worker sent in collectives; kind: " + ", ".join(COMM_KINDS),
    ),
    Metric(
        "dbgen_peak_memory_bytes",
        "gauge",
        ("run", "worker"),
        "bytes",
        "peak device memory (CUDA) or peak resident memory (CPU) of this worker",
    ),
]


def exported_name(m: Metric) -> str:
    """The name Prometheus stores: ``ray_`` prefix, ``_total`` on counters."""
    return "ray_" + m.name + ("_total" if m.type == "counter" else "")


def metrics_markdown() -> str:
    rows = ["| name | type | labels | unit | meaning |", "|---|---|---|---|---|"]
    for m in METRICS:
        rows.append(f"| `{exported_name(m)}` | {m.type} | {', '.join(m.labels)} | {m.unit} | {m.help} |")
    return "\n".join(rows)


class _RayBackend:
    def __init__(self):
        from ray.util import metrics as rm

        self._m = {}
        for m in METRICS:
            cls = rm.Counter if m.type == "counter" else rm.Gauge
            self._m[m.name] = cls(m.name, description=m.help, tag_keys=m.labels)

    def inc(self, name, value, labels):
        if value > 0:
            self._m[name].inc(float(value), tags=labels)

    def set(self, name, value, labels):
        self._m[name].set(float(value), tags=labels)


class _HttpBackend:
    def __init__(self, port: int, host: str = "127.0.0.1"):
        import prometheus_client as pc

        self.registry = pc.CollectorRegistry()
        self._m = {}
        for m in METRICS:
            cls = pc.Counter if m.type == "counter" else pc.Gauge
            self._m[m.name] = cls("ray_" + m.name, m.help, labelnames=m.labels, registry=self.registry)
        self.server, self.thread = pc.start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics served on http://%s:%d/metrics", host, port)

    def inc(self, name, value, labels):
        if value > 0:
            self._m[name].labels(**labels).inc(value)

    def set(self, name, value, labels):
        self._m[name].labels(**labels).set(value)

    def close(self):
        self.server.shutdown()  # stops serving ...
        self.server.server_close()  # ... and releases the port


class TrainMetrics:
    """Per-worker metric recorder. ``backend``: "ray", "http" (needs ``port``) or None (records nothing)."""

    def __init__(
        self, run: str, worker: int, model: str, config_hash: str, backend: str | None = "ray", port: int | None = None
    ):
        self.run, self.worker = run, int(worker)
        self._labels = {"run": run, "worker": str(worker)}
        if backend == "ray":
            self._b = _RayBackend()
        elif backend == "http":
            if port is None:
                raise ValueError("TrainMetrics(backend='http') needs a port")
            try:
                self._b = _HttpBackend(port + self.worker)
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
                raise port_taken_error(port + self.worker, self.worker, port) from None
        elif backend is None:
            self._b = None
        else:
            raise ValueError(f"metrics backend {backend!r}: expected 'ray', 'http' or None")
        if self._b is not None and self.worker == 0:
            self._b.set("dbgen_run_info", 1, {"run": run, "model": model, "config_hash": config_hash})

    def _inc(self, name, value, **extra):
        if self._b is not None:
            self._b.inc(name, value, {**self._labels, **extra})

    def _set(self, name, value, **extra):
        if self._b is not None:
            self._b.set(name, value, {**self._labels, **extra})

    def record_step(self, stats: dict, images: int) -> None:
        """One optimizer step of this worker: ``images`` it processed; ``stats`` keys (all optional):
        ``grad_norm``, ``lr``, ``skipped`` (bool), per-phase seconds ``t_<phase>`` for :data:`PHASES`, and
        ``comm_bytes`` (kind -> bytes sent since the last step)."""
        self._inc("dbgen_steps", 1)
        self._inc("dbgen_skipped_steps", int(bool(stats.get("skipped", False))))
        self._inc("dbgen_images", images)
        for phase in PHASES:
            self._inc("dbgen_step_phase_seconds", stats.get(f"t_{phase}", 0.0), kind=phase)
        for kind, nbytes in (stats.get("comm_bytes") or {}).items():
            self.add_comm_bytes(kind, nbytes)
        for key, name in (("grad_norm", "dbgen_grad_norm"), ("lr", "dbgen_learning_rate")):
            if key in stats and stats[key] is not None:
                self._set(name, stats[key])

    def record_interval(
        self,
        train_bpd: float,
        step_s: float,
        images_per_s: float,
        job_images_per_s: float | None,
        peak_memory_bytes: int,
    ) -> None:
        """Once per logging interval: loss, step time, this worker's and (rank 0) the job's throughput."""
        self._set("dbgen_train_bpd", train_bpd)
        self._set("dbgen_step_seconds", step_s)
        self._set("dbgen_images_per_second", images_per_s)
        self._set("dbgen_peak_memory_bytes", peak_memory_bytes)
        if job_images_per_s is not None and self._b is not None:
            self._b.set("dbgen_job_images_per_second", job_images_per_s, {"run": self.run})

    def record_eval(self, bpd: float) -> None:
        if self._b is not None:
            self._b.set("dbgen_eval_bpd", bpd, {"run": self.run})

    def record_checkpoint(self, seconds: float, nbytes: int) -> None:
        self._set("dbgen_checkpoint_seconds", seconds)
        self._set("dbgen_checkpoint_bytes", nbytes)

    def add_comm_bytes(self, kind: str, nbytes: int) -> None:
        if kind not in COMM_KINDS:
            raise ValueError(f"comm bytes kind {kind!r}: expected one of {COMM_KINDS}")
        self._inc("dbgen_comm_bytes", nbytes, kind=kind)

    def close(self) -> None:
        """The end of the run (the trainer's ``fit``): stop the HTTP server, if this exporter runs one."""
        if isinstance(self._b, _HttpBackend):
            self._b.close()
