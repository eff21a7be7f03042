"""What the training driver prints: one header, dbgen's own step/eval/checkpoint/sample lines, a progress bar on
a terminal, and the final summary.

The workers' own output (DeepSpeed, Ray Train's per-rank reports, Ray Data's progress bars) stays in Ray's log
files (``<ray temp dir>/session_latest/logs``) unless ``--verbose`` or ``DBGEN_VERBOSE=1`` streams it to the
driver as well. dbgen's lines do not depend on that stream: rank 0 records every event in the run's
``metrics.jsonl`` and :class:`MetricsFollower` prints each new record there, so the console reads the same under
``python -m dbgen.train``, ``scripts/demo.sh`` and ``ray job submit`` (whose job log is the driver's output).
One function, :func:`format_record`, words a record, for the driver's console and the workers' log files alike.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
from pathlib import Path

from .rundir import METRICS_FILE

__all__ = ["MetricsFollower", "format_record", "setup_logging", "verbose_from_env"]

log = logging.getLogger("dbgen")


def verbose_from_env() -> bool:
    return os.environ.get("DBGEN_VERBOSE", "").strip().lower() in ("1", "true", "yes", "on")


class _Format(logging.Formatter):
    """``HH:MM:SS message`` for dbgen's info lines; level and logger name for everything else."""

    def format(self, record: logging.LogRecord) -> str:
        self._style._fmt = (
            "%(asctime)s %(message)s"
            if record.levelno == logging.INFO and record.name.startswith("dbgen")
            else "%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        return super().format(record)


def setup_logging(verbose: bool) -> None:
    """The driver's console: dbgen's info lines; other libraries' warnings and errors (info too if verbose)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format(datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("dbgen").setLevel(logging.INFO)


def _eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_record(rec: dict, max_steps: int) -> str | None:
    """The console line of one ``metrics.jsonl`` record (None for kinds that get no line)."""
    kind = rec.get("kind")
    if kind == "train":
        return (
            f"step {rec['step']:>{len(str(max_steps))}}/{max_steps} | bpd {rec['bpd']:.4f} | "
            f"{rec['images_per_s']:.0f} img/s | grad norm {rec['grad_norm']:.3g} | lr {rec['lr']:.3g} | "
            f"skipped {rec['skipped']} | eta {_eta(rec['eta_s'])}"
        )
    if kind == "eval":
        bpd = "n/a" if rec["eval_bpd"] is None else f"{rec['eval_bpd']:.4f}"
        return f"step {rec['step']} | eval bpd {bpd} on {rec['rows']} rows ({rec['seconds']:.1f}s)"
    if kind == "checkpoint":
        return f"step {rec['step']} | checkpoint {rec['bytes'] / 1e6:.1f} MB in {rec['seconds']:.1f}s"
    if kind == "samples":
        return f"step {rec['step']} | samples {rec['path']}"
    if kind == "resume":
        how = "after a worker failure (worker group restarted)" if rec["restart"] else "from an earlier submission"
        return f"resumed at step {rec['step']} {how}"
    return None


class MetricsFollower:
    """Prints each record rank 0 appends to ``metrics.jsonl``, as :func:`format_record` words it; on a terminal
    under a progress bar. Records present when it starts (an earlier submission's) are not printed again, nor
    are they when a resume rewrites the file (it drops records of steps after the restored checkpoint)."""

    def __init__(self, run_dir: Path, max_steps: int, progress: bool | None = None, poll_s: float = 0.5):
        self.path = Path(run_dir) / METRICS_FILE
        self.max_steps, self.poll_s = max_steps, poll_s
        self._inode, self._offset = None, 0  # where the complete lines read so far end
        self._seen = set(self._new_lines())
        self._stop = threading.Event()
        self._bar = None
        if progress if progress is not None else sys.stderr.isatty():
            from tqdm import tqdm  # here: only a terminal gets a bar

            self._bar = tqdm(total=max_steps, unit="step", file=sys.stderr, leave=False, dynamic_ncols=True)
        self._thread = threading.Thread(target=self._run, name="metrics-follower", daemon=True)

    def _new_lines(self) -> list[str]:
        """Complete lines appended since the last call (a partial last line waits). Reads only the new bytes,
        unless the file was replaced (a resume rewrites it atomically: a new inode), then all of it again."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return []
        if st.st_ino != self._inode or st.st_size < self._offset:
            self._inode, self._offset = st.st_ino, 0
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        return [line for line in complete.decode().split("\n") if line.strip()]

    def poll(self) -> None:
        for line in self._new_lines():
            if line in self._seen:
                continue
            self._seen.add(line)
            rec = json.loads(line)
            text = format_record(rec, self.max_steps)
            if self._bar is not None and rec.get("kind") in ("train", "resume"):
                self._bar.n = rec["step"]
                if rec.get("kind") == "train":
                    self._bar.set_postfix(bpd=f"{rec['bpd']:.3f}", refresh=False)
                self._bar.refresh()
            if text is not None:
                if self._bar is not None:
                    self._bar.clear()
                log.info(text)
                if self._bar is not None:
                    self._bar.refresh()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def __enter__(self) -> MetricsFollower:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.poll()  # whatever the last interval wrote
        if self._bar is not None:
            self._bar.close()
