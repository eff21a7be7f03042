"""``python -m dbgen.export --run DIR --out FILE``: a run's model as a packed inference artifact, and loading it.

The artifact holds every binary latent as its signs, 8 per byte (:func:`dbgen.nn.pack_signs` layout), every
other tensor in fp16, the run's config, the format version and checksums; nothing in it is pickled. Layout::

    b"DBGENPK\\x01"                      8 bytes: magic (the last byte is the format version)
    header length H                     8 bytes, little-endian
    header                              H bytes of UTF-8 JSON: format, version, dbgen_version, config, source,
                                        tensors {name: dtype, shape, offset, nbytes, sha256, [binary_shape]},
                                        payload_bytes
    payload                             the tensors' raw bytes (little-endian), at their offsets
    sha256                              32 bytes: SHA-256 of everything before it

:func:`load_packed` checks the magic, the length (a truncated file is named as such), the trailing checksum
(any flipped byte) and each tensor's checksum before it builds anything, then rebuilds the model from the
stored config: binary layers get exactly the stored signs (+-1 latents), the rest fp16 values widened to fp32.
Given a path, every error names the file. The CLI writes the artifact atomically and refuses an existing
``--out`` file (exit code 2) unless ``--overwrite`` is given.

Packed weights are also how models travel to Ray actors: :class:`PackedModelActor` gets the artifact's bytes
from the object store (one ``ray.put`` of ~10 MB for the paper RVAE instead of 225 MB of fp32 tensors) and
evaluates or samples; :func:`evaluate_with_actors` splits a held-out split over several of them. An actor's
loop is :func:`dbgen.eval_loop.bpd_sum` (the trainer's and ``dbgen.evaluate``'s) and shard ``i`` is seeded
with :func:`dbgen.rundir.derive_seed`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._version import __version__
from .atomic import write_atomic
from .config import Config, ConfigError, load_config
from .data import EvalLoader
from .eval_loop import EngineUnavailable, bpd_sum, resolve_engine, use_engine
from .models import build
from .nn import binary_layers, packed_state_dict
from .nn.state import PACKED_SUFFIX, load_packed_state_dict
from .rundir import RunError, derive_seed, load_run

__all__ = [
    "ArtifactError",
    "PackedArtifact",
    "PackedModelActor",
    "actor_placement",
    "evaluate_with_actors",
    "export_model",
    "export_run",
    "load_artifact",
    "load_packed",
    "main",
    "pack_model",
    "read_packed",
]

log = logging.getLogger(__name__)

MAGIC = b"DBGENPK\x01"
VERSION = 1
FORMAT = "dbgen-packed"
_DTYPES = {
    "uint8": torch.uint8,
    "float16": torch.float16,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
_PREFIX = len(MAGIC) + 8
_TRAILER = 32


class ArtifactError(ValueError):
    """A packed artifact is unreadable, truncated, corrupted or of another format; the message says which."""


@dataclass
class PackedArtifact:
    header: dict  # format, version, dbgen_version, config, source, tensors, payload_bytes
    tensors: dict[str, torch.Tensor]  # the packed state dict (dbgen.nn.packed_state_dict layout)

    @property
    def config(self) -> Config:
        return load_config(self.header["config"])


# ------------------------------------------------------------------------------------------------- writing
def pack_model(model: nn.Module, cfg: Config, source: dict | None = None) -> bytes:
    """The artifact's bytes for ``model`` (built from ``cfg.model``); ``source`` goes into the header."""
    state = packed_state_dict(model, float_dtype=torch.float16)
    shapes = {f"{name}.weight" if name else "weight": list(m.weight.shape) for name, m in binary_layers(model)}
    entries, chunks, offset = {}, [], 0
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        raw = t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""  # native order: little-endian
        entry = {
            "dtype": str(t.dtype).removeprefix("torch."),
            "shape": list(t.shape),
            "offset": offset,
            "nbytes": len(raw),
            "sha256": hashlib.sha256(raw).hexdigest(),
        }
        if name.endswith(PACKED_SUFFIX):
            entry["binary_shape"] = shapes[name.removesuffix(PACKED_SUFFIX)]
        entries[name] = entry
        chunks.append(raw)
        offset += len(raw)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "dbgen_version": __version__,
        "config": cfg.to_dict(),
        "source": source or {},
        "tensors": entries,
        "payload_bytes": offset,
    }
    head = json.dumps(header, sort_keys=True).encode()
    body = b"".join([MAGIC, struct.pack("<Q", len(head)), head, *chunks])
    return body + hashlib.sha256(body).digest()


