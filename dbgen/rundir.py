"""A training run's directory and its checkpoints: the one owner of their layout and format.

The trainer writes them, the driver checks them before a resume, and ``dbgen.evaluate``, ``dbgen.sample`` and
``dbgen.export`` read them; all through this module. Layout of ``<storage>/<name>``::

    config.yaml                         the resolved config (the driver)
    metrics.jsonl                       one JSON record per event (rank 0; :mod:`dbgen.reporter`)
    summary.json                        the last attempt's summary (rank 0)
    .lease                              the driver's lease on the run: holder and heartbeat (:mod:`dbgen.lease`)
    samples/step_<step>.png             sample grids
    .checkpoint_<step>.partial/         a checkpoint being written: every rank writes its part here, then rank 0
                                        writes meta.json and renames it (:func:`commit_checkpoint`)
    checkpoint_<step>/                  a complete checkpoint:
        ds/mp_rank_00_model_states.pt       DeepSpeed (rank 0): module, optimizer (ZeRO 0) and the client state
                                            (:func:`save_checkpoint`: step, skipped, images_seen, EMA, loader
                                            position, sync state, world size, submission, resumed_from, train_bpd)
        ds/zero_pp_rank_<r>_*optim_states.pt  ZeRO 1/2: each rank's optimizer partition
        rank_<r>.pt                         per-rank RNG states (torch, CUDA, python, numpy)
        meta.json                           step, world size, ZeRO stage, ema, images_seen, config, weights,
                                            finite (every weight was finite), files (size and sha256 of every
                                            other file): what evaluate/sample/export and a resume read first
        packed/rank_<r>_of_<W>.pt           packed comm modes: each rank's slice of the binary latents (the sync)

Integrity: a checkpoint is verified against its ``files`` before it is used (:func:`verify_checkpoint`). Which
checkpoint is used is chosen one way, by :func:`choose_checkpoint`, each caller stating its policy (verified,
finite): a resume (driver and workers alike), the messages that say where a run resumes, and evaluate/sample/
export on a run directory take the newest intact checkpoint taken from finite weights, naming each newer one
they pass over; a checkpoint directory given by name is used as it is or refused, naming the file. Rotation
(:func:`prune_checkpoints`) verifies what it keeps before it deletes, and never deletes the newest finite one.

The config is stored once per checkpoint, in ``meta.json`` (the DeepSpeed client state of checkpoints written
before that carries a copy too, which nothing reads). Reading a checkpoint needs no DeepSpeed: the model states
file is a plain ``torch.save`` dict read with ``weights_only=True``; writing and restoring take the DeepSpeed
engine as an argument.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .atomic import fsync_dir, sha256_file, write_json_atomic
from .config import Config, ConfigError, load_config
from .models import build

__all__ = [
    "CONFIG_FILE",
    "DS_MODEL_FILE",
    "DS_TAG",
    "META_FILE",
    "METRICS_FILE",
    "SUMMARY_FILE",
    "RunError",
    "check_resume",
    "checkpoint_bytes",
    "checkpoint_dirs",
    "checkpoint_meta",
    "checkpoint_name",
    "choose_checkpoint",
    "commit_checkpoint",
    "derive_seed",
    "file_records",
    "list_files",
    "load_checkpoint",
    "load_run",
    "partial_dir",
    "prune_checkpoints",
    "read_meta",
    "remove_partial_checkpoints",
    "restore_rng",
    "resume_words",
    "rng_state",
    "samples_path",
    "save_checkpoint",
    "seed_all",
    "set_rng_state",
    "verify_checkpoint",
]

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
SAMPLES_DIR = "samples"
META_FILE = "meta.json"
DS_TAG = "ds"
DS_MODEL_FILE = "mp_rank_00_model_states.pt"


class RunError(ValueError):
    """A run directory or checkpoint is missing, unreadable or cannot be resumed; the message names the path."""


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:07d}"


def samples_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / SAMPLES_DIR / f"step_{step:07d}.png"


def _rng_file(ckpt: Path, rank: int) -> Path:
    return Path(ckpt) / f"rank_{rank}.pt"


# ---------------------------------------------------------------------------------------------- reading
def read_meta(ckpt: str | Path) -> dict:
    """A checkpoint's ``meta.json``."""
    path = Path(ckpt) / META_FILE
    try:
        meta = json.loads(path.read_text())
        int(meta["step"])
        return meta
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunError(f"{path}: cannot read checkpoint metadata: {e}") from None


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """The run's ``checkpoint_<step>`` directories, newest first (by the step in the name)."""
    found = []
    for path in Path(run_dir).glob("checkpoint_*"):
        step = path.name.removeprefix("checkpoint_")
        if path.is_dir() and step.isdigit():
            found.append((int(step), path))
    return [path for _, path in sorted(found, reverse=True)]


