"""``python -m dbgen.train --config C [dotted.key=value ...] [--name RUN] [--storage DIR]``: the driver.

* Loads and checks the config, resolves the data splits (building ``builtin:`` data on first use) and checks
  the run directory, all before any Ray worker starts: a bad config or a missing data path exits with code 2
  and a message naming the key or path.
* Connects to Ray: to ``RAY_ADDRESS`` when set (``ray job submit`` sets it for the entrypoint; ``RAY_ADDRESS=auto``
  picks up a cluster started with ``ray start`` on this host), otherwise it starts a local Ray on this machine
  with the dashboard on 127.0.0.1.
* Runs a Ray Train ``TorchTrainer`` of ``scale.num_workers`` workers, each running
  :func:`dbgen.trainer.train_worker` (a DeepSpeed engine per worker), with ``scale.cpus_per_worker`` CPUs
  (and one GPU with ``scale.use_gpu``) per worker and ``FailureConfig(max_failures=scale.max_failures)``.
* The run directory is ``<storage>/<name>``. Re-running with the same ``--name`` and ``--storage`` resumes
  from its newest intact checkpoint taken from finite weights (e.g. with a larger ``train.max_steps``); a
  damaged newer one is named and skipped (:func:`dbgen.rundir.choose_checkpoint`, the same choice the workers make).
  With several nodes the storage directory (and the data) must be on a file system every node sees at the
  same path: every worker writes its part of a checkpoint there.
* One driver per run: the driver holds the run's lease (:mod:`dbgen.lease`) from before it writes anything until
  it exits; a second driver on the same run exits 2 naming the holder (``--takeover`` once it is known gone).
* Failures: a worker death is retried from the last checkpoint up to ``scale.max_failures`` times; bad data,
  a bad checkpoint, a bad config or a diverged run (``train.max_bad_steps``) fail at once (exit 1,
  :mod:`dbgen.failures`). SIGINT/SIGTERM stop the workers at their next logging interval and exit 130/143
  with a line saying where the run resumes; a second signal stops at once.

Outputs in the run directory (its layout is :mod:`dbgen.rundir`'s): ``config.yaml``, ``metrics.jsonl``,
``samples/step_*.png``, ``checkpoint_*/``, ``summary.json``; the console shows a header, dbgen's
step/eval/checkpoint/sample lines and the summary (:mod:`dbgen.console`; ``--verbose`` or ``DBGEN_VERBOSE=1``
adds the workers' own output).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import torch
import yaml

from .config import Config, ConfigError, load_config, micro_batch_size, schema_markdown
from .console import MetricsFollower, setup_logging, verbose_from_env
from .data import DataError, open_split, ray_data_config, ray_datasets, resolve_split
from .failures import fatal_error, torch_trainer
from .lease import RunInUse, RunLease
from .models import build
from .nn import size_report
from .ray_local import connect_ray
from .resources import free_bytes
from .rundir import (
    SUMMARY_FILE,
    RunError,
    check_resume,
    checkpoint_bytes,
    choose_checkpoint,
    remove_partial_checkpoints,
    resume_words,
)
from .trainer import train_worker

log = logging.getLogger("dbgen.train")

DEFAULT_STORAGE = "~/dbgen-runs"


class RunSetupError(ValueError):
    """The run cannot start (data, storage, resume mismatch); the message names the path or key."""


# ------------------------------------------------------------------------------------------- preflight
def prepare(cfg: Config, name: str, storage: str | Path, *, takeover: bool = False) -> dict:
    """All checks that need no Ray (the config checked itself when it was loaded): the data splits, the run
    directory's lease (:mod:`dbgen.lease`: one driver per run; ``takeover`` as ``--takeover``) and, when the
    run holds a checkpoint, whether ``cfg`` can resume it. Returns the paths the workers get and ``"lease"``,
    the :class:`RunLease` held from here on (:func:`run` releases it); raises :class:`RunSetupError`."""
    try:
        train_dir = str(resolve_split(cfg.data.train, "train"))
    except DataError as e:
        raise RunSetupError(f"data.train = {cfg.data.train!r}: {e}") from None
    eval_dir = None
    if cfg.data.eval is not None:
        try:
            eval_dir = str(resolve_split(cfg.data.eval, "test"))
        except DataError as e:
            raise RunSetupError(f"data.eval = {cfg.data.eval!r}: {e}") from None

    if not name or "/" in name or name.startswith("."):
        raise RunSetupError(f"--name {name!r}: expected a plain directory name")
    storage = Path(storage).expanduser().resolve()
    run_dir = storage / name
    try:
        lease = RunLease(run_dir, takeover=takeover)  # before anything is written into the run
    except RunInUse as e:
        raise RunSetupError(str(e)) from None
    except OSError as e:
        raise RunSetupError(f"--storage {storage}: cannot write the run directory {run_dir}: {e}") from None
    try:
        probe = run_dir / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
        found = choose_checkpoint(run_dir)  # a resume: verified, finite (the workers choose alike)
        if found is not None:
            check_resume(*found, cfg, cfg.scale.num_workers)
    except OSError as e:
        lease.release()
        raise RunSetupError(f"--storage {storage}: cannot write the run directory {run_dir}: {e}") from None
    except RunError as e:
        lease.release()
        raise RunSetupError(str(e)) from None
    return {
        "lease": lease,
        "run_dir": str(run_dir),
        "train_dir": train_dir,
        "eval_dir": eval_dir,
        "resume_from": str(found[0]) if found else None,
        "resume_step": found[1]["step"] if found else None,
    }


# ------------------------------------------------------------------------------------------------- Ray
def _rows(split_dir: str | None) -> str:
    return "none" if split_dir is None else f"{open_split(split_dir).num_rows:,} rows ({split_dir})"


def model_size(cfg: Config) -> dict:
    """:func:`dbgen.nn.size_report` of the model, built on the meta device: counts without allocating weights
    (the 0.75B preset would take 3 GB on the driver)."""
    with torch.device("meta"):
        return size_report(build(cfg))


def header(cfg: Config, name: str, paths: dict, ray_desc: str) -> list[str]:
    """The run's opening lines: run, model and parameter counts, workers and devices, data."""
    m, s, t = cfg.model, cfg.scale, cfg.train
    size = model_size(cfg)
    kind = ("binary weights" if m.binary_weights else "fp weights") + (
        ", binary activations" if m.binary_activations else ""
    )
    resume = (
        f"resuming from {Path(paths['resume_from']).name}, step {paths['resume_step']}"
        if paths["resume_from"]
        else "new run"
    )
    micro = micro_batch_size(cfg, s.num_workers)
    device = "GPU" if s.use_gpu else "CPU"
    return [
        f"run {name} in {paths['run_dir']} ({resume})",
        f"model {m.name} ({kind}): {size['params'] / 1e6:.2f}M parameters, {size['binary_params'] / 1e6:.2f}M binary "
        f"({size['binary_fraction']:.0%}); packed {size['packed_fp16_mb']:.2f} MB",
        f"{s.num_workers} worker(s) on {device} ({s.cpus_per_worker:g} CPU each), ZeRO {s.zero_stage}, comm "
        f"{cfg.comm.binary_weights}/{cfg.comm.binary_grads}; batch {t.batch_size} = {s.num_workers} x "
        f"{t.grad_accum} x {micro}; {t.max_steps} steps",
        f"data train {_rows(paths['train_dir'])}; eval {_rows(paths['eval_dir'])}",
        f"ray: {ray_desc}",
    ]