def export_model(model: nn.Module, cfg: Config, out: str | Path, source: dict | None = None) -> dict:
    """Write ``model`` as an artifact at ``out`` (atomically); returns path, bytes and sha256."""
    data = pack_model(model, cfg, source)
    write_atomic(out, data)
    return {"path": str(out), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def export_run(run_dir: str | Path, out: str | Path, ema: bool = True, allow_nonfinite: bool = False) -> dict:
    """Export a checkpoint (``run_dir``: a run directory for the checkpoint a resume would take, or one checkpoint
    directory), its EMA weights if it kept an EMA and ``ema``. It is verified first; non-finite weights are
    accepted only with ``allow_nonfinite`` (:func:`dbgen.rundir.load_run`)."""
    model, info = load_run(run_dir, ema=ema, allow_nonfinite=allow_nonfinite)
    source = {
        "run": str(Path(run_dir).resolve()),
        "checkpoint": info["checkpoint"],
        "step": info["step"],
        "ema": info["ema"],
    }
    result = export_model(model, info["config"], out, source)
    return {**result, **source}


# ------------------------------------------------------------------------------------------------- reading
def _read_bytes(source) -> tuple[bytes, str]:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source), "<bytes>"
    path = Path(source)
    try:
        return path.read_bytes(), str(path)
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read: {e}") from None


def read_packed(source: str | Path | bytes) -> PackedArtifact:
    """Parse and verify an artifact (a path or its bytes); raises :class:`ArtifactError` naming the problem
    (and the file, for a path)."""
    data, name = _read_bytes(source)
    return _parse(data, name)


def _parse(data: bytes, name: str) -> PackedArtifact:
    """:func:`read_packed` of ``data``; ``name`` (the file, or ``<bytes>``) starts every error message."""
    if len(data) < len(MAGIC) or data[: len(MAGIC) - 1] != MAGIC[:-1]:
        raise ArtifactError(f"{name}: not a dbgen packed artifact (no {MAGIC[:-1]!r} magic)")
    if data[len(MAGIC) - 1] != VERSION:
        raise ArtifactError(f"{name}: format version {data[len(MAGIC) - 1]}, this dbgen reads version {VERSION}")
    if len(data) < _PREFIX + _TRAILER:
        raise ArtifactError(f"{name}: truncated ({len(data)} bytes, shorter than the fixed parts)")
    (head_len,) = struct.unpack("<Q", data[len(MAGIC) : _PREFIX])
    header = None
    if _PREFIX + head_len + _TRAILER <= len(data):
        try:
            header = json.loads(data[_PREFIX : _PREFIX + head_len])
        except (UnicodeDecodeError, ValueError):
            header = None
    expected = None
    if isinstance(header, dict) and isinstance(header.get("payload_bytes"), int):
        expected = _PREFIX + head_len + header["payload_bytes"] + _TRAILER
    if expected is not None and len(data) < expected or expected is None and _PREFIX + head_len > len(data):
        raise ArtifactError(f"{name}: truncated ({len(data)} bytes, the header says {expected or 'more'})")
    if hashlib.sha256(data[:-_TRAILER]).digest() != data[-_TRAILER:]:
        raise ArtifactError(
            f"{name}: checksum mismatch (SHA-256 of the file body does not match its trailer): the file is corrupted"
        )
    if header is None or header.get("format") != FORMAT:
        raise ArtifactError(f"{name}: unreadable header (format {header.get('format') if header else None!r})")
    if len(data) != expected:
        raise ArtifactError(f"{name}: {len(data)} bytes, the header says {expected}")
    payload = memoryview(data)[_PREFIX + head_len : -_TRAILER]
    tensors = {}
    for key, e in header["tensors"].items():
        raw = payload[e["offset"] : e["offset"] + e["nbytes"]]
        if hashlib.sha256(raw).hexdigest() != e["sha256"]:
            raise ArtifactError(f"{name}: checksum mismatch in tensor {key!r}: the file is corrupted")
        dtype = _DTYPES.get(e["dtype"])
        if dtype is None:
            raise ArtifactError(f"{name}: tensor {key!r} has unsupported dtype {e['dtype']!r}")
        flat = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy())
        tensors[key] = flat.view(dtype).reshape(e["shape"])
    return PackedArtifact(header, tensors)


