"""The binary latents as one flat vector sharded over the ranks, and the per-rank checkpoint files of it.

Why one flat vector: the packed and 1-bit modes exchange the binary layers' gradients and signs as single
messages, and each rank owns (optimizes, checkpoints) one contiguous slice of it. :class:`BinaryLayout` maps the
latents to the vector and the vector to the ranks; slices are multiples of :data:`ALIGN` elements, so a
slice packs into whole bytes of signs and whole 1-bit chunks.

Checkpoints: every rank writes its part as ``<checkpoint>/packed/rank_<r>_of_<W>.pt`` (:func:`save_partition`)
and reads back, by element range, whatever part it owns now (:func:`load_partitions`), so a checkpoint
written by any number of ranks resumes on any other number.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..nn import unpack_signs

__all__ = ["ALIGN", "PARTITION_DIR", "BinaryLayout", "chunk_rows", "load_partitions", "save_partition", "slice_size"]

ALIGN = 2048  # slice sizes are multiples of this: whole bytes of signs and whole 1-bit chunks
PARTITION_DIR = "packed"


class BinaryLayout:
    """The binary latents as one flat vector and each rank's slice of it.

    The flat vector is ``torch.cat`` of the flattened latents in optimizer order (``numel`` elements), padded
    with zeros to ``world * slice``; rank ``r`` owns ``[r * slice, (r + 1) * slice)``, of which the first
    ``valid`` elements are real. ``slice`` is a multiple of :data:`ALIGN`, so slices pack into whole bytes.
    """

    def __init__(self, params, world: int, rank: int):
        self.params = list(params)
        self.numel = sum(p.numel() for p in self.params)
        self.world, self.rank = world, rank
        self.slice = slice_size(self.numel, world)
        self.padded = world * self.slice
        self.start = rank * self.slice
        self.valid = max(0, min(self.numel - self.start, self.slice))
        self.offsets = [0]  # where each latent starts in the flat vector
        for p in self.params[:-1]:
            self.offsets.append(self.offsets[-1] + p.numel())

    def flat(self, tensors) -> torch.Tensor:
        """(padded,) fp32: ``tensors`` (one per latent, None = zeros) concatenated, zero padding."""
        return self.window(0, self.padded, tensors)

    def window(self, lo: int, hi: int, tensors) -> torch.Tensor:
        """(hi - lo,) fp32: elements ``[lo, hi)`` of :meth:`flat`, without building the whole vector."""
        out = torch.zeros(hi - lo, dtype=torch.float32, device=self.params[0].device)
        for p, t, o in zip(self.params, tensors, self.offsets, strict=True):
            a, b = max(lo, o), min(hi, o + p.numel())
            if t is not None and a < b:
                out[a - lo : b - lo].copy_(t.reshape(-1)[a - o : b - o])
        return out

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``flat`` shaped like the latents (inverse of :meth:`flat`)."""
        out, o = [], 0
        for p in self.params:
            out.append(flat[o : o + p.numel()].view_as(p))
            o += p.numel()
        return out

    @torch.no_grad()
    def write_signs(self, packed: torch.Tensor, params=None) -> None:
        """Set every latent (or those of ``params``) to the +-1 signs in ``packed`` ((padded/8,) uint8, the flat
        vector's layout; only the bytes holding those latents' bits are read)."""
        wanted = None if params is None else {id(p) for p in params}
        for p, o in zip(self.params, self.offsets, strict=True):
            if wanted is not None and id(p) not in wanted:
                continue
            n = p.numel()
            lo, hi = o // 8, (o + n + 7) // 8  # the bytes holding bits [o, o + n)
            bits = unpack_signs(packed[lo:hi], (hi - lo) * 8, p.dtype)
            p.copy_(bits[o - 8 * lo : o - 8 * lo + n].view_as(p))


