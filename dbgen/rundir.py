"""A training run's directory and its checkpoints: the one owner of their layout and format.

The trainer writes them, the driver checks them before a resume, and ``dbgen.evaluate``, ``dbgen.sample`` and
``dbgen.export`` read them; all through this module. Layout of ``<storage>/<name>``::

    config.yaml                         the resolved config (the driver)
    metrics.jsonl                       one JSON record per event (rank 0; :mod:`dbgen.reporter`)
    summary.json                        the last attempt's summary (rank 0)
    samples/step_<step>.png             sample grids
    checkpoint_<step>/                  every rank writes its part, Ray Train merges them:
        ds/mp_rank_00_model_states.pt       DeepSpeed (rank 0): module, optimizer (ZeRO 0) and the client state
                                            (:func:`save_checkpoint`: step, skipped, images_seen, EMA, loader
                                            position, sync state, world size, submission, resumed_from, train_bpd)
        ds/zero_pp_rank_<r>_*optim_states.pt  ZeRO 1/2: each rank's optimizer partition
        rank_<r>.pt                         per-rank RNG states (torch, CUDA, python, numpy)
        meta.json                           step, world size, ZeRO stage, ema, images_seen, config, weights (rank
                                            0): what evaluate/sample/export and a resume read first
        packed/rank_<r>_of_<W>.pt           packed comm modes: each rank's slice of the binary latents (the sync)

The config is stored once per checkpoint, in ``meta.json`` (the DeepSpeed client state of checkpoints written
before that carries a copy too, which nothing reads). Reading a checkpoint needs no DeepSpeed: the model states
file is a plain ``torch.save`` dict read with ``weights_only=True``; writing and restoring take the DeepSpeed
engine as an argument.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import torch

from .atomic import write_json_atomic
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
    "checkpoint_meta",
    "checkpoint_name",
    "derive_seed",
    "latest_checkpoint",
    "load_checkpoint",
    "load_run",
    "read_meta",
    "restore_rng",
    "rng_state",
    "samples_path",
    "save_checkpoint",
    "seed_all",
    "set_rng_state",
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
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{path}: cannot read checkpoint metadata: {e}") from None


def latest_checkpoint(run_dir: str | Path) -> tuple[Path, dict]:
    """``(checkpoint dir, meta)`` of the run's checkpoint with the highest step."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise RunError(f"run directory not found: {run_dir}")
    found = []
    for meta_path in run_dir.glob(f"checkpoint_*/{META_FILE}"):
        try:
            meta = json.loads(meta_path.read_text())
            found.append((int(meta["step"]), meta_path.parent, meta))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("skipping unreadable checkpoint %s: %s", meta_path.parent, e)
    if not found:
        raise RunError(f"{run_dir}: no checkpoint (expected checkpoint_*/{META_FILE}; is this a run directory "
                       f"of python -m dbgen.train, and did it reach its first checkpoint?)")
    _, path, meta = max(found, key=lambda t: t[0])
    return path, meta


def load_run(run_dir: str | Path, ema: bool = True, device: str | torch.device = "cpu"):
    """The model of a run's latest checkpoint, in eval mode, and ``info`` (checkpoint, step, config, ema)."""
    ckpt, meta = latest_checkpoint(run_dir)
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


def check_resume(ckpt: Path, meta: dict, cfg: Config, world_size: int) -> None:
    """Whether ``cfg`` on ``world_size`` workers can continue the checkpoint ``ckpt`` (its ``meta``): the same
    model; ZeRO 1/2 optimizer state is partitioned, so the same worker count and stage; no ZeRO stage on a ZeRO 0
    checkpoint; the same ``comm.binary_weights`` (packed keeps latents and their Adam state sharded). Raises
    :class:`RunError` saying what to change."""
    ckpt = Path(ckpt)
    old = load_config(meta["config"])
    if old.model != cfg.model:
        raise RunError(f"{ckpt.parent} holds a run of another model ({ckpt.name}: model {old.model}); "
                       f"use another --name to start a new run")
    if meta["zero_stage"] > 0 and (meta["world_size"] != world_size or meta["zero_stage"] != cfg.scale.zero_stage):
        raise RunError(f"{ckpt} was written by {meta['world_size']} workers with ZeRO stage {meta['zero_stage']}: "
                       f"its optimizer state is partitioned, resume it with scale.num_workers={meta['world_size']} "
                       f"scale.zero_stage={meta['zero_stage']}")
    if meta["zero_stage"] == 0 and cfg.scale.zero_stage > 0:
        raise RunError(f"{ckpt} was written with ZeRO stage 0; resume it with scale.zero_stage=0")
    if old.comm.binary_weights != cfg.comm.binary_weights:
        raise RunError(f"{ckpt} was written with comm.binary_weights={old.comm.binary_weights}; resume it "
                       f"with comm.binary_weights={old.comm.binary_weights}")


# ------------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """This process's RNG states (torch, CUDA if present, python, numpy), as tensors and plain values."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]]}
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
def checkpoint_meta(cfg: Config, step: int, world_size: int, ema: bool, images_seen: int) -> dict:
    """What rank 0 writes to ``meta.json``."""
    return {"step": step, "world_size": world_size, "zero_stage": cfg.scale.zero_stage, "ema": ema,
            "images_seen": images_seen, "config": cfg.to_dict(), "weights": f"{DS_TAG}/{DS_MODEL_FILE}"}


def save_checkpoint(directory: Path, engine, state: dict, rank: int, meta: dict | None) -> None:
    """This rank's part of a checkpoint into ``directory``: the DeepSpeed engine with ``state`` as its client
    state, this rank's RNG states, and (``meta``, rank 0) ``meta.json``. Every rank calls it (DeepSpeed's save
    is collective)."""
    directory = Path(directory)
    engine.save_checkpoint(str(directory), tag=DS_TAG, client_state=state)
    torch.save(rng_state(), _rng_file(directory, rank))
    if meta is not None:
        write_json_atomic(directory / META_FILE, meta)


def load_checkpoint(ckpt: Path, engine, cfg: Config, world_size: int) -> dict:
    """Restore the engine (module, optimizer and its partitions) from ``ckpt`` after :func:`check_resume`;
    returns the client state :func:`save_checkpoint` stored."""
    ckpt = Path(ckpt)
    check_resume(ckpt, read_meta(ckpt), cfg, world_size)
    load_path, state = engine.load_checkpoint(str(ckpt), tag=DS_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
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