def verify_checkpoint(ckpt: str | Path, meta: dict, full: bool = True) -> None:
    """Check every file ``meta["files"]`` lists: present, of the recorded size and (``full``) sha256. Raises
    :class:`RunError` naming the first bad file. A checkpoint written before checksums (no ``files``) passes
    with a warning."""
    ckpt = Path(ckpt)
    files = meta.get("files")
    if files is None:
        log.warning("%s was written without checksums; it is used unverified", ckpt)
        return
    for rel, expected in sorted(files.items()):
        path = ckpt / rel
        try:
            size = path.stat().st_size
        except OSError:
            raise RunError(f"{path}: missing (listed in {ckpt / META_FILE})") from None
        if size != expected["bytes"]:
            raise RunError(
                f"{path}: {size} bytes, but {ckpt / META_FILE} recorded {expected['bytes']} (truncated or replaced)"
            )
        if full and sha256_file(path) != expected["sha256"]:
            raise RunError(f"{path}: sha256 does not match {ckpt / META_FILE} (the file is corrupted)")


def choose_checkpoint(
    run_dir: str | Path, *, verified: bool = True, finite: bool = True, trusted: str | Path | None = None
) -> tuple[Path, dict] | None:
    """The one way to choose a run's checkpoint: ``(checkpoint dir, meta)`` of the newest
    ``checkpoint_<step>`` of ``run_dir`` with a readable ``meta.json`` that passes the caller's policy:

    * ``verified``: every file matches the size and sha256 that ``meta.json`` records (:func:`verify_checkpoint`);
      ``trusted`` is a checkpoint the caller verified moments ago, not hashed again;
    * ``finite``: taken from finite weights (not from a diverged run's last steps).

    Each newer checkpoint passed over is named in a warning, with why. ``None`` when the run has no checkpoint
    directory; :class:`RunError` listing every reason when it has some and none passes (a caller must never start
    over, or pick something older, silently).

    The callers' policies: a resume (the driver, every worker, the interrupt and divergence messages that say
    where the run resumes) and ``evaluate``/``sample``/``export`` on a run directory take the newest verified
    finite one (``export --force`` drops ``finite``); rotation (:func:`prune_checkpoints`) deletes nothing
    before the checkpoints it keeps have verified."""
    dirs = checkpoint_dirs(run_dir)
    if not dirs:
        return None
    reasons = []
    for path in dirs:
        try:
            meta = _check(path, verified=verified, finite=finite, trusted=trusted)
        except RunError as e:
            reasons.append(str(e))
            log.warning("passing over %s: %s", path.name, e)
            continue
        if reasons:
            log.warning("using the newest intact checkpoint, %s (step %d)", path.name, meta["step"])
        return path, meta
    raise RunError(
        f"{run_dir}: no checkpoint is usable:\n  "
        + "\n  ".join(reasons)
        + "\nrepair or remove them, or use another --name to start a new run"
    )


def resume_words(run_dir: str | Path, trusted: str | Path | None = None) -> str:
    """Where the same command resumes the run, in words for a message (an interrupt, a full disk, a
    divergence): the checkpoint a resume will choose (:func:`choose_checkpoint`), not merely the newest."""
    run_dir = Path(run_dir)
    try:
        found = choose_checkpoint(run_dir, trusted=trusted)
    except RunError as e:
        return f"no checkpoint of run {run_dir.name} can be resumed: {e}"
    where = f"{found[0].name} (step {found[1]['step']})" if found else "its start (no checkpoint yet)"
    return f"the same command resumes run {run_dir.name} from {where}"


def _check(path: Path, *, verified: bool, finite: bool, trusted: str | Path | None = None) -> dict:
    """``path``'s meta after the checks of a policy (:func:`choose_checkpoint`); raises :class:`RunError`."""
    meta = read_meta(path)
    if finite and meta.get("finite") is False:
        raise RunError(f"{path}: taken from non-finite weights (the run diverged)")
    if verified and (trusted is None or Path(trusted).resolve() != path.resolve()):
        verify_checkpoint(path, meta)
    return meta