def load_packed(source: str | Path | bytes | PackedArtifact, device: str | torch.device = "cpu") -> nn.Module:
    """The model stored in an artifact (a path, its bytes or a :func:`read_packed` result), in eval mode on
    ``device``: binary layers hold exactly the stored signs as +-1 latents, other tensors the stored fp16
    values in fp32."""
    if isinstance(source, PackedArtifact):
        return _build(source, device, "artifact")
    data, name = _read_bytes(source)
    return _build(_parse(data, name), device, name)


def _build(art: PackedArtifact, device: str | torch.device, name: str) -> nn.Module:
    """The model of a parsed artifact; ``name`` (the file) starts every error message."""
    try:
        cfg = art.config
    except ConfigError as e:
        raise ArtifactError(f"{name}: artifact config: {e}") from None
    model = build(cfg.model)
    for key, e in art.header["tensors"].items():
        if "binary_shape" in e:
            own = model.get_parameter(key.removesuffix(PACKED_SUFFIX))
            if list(own.shape) != e["binary_shape"]:
                raise ArtifactError(
                    f"{name}: tensor {key}: stored for shape {e['binary_shape']}, model has {list(own.shape)}"
                )
    try:
        load_packed_state_dict(model, art.tensors)
    except ValueError as e:
        raise ArtifactError(f"{name}: {e}") from None
    return model.to(device).eval()


def load_artifact(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict, bytes]:
    """``(model, info, bytes)`` of an artifact file; ``info`` like :func:`dbgen.rundir.load_run`'s
    (checkpoint, step, config, ema; from the artifact's header)."""
    data, name = _read_bytes(path)
    art = _parse(data, name)
    src = art.header.get("source", {})
    model = _build(art, device, name)
    info = {"checkpoint": str(path), "step": src.get("step"), "config": art.config, "ema": bool(src.get("ema"))}
    return model, info, data


# ------------------------------------------------------------------------------------------- Ray actors
class PackedModelActor:
    """A model replica for Ray: built from an artifact's bytes (resolved from the object store), evaluates
    shards of a held-out split and draws samples. Use via ``ray.remote(PackedModelActor)`` or
    :func:`evaluate_with_actors`. The model runs on ``device`` (``cuda``: the GPU Ray gave the actor) through
    ``engine``, resolved there (:func:`dbgen.eval_loop.resolve_engine`: by default the bitwise kernels on CUDA
    and on CPUs with AVX2 or AVX-512, else float layers). An explicit engine that cannot run leaves the actor
    without a model, and :meth:`engine` says why."""

    def __init__(self, artifact: bytes, threads: int = 1, engine: str | None = None, device: str = "cpu"):
        torch.set_num_threads(threads)
        self.received = {"type": type(artifact).__name__, "bytes": len(artifact)}
        self.device = device
        try:
            self._engine, self._missing = resolve_engine(engine, device), None
        except EngineUnavailable as e:
            self._engine, self._missing, self.model = None, str(e), None
            return
        model = load_packed(artifact, device=device)
        self.params = sum(p.numel() for p in model.parameters())  # before the engine turns binary ones to bits
        self.model = use_engine(model, self._engine)

    def engine(self) -> dict:
        """``{"engine": packed or float, "device", "missing"}``; ``missing`` (why the engine asked for cannot
        run here) instead of an engine when it cannot."""
        return {"engine": self._engine, "device": self.device, "missing": self._missing}

    def info(self) -> dict:
        """What arrived from the object store (type and size), and the model's parameter count."""
        return {**self.received, "params": self.params}

    @torch.no_grad()
    def evaluate(
        self,
        split: str,
        shard: int,
        shards: int,
        batch_size: int,
        samples: int,
        seed: int,
        max_batches: int | None = None,
    ) -> tuple[float, int]:
        """(sum of bits/dim, rows) over this shard's rows of ``split`` (EvalLoader rank ``shard`` of
        ``shards``), with the RNG seeded by ``seed``."""
        torch.manual_seed(seed)
        loader = EvalLoader(split, batch_size=batch_size, rank=shard, world_size=shards, backend="arrow")
        total, rows = bpd_sum(self.model, loader, samples=samples, max_batches=max_batches)
        return total.item(), rows

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, seed: int = 0) -> torch.Tensor:
        torch.manual_seed(seed)
        return self.model.sample(n, temperature=temperature)