def chunk_rows(flat: torch.Tensor, chunk: int, ids: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The chunks ``ids`` (ascending) of ``flat`` as (k, chunk) rows: a view when they are consecutive (then
    writes reach ``flat``), else a copy; and whether it is the view."""
    rows, lo, k = flat.view(-1, chunk), int(ids[0]), ids.numel()
    if int(ids[-1]) - lo + 1 == k:
        return rows[lo : lo + k], True
    return rows[ids], False


def slice_size(numel: int, world: int) -> int:
    """Elements per rank: ``numel / world`` rounded up to a multiple of :data:`ALIGN`."""
    return max(1, math.ceil(numel / (world * ALIGN))) * ALIGN


# ------------------------------------------------------------------------------------ per-rank checkpoints
def _partition_name(rank: int, world: int) -> str:
    return f"rank_{rank:05d}_of_{world:05d}.pt"


def save_partition(directory: str | Path, layout: BinaryLayout, ranged: dict, full: dict, extra: dict) -> Path:
    """This rank's part of a checkpoint: ``ranged`` tensors cover its slice (only the real elements are
    written), ``full`` ones the whole flat vector (``numel`` elements); None values are kept as None."""
    d = Path(directory) / PARTITION_DIR
    d.mkdir(parents=True, exist_ok=True)
    part = {
        "format": 1,
        "world_size": layout.world,
        "rank": layout.rank,
        "start": layout.start,
        "stop": layout.start + layout.valid,
        "numel": layout.numel,
        **extra,
    }
    for k, t in ranged.items():
        part[k] = None if t is None else t.detach()[: layout.valid].cpu().clone()
    for k, t in full.items():
        part[k] = None if t is None else t.detach()[: layout.numel].cpu().clone()
    path = d / _partition_name(layout.rank, layout.world)
    torch.save(part, path)
    return path


@torch.no_grad()
def load_partitions(directory: str | Path, layout: BinaryLayout, ranged: list[str], full: list[str]) -> dict:
    """Read a checkpoint's partitions into this rank's layout, whatever world size wrote them.

    ``ranged`` keys: this rank's slice (slice,), assembled from every file overlapping it (None if any such
    file holds None). ``full`` keys (e.g. sender-side error buffers, which belong to a rank's data stream):
    the same rank's buffer when the world size is unchanged, else the mean over the old ranks (that keeps
    the average the ranks still owe). Also returns ``step`` and ``world_size`` (of the writer).
    """
    d = Path(directory) / PARTITION_DIR
    files = sorted(d.glob("rank_*_of_*.pt"))
    if not files:
        raise RuntimeError(
            f"{directory}: no per-rank partitions ({PARTITION_DIR}/rank_*_of_*.pt); was the "
            f"checkpoint written with another comm mode?"
        )
    old_world = int(files[0].stem.rsplit("_", 1)[1])
    names = {f.name for f in files}
    expected = {_partition_name(r, old_world) for r in range(old_world)}
    if names != expected:
        raise RuntimeError(
            f"{d}: incomplete partitions for {old_world} ranks (missing "
            f"{sorted(expected - names)[:4]}, unexpected {sorted(names - expected)[:4]})"
        )
    dev = layout.params[0].device
    lo, hi = layout.start, layout.start + layout.valid
    out = {k: torch.zeros(layout.slice, device=dev) for k in ranged}
    present = dict.fromkeys(ranged, True)
    fulls: dict[str, list] = {k: [] for k in full}
    out["step"], out["world_size"] = None, old_world
    for f in files:
        r = int(f.stem.split("_")[1])
        s = slice_size(layout.numel, old_world)
        a, b = r * s, max(r * s, min(layout.numel, (r + 1) * s))
        overlap = max(lo, a) < min(hi, b)
        want_full = bool(full) and (old_world != layout.world or r == layout.rank)
        if not (overlap or want_full or out["step"] is None):
            continue
        part = torch.load(f, map_location="cpu", weights_only=True)
        if part["numel"] != layout.numel:
            raise RuntimeError(f"{f}: {part['numel']} binary latents, this model has {layout.numel}")
        out["step"] = part.get("step")
        if overlap:
            x, y = max(lo, a), min(hi, b)
            for k in ranged:
                if part.get(k) is None:
                    present[k] = False
                else:
                    out[k][x - lo : y - lo] = part[k][x - a : y - a].to(dev)
        if want_full:
            for k in full:
                if part.get(k) is not None:
                    fulls[k].append(part[k].to(dev))
    for k in ranged:
        if not present[k]:
            out[k] = None
    for k, ts in fulls.items():
        out[k] = None
        if ts:
            out[k] = torch.zeros(layout.padded, device=dev)
            out[k][: layout.numel] = torch.stack(ts).mean(dim=0)
    return out