class Interrupted(Exception):
    """The driver got SIGINT or SIGTERM; the workers stopped. ``code``: 130 or 143, as a shell reports it."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.code = 128 + signum


def run(
    cfg: Config, name: str, storage: str | Path = DEFAULT_STORAGE, paths: dict | None = None, verbose: bool = False
) -> dict:
    """Train ``cfg`` as run ``name`` under ``storage``; returns the run's summary (see dbgen.trainer).

    ``trainer.fit()`` runs in a thread so that this (main) thread owns SIGINT and SIGTERM: the first one asks
    the workers to stop at their next logging interval (a checkpoint being written is finished, no new one is
    started) and raises :class:`Interrupted` once they have; a second one stops at once. Either way a local Ray
    this driver started is shut down before it returns. The run's lease (taken by :func:`prepare`) is held
    until then."""
    driver_start = time.time()
    paths = paths or prepare(cfg, name, storage)
    try:
        return _fit_on_ray(cfg, name, paths, verbose, driver_start)
    finally:
        paths["lease"].release()


def _fit_on_ray(cfg: Config, name: str, paths: dict, verbose: bool, driver_start: float) -> dict:
    # Ray here, not at the top: a bad config or path exits before Ray is imported (seconds) or started.
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    run_dir = Path(paths["run_dir"])
    submission = uuid.uuid4().hex
    stop_file = run_dir / f".stop-{submission}"

    owns_ray = not ray.is_initialized()
    ray_desc = connect_ray(verbose)
    paths["lease"].set_ray_job(ray.get_runtime_context().get_job_id())
    for line in header(cfg, name, paths, ray_desc):
        log.info(line)
    _warn_if_storage_is_short(cfg, run_dir)

    s = cfg.scale
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = 1
    in_ray = cfg.data.loader == "ray"
    kwargs = {}
    if in_ray:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = verbose
        kwargs = {"datasets": ray_datasets(paths["train_dir"], paths["eval_dir"]), "dataset_config": ray_data_config()}
    trainer = torch_trainer(
        train_worker,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "run_dir": str(run_dir),
            "train_dir": paths["train_dir"],
            "eval_dir": paths["eval_dir"],
            "submission": submission,
            "driver_start": driver_start,
            "datasets_in_ray": in_ray,
            "resume_from": paths["resume_from"],
            "stop_file": str(stop_file),
        },
        scaling_config=ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker=resources,
            placement_strategy=s.placement_strategy,
        ),
        # Checkpoints are dbgen's (written, verified and rotated by the workers, chosen by choose_checkpoint), so
        # Ray Train keeps none of its own: num_to_keep would delete without knowing which one is intact.
        run_config=RunConfig(
            name=name,
            storage_path=str(run_dir.parent),
            failure_config=FailureConfig(max_failures=s.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
        ),
        **kwargs,
    )
    outcome: dict = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = e

    signals = []

    def on_signal(signum, frame):
        signals.append(signum)
        if len(signals) > 1:
            raise Interrupted(signum, f"{signal.Signals(signum).name} again: stopped without waiting")
        stop_file.touch()
        log.warning(
            "%s: stopping the workers at their next logging interval (again to stop at once)",
            signal.Signals(signum).name,
        )

    thread = threading.Thread(target=fit, name="dbgen-fit", daemon=True)
    handlers = _install_handlers(on_signal)
    try:
        with MetricsFollower(run_dir, cfg.train.max_steps):
            thread.start()
            while thread.is_alive():
                thread.join(0.2)
    finally:
        _install_handlers(handlers)
        stop_file.unlink(missing_ok=True)
        if not thread.is_alive():  # every worker has stopped: what a failed save left is garbage
            for partial in remove_partial_checkpoints(run_dir):
                log.warning("removed %s, a checkpoint that was not completed", partial.name)
        if owns_ray:
            ray.shutdown()
    if "error" in outcome:
        raise outcome["error"]
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    if signals:
        raise Interrupted(signals[0], _resume_hint(run_dir, summary))
    return summary


def _warn_if_storage_is_short(cfg: Config, run_dir: Path) -> None:
    """A warning at start when the storage cannot hold ``train.keep_checkpoints`` + 1 checkpoints (rotation
    deletes the oldest only after the new one is committed)."""
    one = checkpoint_bytes(run_dir, model_size(cfg)["params"], cfg.train.ema_decay is not None)
    need = one * (cfg.train.keep_checkpoints + 1)
    free = free_bytes(run_dir)
    if free is not None and free < need:
        log.warning(
            "%s has %.1f MiB free, less than %d checkpoints of this run (%.1f MiB; train.keep_checkpoints=%d, "
            "plus the one being written): a checkpoint may fail for lack of space",
            run_dir,
            free / 2**20,
            cfg.train.keep_checkpoints + 1,
            need / 2**20,
            cfg.train.keep_checkpoints,
        )


def _install_handlers(handler) -> dict:
    """Set SIGINT/SIGTERM handlers (``handler``: one function, or a dict per signal); returns the previous
    ones. Only the main thread may, so elsewhere (e.g. a test calling :func:`run` from a thread) nothing
    changes."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        new = handler.get(signum) if isinstance(handler, dict) else handler
        if new is not None:
            previous[signum] = signal.signal(signum, new)
    return previous