def actor_placement(cluster: dict, workers: int) -> dict:
    """Where ``workers`` evaluation actors run on a cluster with resources ``cluster``
    (``ray.cluster_resources()``): ``{"device", "options"}`` for :func:`evaluate_with_actors`. On GPUs when the
    cluster has any (each actor asks for ``num_gpus``), else on CPUs. More actors than the cluster's CPUs (or
    GPUs) share them: a whole one each would leave some actors never scheduled."""
    options = {"num_cpus": min(1.0, cluster.get("CPU", 1.0) / workers)}
    gpus = cluster.get("GPU", 0.0)
    if gpus > 0:
        options["num_gpus"] = min(1.0, gpus / workers)
    return {"device": "cuda" if gpus > 0 else "cpu", "options": options}


def evaluate_with_actors(
    artifact: bytes,
    split: str | Path,
    workers: int,
    batch_size: int = 256,
    samples: int = 1,
    seed: int = 0,
    max_batches: int | None = None,
    engine: str | None = None,
    device: str = "cpu",
    options: dict | None = None,
) -> dict:
    """Bits/dim of an artifact over ``split`` with ``workers`` Ray actors (Ray must be initialized).

    The artifact's bytes go into the object store once (``ray.put``); each actor receives them as its
    constructor argument and evaluates shard ``i`` of ``workers`` of the split with seed
    ``derive_seed(seed, i)``. ``max_batches`` bounds each shard. ``engine``, ``device``: see
    :class:`PackedModelActor`; ``options``: the actors' Ray resources (default one CPU each;
    :func:`actor_placement` chooses both from the cluster). Raises :class:`dbgen.eval_loop.EngineUnavailable`
    when the engine asked for cannot run on the actors' device."""
    import ray  # here: the rest of this module (export, load) needs no Ray

    ref = ray.put(bytes(artifact))
    Actor = ray.remote(**(options or {"num_cpus": 1.0}))(PackedModelActor)
    actors = [Actor.remote(ref, engine=engine, device=device) for _ in range(workers)]
    try:
        status = ray.get(actors[0].engine.remote())
        if status["missing"]:
            raise EngineUnavailable(status["missing"])
        parts = ray.get(
            [
                a.evaluate.remote(str(split), i, workers, batch_size, samples, derive_seed(seed, i), max_batches)
                for i, a in enumerate(actors)
            ]
        )
        received = ray.get(actors[0].info.remote())
    finally:
        for a in actors:
            ray.kill(a)
    total, rows = sum(p[0] for p in parts), sum(p[1] for p in parts)
    return {
        "bpd": total / rows if rows else math.nan,
        "rows": rows,
        "workers": workers,
        "object_store_bytes": len(artifact),
        "received": received,
        "engine": status["engine"],
        "device": status["device"],
    }


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dbgen.export", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--run",
        required=True,
        help="run directory (<storage>/<name>): its newest intact finite checkpoint, as a resume takes; or one "
        "checkpoint directory (<run>/checkpoint_<step>)",
    )
    p.add_argument("--out", required=True, help="artifact file to write (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights even if the run kept an EMA")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--force",
        action="store_true",
        help="export a checkpoint taken from non-finite weights (a diverged run) instead of refusing it",
    )
    args = p.parse_args(argv)
    if Path(args.out).exists() and not args.overwrite:
        print(f"error: {args.out}: already exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    try:
        result = export_run(args.run, args.out, ema=not args.no_ema, allow_nonfinite=args.force)
    except (RunError, ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['path']}: {result['bytes'] / 1e6:.2f} MB (step {result['step']} of {args.run}, "
            f"{'EMA' if result['ema'] else 'raw'} weights), sha256 {result['sha256']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