def load_run(source: str | Path, ema: bool = True, device: str | torch.device = "cpu", allow_nonfinite: bool = False):
    """The model of a checkpoint, in eval mode, and ``info`` (checkpoint, step, config, ema), for
    ``dbgen.evaluate``/``sample``/``export``. ``source``: a run directory (its newest verified finite
    checkpoint, :func:`choose_checkpoint`), or one checkpoint directory, used as it is or refused (damaged, or
    taken from non-finite weights). ``allow_nonfinite``: accept non-finite weights. Raises :class:`RunError`
    naming the file."""
    source = Path(source).expanduser()
    if (source / META_FILE).exists():
        ckpt, meta = source, _check(source, verified=True, finite=not allow_nonfinite)
    elif not source.is_dir():
        raise RunError(f"run directory not found: {source}")
    else:
        found = choose_checkpoint(source, finite=not allow_nonfinite)
        if found is None:
            raise RunError(
                f"{source}: no checkpoint (expected checkpoint_*/{META_FILE}; is this a run directory "
                f"of python -m dbgen.train, and did it reach its first checkpoint?)"
            )
        ckpt, meta = found
    try:
        cfg = load_config(meta["config"])
    except (ConfigError, KeyError) as e:
        raise RunError(f"{ckpt / META_FILE}: invalid config: {e}") from None
    weights = ckpt / DS_TAG / DS_MODEL_FILE
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise RunError(f"{weights}: cannot read model weights: {e}") from None
    model = build(cfg.model)
    use_ema = ema and state.get("ema") is not None
    model.load_state_dict(state["ema"] if use_ema else state["module"])
    model.to(device).eval()
    info = {"checkpoint": str(ckpt), "step": meta["step"], "config": cfg, "ema": use_ema}
    return model, info


def _config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two nested dicts."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def check_resume(ckpt: Path, meta: dict, cfg: Config, world_size: int) -> None:
    """Whether ``cfg`` on ``world_size`` workers can continue the checkpoint ``ckpt`` (its ``meta``): the same
    model; ZeRO 1/2 optimizer state is partitioned, so the same worker count and stage; no ZeRO stage on a ZeRO 0
    checkpoint; the same ``comm.binary_weights`` (packed keeps latents and their Adam state sharded). Raises
    :class:`RunError` saying what to change."""
    ckpt = Path(ckpt)
    old = load_config(meta["config"])
    if old.model != cfg.model:
        diff = _config_diff(old.to_dict()["model"], cfg.to_dict()["model"], "model.")
        raise RunError(
            f"{ckpt.parent} holds a run of another model ({ckpt.name} vs this config: "
            f"{'; '.join(diff)}); use another --name to start a new run"
        )
    if meta["zero_stage"] > 0 and (meta["world_size"] != world_size or meta["zero_stage"] != cfg.scale.zero_stage):
        raise RunError(
            f"{ckpt} was written by {meta['world_size']} workers with ZeRO stage {meta['zero_stage']}: "
            f"its optimizer state is partitioned, resume it with scale.num_workers={meta['world_size']} "
            f"scale.zero_stage={meta['zero_stage']}"
        )
    if meta["zero_stage"] == 0 and cfg.scale.zero_stage > 0:
        raise RunError(f"{ckpt} was written with ZeRO stage 0; resume it with scale.zero_stage=0")
    if old.comm.binary_weights != cfg.comm.binary_weights:
        raise RunError(
            f"{ckpt} was written with comm.binary_weights={old.comm.binary_weights}; resume it "
            f"with comm.binary_weights={old.comm.binary_weights}"
        )


# ------------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """This process's RNG states (torch, CUDA if present, python, numpy), as tensors and plain values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    """Seed torch (and CUDA), python and numpy."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def derive_seed(seed: int, index: int) -> int:
    """A distinct, reproducible seed per rank or shard ``index`` of a run seeded with ``seed`` (the training
    ranks' noise, each rank's eval shard, each eval actor's shard)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


# ------------------------------------------------------------------------------------------- checkpoints
def partial_dir(run_dir: Path, step: int) -> Path:
    """Where the ranks write a checkpoint before it is committed (renamed to ``checkpoint_<step>``)."""
    return Path(run_dir) / f".{checkpoint_name(step)}.partial"


def remove_partial_checkpoints(run_dir: str | Path) -> list[Path]:
    """Delete every ``.checkpoint_<step>.partial`` folder of the run (what a failed or interrupted save left).
    Only while no worker of the run is writing: the driver calls it, holding the run's lease, once its workers
    have stopped. Returns what it removed."""
    removed = sorted(Path(run_dir).glob(".checkpoint_*.partial"))
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def checkpoint_bytes(run_dir: str | Path, params: int, ema: bool) -> int:
    """The size of one checkpoint of this run: the newest committed one's files, else an estimate from the
    parameter count (fp32 weights and Adam's two moments, plus the EMA copy: 12 or 16 bytes per parameter)."""
    for ckpt in checkpoint_dirs(run_dir):  # newest first
        try:
            files = read_meta(ckpt).get("files") or {}
        except RunError:
            continue
        if files:
            return sum(rec["bytes"] for rec in files.values())
    return params * (16 if ema else 12)


def list_files(directory: Path) -> list[str]:
    """Every file under ``directory``, as sorted POSIX paths relative to it (``meta.json`` excluded)."""
    directory = Path(directory)
    return sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and p.relative_to(directory).as_posix() != META_FILE
    )