def _resume_hint(run_dir: Path, summary: dict) -> str:
    return f"stopped at step {summary['steps']}; {resume_words(run_dir)}"


# ------------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dbgen.train",
        description=__doc__.split("\n\n")[0],
        epilog="Example: python -m dbgen.train --config configs/rvae_binary_tiny.yaml "
        "train.max_steps=200 --name demo --storage runs",
    )
    p.add_argument("--config", help="YAML preset (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=20")
    p.add_argument(
        "--name",
        default=None,
        help="run name (default: <config stem>-<date>-<time>); an existing run of this name is resumed",
    )
    p.add_argument(
        "--storage",
        default=os.environ.get("DBGEN_STORAGE", DEFAULT_STORAGE),
        help=f"directory of runs (default $DBGEN_STORAGE or {DEFAULT_STORAGE})",
    )
    p.add_argument(
        "--takeover",
        action="store_true",
        help="take the run's lease although another driver holds it (only once that driver is known to be gone)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        default=verbose_from_env(),
        help="also stream Ray's, Ray Train's, Ray Data's and DeepSpeed's own output from every worker "
        "(default: only in Ray's log files; DBGEN_VERBOSE=1 does the same)",
    )
    p.add_argument(
        "--print-config-table",
        action="store_true",
        help="print every config key as a Markdown table (docs/config.md's) and exit",
    )
    args = p.parse_intermixed_args(argv)  # overrides may stand before, between and after the flags
    if args.print_config_table:
        print(schema_markdown())
        return 0
    if not args.config:
        p.error("--config is required")
    setup_logging(args.verbose)
    name = args.name or f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        cfg = load_config(args.config, args.overrides)
        paths = prepare(cfg, name, args.storage, takeover=args.takeover)
    except (ConfigError, RunSetupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import ray.train  # as in run(): only once the run can start

    try:
        summary = run(cfg, name, args.storage, paths, verbose=args.verbose)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return e.code
    except ray.train.TrainingFailedError as e:
        fatal = fatal_error(e)  # failed at once, not retried: say only what failed
        print(f"error: training failed: {fatal if fatal is not None else e}", file=sys.stderr)
        return 1
    shown = {
        k: summary[k]
        for k in (
            "steps",
            "final_train_bpd",
            "final_eval_bpd",
            "skipped_steps",
            "images_per_s",
            "wall_s",
            "resumed_from",
        )
    }
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in shown.items()}
    print(f"summary ({Path(paths['run_dir']) / SUMMARY_FILE}):")
    print(yaml.safe_dump(shown, sort_keys=False).rstrip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