def file_records(directory: Path, names: list[str]) -> dict:
    """``{name: {"bytes", "sha256"}}`` of the listed files under ``directory`` (each rank hashes a share)."""
    paths = {name: Path(directory) / name for name in names}
    return {
        name: {"bytes": path.stat().st_size, "sha256": sha256_file(path, sync=True)} for name, path in paths.items()
    }


def checkpoint_meta(
    cfg: Config, step: int, world_size: int, ema: bool, images_seen: int, finite: bool, files: dict
) -> dict:
    """What rank 0 writes to ``meta.json``: ``finite`` (every weight, EMA included, was finite) and ``files``
    (size and sha256 of every other file of the checkpoint) among them."""
    return {
        "step": step,
        "world_size": world_size,
        "zero_stage": cfg.scale.zero_stage,
        "ema": ema,
        "images_seen": images_seen,
        "finite": finite,
        "config": cfg.to_dict(),
        "weights": f"{DS_TAG}/{DS_MODEL_FILE}",
        "files": files,
    }


def save_checkpoint(directory: Path, engine, state: dict, rank: int) -> None:
    """This rank's part of a checkpoint into ``directory``: the DeepSpeed engine with ``state`` as its client
    state and this rank's RNG states. Every rank calls it (DeepSpeed's save is collective)."""
    directory = Path(directory)
    engine.save_checkpoint(str(directory), tag=DS_TAG, client_state=state)
    torch.save(rng_state(), _rng_file(directory, rank))


def commit_checkpoint(partial: Path, meta: dict) -> Path:
    """Rank 0, once every rank's part is in ``partial``: write ``meta.json`` and rename ``partial`` to
    ``checkpoint_<step>`` (a checkpoint directory is complete or absent). A checkpoint of the same step (a
    resume from an older one) is replaced."""
    partial = Path(partial)
    write_json_atomic(partial / META_FILE, meta)
    final = partial.parent / checkpoint_name(meta["step"])
    if final.exists():
        replaced = partial.parent / f".{final.name}.replaced"
        shutil.rmtree(replaced, ignore_errors=True)
        final.rename(replaced)
        partial.rename(final)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        partial.rename(final)
    fsync_dir(final.parent)
    return final


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` intact checkpoints and the newest intact finite one (a diverged run
    keeps its last good state); returns what was deleted. The survivors are verified by checksum before anything
    is deleted, so a damaged checkpoint (even one of the right size) never outlives the intact one it would
    replace: it is not counted, and it is left for the user to inspect, as is any incomplete one."""
    dirs = checkpoint_dirs(run_dir)
    survivors, newest_finite, deleted = [], None, []
    for path in dirs:  # newest first
        settled = len(survivors) >= keep and newest_finite is not None
        try:  # until the survivors are known, every checkpoint is hashed; after, older ones need only be whole
            meta = _check(path, verified=not settled, finite=False)
            if settled:
                verify_checkpoint(path, meta, full=False)
        except RunError as e:
            log.warning("leaving %s out of the rotation: %s", path.name, e)
            continue
        first_finite = newest_finite is None and meta.get("finite") is not False
        if first_finite:
            newest_finite = path
        if len(survivors) < keep or first_finite:
            survivors.append(path)
        else:
            deleted.append(path)
    for path in deleted:
        shutil.rmtree(path)
    if deleted:
        log.info("deleted %s (train.keep_checkpoints=%d)", ", ".join(p.name for p in deleted), keep)
    return deleted


def load_checkpoint(ckpt: Path, engine, cfg: Config, world_size: int) -> dict:
    """Restore the engine (module, optimizer and its partitions) from ``ckpt`` after :func:`check_resume`;
    returns the client state :func:`save_checkpoint` stored."""
    ckpt = Path(ckpt)
    check_resume(ckpt, read_meta(ckpt), cfg, world_size)  # the driver checked it too; a restart may not have
    load_path, state = engine.load_checkpoint(
        str(ckpt), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if load_path is None:
        raise RunError(f"{ckpt}: DeepSpeed found no checkpoint with tag '{DS_TAG}'")
    return state


def restore_rng(ckpt: Path, rank: int) -> bool:
    """Set this process's RNG states to those rank ``rank`` saved in ``ckpt``; False when the checkpoint has
    none for this rank (it was written by fewer workers)."""
    path = _rng_file(ckpt, rank)
    if not path.exists():
        return False
    set_rng_state(torch.load(path, weights_only=True))
    return True
