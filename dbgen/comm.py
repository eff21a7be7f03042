"""Communication: one place that counts the bytes every collective sends, and the packed/1-bit sync modes.

Byte accounting
---------------
:func:`install` wraps the collective entry points of ``torch.distributed`` (``all_reduce``,
``reduce_scatter_*``, ``all_gather*``, ``all_to_all*``, ``broadcast``, ``reduce``, the object collectives,
point-to-point) in this process. DeepSpeed's communication backend calls exactly these functions
(``deepspeed.comm`` -> ``TorchBackend`` -> ``torch.distributed.<op>``, looked up at call time), and so do the
trainer and the sync modes here, so every collective the framework issues is counted in one place, whoever
issues it. Each call adds the bytes THIS rank sends under the algorithm the backend runs, to the kind
(``grad``, ``weight``, ``other``) of the innermost :func:`comm_kind` context (``other`` outside any).

Bytes sent per rank (``n``: the bytes of the op's input, ``W``: group size), checked against the kernel's
count of bytes written to the sockets (``/proc/self/io`` ``wchar``) for gloo by tests/test_comm.py:

=========================  =============================  ====================================================
op                          gloo (CPU)                     NCCL (GPU; ring algorithms)
=========================  =============================  ====================================================
all_reduce                  2(W-1)/W n  (ring)             2(W-1)/W n
reduce_scatter              2(W-1)/W n  (an all-reduce)    (W-1)/W n
all_to_all                  (W-1)/W n  (what leaves)       (W-1)/W n
all_gather                  (W-1) n                        (W-1) n
broadcast                   root (W-1) n, others 0         n on every rank but the ring's last
reduce                      root (W-1)/W n, others n       (W-1)/W n
=========================  =============================  ====================================================

(gloo's ``reduce`` was measured for W = 2, 3, 4: a reduce-scatter, then every other rank sends its part to the
root. NCCL figures are the standard ring costs; NCCL may pick a tree all-reduce, which sends about the same.)

Why the packed mode reduces binary gradients with ``all_to_all`` plus a local sum on gloo: gloo's
``reduce_scatter`` runs a full all-reduce and sends ``2(W-1)/W n``, twice what a reduce-scatter needs; an
``all_to_all`` sends each peer exactly its slice, ``(W-1)/W n``, and the sum happens locally. On NCCL the
native ``reduce_scatter`` is a ring that sends ``(W-1)/W n`` with no extra buffer, so it is used there.
The signs go back with ``all_gather`` of packed bytes (both backends); NCCL has no bitwise reductions, so an
OR-reduction of bit masks is not an option, and an all_gather of bytes is what both support.

Modes (registered in :data:`dbgen.trainer.SYNC_MODES` by ``(comm.binary_weights, comm.binary_grads)``)
---------------------------------------------------------------------------------------------------
* ``packed/none``, ``packed/onebit``: :class:`PackedSync`, binary latents and their Adam state sharded over
  the ranks (:class:`BinaryLayout`), module weights are +-1 signs refreshed by a packed all-gather.
* ``dp/onebit``: :class:`DataParallelOnebitSync`, plain data parallelism whose binary-gradient all-reduce is
  1-bit with sender- and receiver-side error feedback (1-bit Adam's compressed all-reduce).
* 1-bit messages and error feedback: :class:`OneBitExchange`.
* Per-rank checkpoint parts: ``<checkpoint>/packed/rank_<r>_of_<W>.pt`` (:func:`save_partition`), read back
  by element range for any world size (:func:`load_partitions`).
* :class:`CountedSync` labels each phase of a step with its byte kind; ``COUNTER.take()`` gives the bytes
  sent since the last call, which :meth:`dbgen.trainer.Trainer.train_step` returns as ``comm_bytes``.
"""

from __future__ import annotations

import functools
import logging
import math
import pickle
import threading
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from .nn import pack_signs, unpack_signs

__all__ = [
    "ALIGN",
    "COUNTER",
    "KINDS",
    "ONEBIT_CHUNK",
    "BinaryLayout",
    "CommCounter",
    "CountedSync",
    "DataParallelOnebitSync",
    "OneBitExchange",
    "PackedSync",
    "all_gather_flat",
    "bytes_sent",
    "comm_kind",
    "install",
    "installed",
    "load_partitions",
    "onebit_compress",
    "onebit_decompress",
    "reduce_scatter_sum",
    "save_partition",
    "slice_size",
    "uninstall",
]

log = logging.getLogger(__name__)

KINDS = ("grad", "weight", "other")


# ------------------------------------------------------------------------------------------------ counting
class CommCounter:
    """Bytes this process sent in collectives, by kind. ``take()`` returns (and resets) the bytes since the
    last ``take()``: the trainer takes once per step, so the numbers are per step."""

    def __init__(self):
        self._lock = threading.Lock()
        self.total = dict.fromkeys(KINDS, 0)
        self._since = dict.fromkeys(KINDS, 0)
        self.calls: Counter = Counter()  # (op, kind) -> number of calls, for inspection

    def add(self, kind: str, nbytes: int, op: str = "?") -> None:
        if kind not in KINDS:
            raise ValueError(f"comm kind {kind!r}: expected one of {KINDS}")
        with self._lock:
            self.total[kind] += int(nbytes)
            self._since[kind] += int(nbytes)
            self.calls[(op, kind)] += 1

    def take(self) -> dict[str, int]:
        """``{kind: bytes}`` sent since the previous call (every kind present, zeros included)."""
        with self._lock:
            out, self._since = self._since, dict.fromkeys(KINDS, 0)
        return out


COUNTER = CommCounter()
_local = threading.local()


@contextmanager
def comm_kind(kind: str):
    """Collectives issued inside count as ``kind`` (innermost context wins)."""
    if kind not in KINDS:
        raise ValueError(f"comm kind {kind!r}: expected one of {KINDS}")
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(kind)
    try:
        yield
    finally:
        stack.pop()


def current_kind() -> str:
    stack = _local.__dict__.get("stack")
    return stack[-1] if stack else "other"


def _nbytes(t) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    return sum(_nbytes(x) for x in t)


def bytes_sent(op: str, nbytes: int, world: int, rank: int, backend: str = "gloo", root: int | None = None) -> int:
    """Bytes one rank sends for ``op`` on ``nbytes`` of input (the table in the module docstring)."""
    if world <= 1:
        return 0
    w = world
    nccl = backend == "nccl"
    if op == "all_reduce":
        return 2 * (w - 1) * nbytes // w
    if op == "reduce_scatter":
        return ((w - 1) if nccl else 2 * (w - 1)) * nbytes // w
    if op == "all_to_all":
        return (w - 1) * nbytes // w
    if op == "all_gather":
        return (w - 1) * nbytes
    if op == "broadcast":
        if nccl:
            return nbytes if rank != (root - 1) % w else 0
        return (w - 1) * nbytes if rank == root else 0
    if op == "reduce":
        if nccl:
            return (w - 1) * nbytes // w
        return (w - 1) * nbytes // w if rank == root else nbytes
    if op == "send":
        return nbytes
    raise ValueError(f"bytes_sent: unknown op {op!r}")


# -------------------------------------------------------------------------------- torch.distributed hooks
def _group_info(group, tensor=None) -> tuple[int, int, str]:
    w, r = dist.get_world_size(group), dist.get_rank(group)
    backend = "nccl" if isinstance(tensor, torch.Tensor) and tensor.is_cuda else "gloo"
    return w, r, backend


def _count(op: str, nbytes: int, group=None, tensor=None, root: int | None = None) -> None:
    w, r, backend = _group_info(group, tensor)
    if root is not None and group is not None:
        root = dist.get_group_rank(group, root)  # torch takes the global rank; the algorithm uses the group's
    COUNTER.add(current_kind(), bytes_sent(op, nbytes, w, r, backend, root), op)


def _arg(args, kwargs, i, name, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _pickled_size(obj) -> int:
    try:
        return len(pickle.dumps(obj))
    except Exception:  # what torch cannot pickle either fails in the collective itself
        return 0


# op name -> (the torch.distributed function's name, how to count one call). Each counter gets the call's
# (args, kwargs) as passed to torch.distributed.
def _c_all_reduce(a, k):
    t = _arg(a, k, 0, "tensor")
    _count("all_reduce", _nbytes(t), _arg(a, k, 2, "group"), t)


def _c_all_reduce_coalesced(a, k):
    ts = _arg(a, k, 0, "tensors")
    _count("all_reduce", _nbytes(ts), _arg(a, k, 2, "group"), ts[0] if ts else None)


def _c_reduce_scatter_single(a, k):
    t = _arg(a, k, 1, "input")
    _count("reduce_scatter", _nbytes(t), _arg(a, k, 3, "group"), t)


def _c_reduce_scatter(a, k):
    ts = _arg(a, k, 1, "input_list")
    _count("reduce_scatter", _nbytes(ts), _arg(a, k, 3, "group"), ts[0] if ts else None)


def _c_all_gather_single(a, k):
    t = _arg(a, k, 1, "input_tensor")
    _count("all_gather", _nbytes(t), _arg(a, k, 2, "group"), t)


def _c_all_gather(a, k):
    t = _arg(a, k, 1, "tensor")
    _count("all_gather", _nbytes(t), _arg(a, k, 2, "group"), t)


def _c_all_gather_coalesced(a, k):
    ts = _arg(a, k, 1, "input_tensor_list")
    _count("all_gather", _nbytes(ts), _arg(a, k, 2, "group"), ts[0] if ts else None)


def _c_all_to_all_single(a, k):
    inp = _arg(a, k, 1, "input")
    splits, group = _arg(a, k, 3, "input_split_sizes"), _arg(a, k, 4, "group")
    w, r, backend = _group_info(group, inp)
    if w <= 1:
        return
    if splits:  # rows per destination; what stays here is not sent
        row = inp.element_size() * (inp[0].numel() if inp.dim() else 1)
        sent = (sum(splits) - splits[r]) * row
    else:
        sent = bytes_sent("all_to_all", _nbytes(inp), w, r, backend)
    COUNTER.add(current_kind(), sent, "all_to_all")


def _c_all_to_all(a, k):
    ins, group = _arg(a, k, 1, "input_tensor_list"), _arg(a, k, 2, "group")
    w, r, _ = _group_info(group)
    if w > 1:
        COUNTER.add(current_kind(), sum(_nbytes(t) for i, t in enumerate(ins) if i != r), "all_to_all")


def _c_broadcast(a, k):
    t = _arg(a, k, 0, "tensor")
    _count("broadcast", _nbytes(t), _arg(a, k, 2, "group"), t, root=_arg(a, k, 1, "src", 0))


def _c_reduce(a, k):
    t = _arg(a, k, 0, "tensor")
    _count("reduce", _nbytes(t), _arg(a, k, 3, "group"), t, root=_arg(a, k, 1, "dst", 0))


def _c_send(a, k):
    t = _arg(a, k, 0, "tensor")
    COUNTER.add(current_kind(), _nbytes(t), "send")


def _c_gather(a, k):
    t, dst = _arg(a, k, 0, "tensor"), _arg(a, k, 2, "dst", 0)
    if dist.get_rank() != dst:  # dst is a global rank
        COUNTER.add(current_kind(), _nbytes(t), "gather")


def _c_scatter(a, k):
    parts, src = _arg(a, k, 1, "scatter_list"), _arg(a, k, 2, "src", 0)
    if dist.get_rank() == src and parts:
        me = dist.get_rank(_arg(a, k, 3, "group"))
        COUNTER.add(current_kind(), sum(_nbytes(t) for i, t in enumerate(parts) if i != me), "scatter")


def _c_all_gather_object(a, k):
    obj, group = _arg(a, k, 1, "obj"), _arg(a, k, 2, "group")
    w = dist.get_world_size(group)
    # torch all-gathers the 8-byte sizes, then the pickles padded to the largest; counted at this rank's size
    COUNTER.add(current_kind(), (w - 1) * (8 + _pickled_size(obj)), "all_gather_object")


def _c_broadcast_object_list(a, k):
    objs, src, group = _arg(a, k, 0, "object_list"), _arg(a, k, 1, "src", 0), _arg(a, k, 2, "group")
    if dist.get_rank() == src:
        w = dist.get_world_size(group)
        COUNTER.add(current_kind(), (w - 1) * sum(8 + _pickled_size(o) for o in objs), "broadcast_object_list")


def _c_batch_isend_irecv(a, k):
    for p2p in _arg(a, k, 0, "p2p_op_list"):
        if p2p.op in (dist.isend, _ORIGINALS.get("isend")):
            COUNTER.add(current_kind(), _nbytes(p2p.tensor), "send")


def _c_none(a, k):
    pass


_COUNTERS = {
    "all_reduce": _c_all_reduce,
    "all_reduce_coalesced": _c_all_reduce_coalesced,
    "reduce_scatter_single": _c_reduce_scatter_single,
    "reduce_scatter_tensor": _c_reduce_scatter_single,
    "reduce_scatter": _c_reduce_scatter,
    "all_gather_single": _c_all_gather_single,
    "all_gather_into_tensor": _c_all_gather_single,
    "all_gather": _c_all_gather,
    "all_gather_coalesced": _c_all_gather_coalesced,
    "all_to_all_single": _c_all_to_all_single,
    "all_to_all": _c_all_to_all,
    "broadcast": _c_broadcast,
    "reduce": _c_reduce,
    "send": _c_send,
    "isend": _c_send,
    "recv": _c_none,
    "irecv": _c_none,
    "gather": _c_gather,
    "scatter": _c_scatter,
    "all_gather_object": _c_all_gather_object,
    "broadcast_object_list": _c_broadcast_object_list,
    "batch_isend_irecv": _c_batch_isend_irecv,
    "barrier": _c_none,  # a few bytes of control messages
    "monitored_barrier": _c_none,
}
_ORIGINALS: dict = {}
_install_lock = threading.Lock()


def _wrap(name, fn, count):
    @functools.wraps(fn)
    def counted(*args, **kwargs):
        count(args, kwargs)
        return fn(*args, **kwargs)

    counted.__dbgen_counted__ = True
    return counted


def install() -> CommCounter:
    """Count every ``torch.distributed`` collective of this process into :data:`COUNTER` (idempotent)."""
    with _install_lock:
        if not _ORIGINALS:
            for name, count in _COUNTERS.items():
                fn = getattr(dist, name, None)
                if fn is None or getattr(fn, "__dbgen_counted__", False):
                    continue
                _ORIGINALS[name] = fn
                setattr(dist, name, _wrap(name, fn, count))
    return COUNTER


def installed() -> bool:
    return bool(_ORIGINALS)


def uninstall() -> None:
    """Restore the original ``torch.distributed`` functions."""
    with _install_lock:
        for name, fn in _ORIGINALS.items():
            setattr(dist, name, fn)
        _ORIGINALS.clear()



# ------------------------------------------------------------------------------------ collectives we issue
def _dist_fn(name: str, fallback: str):
    """The (possibly counted) torch.distributed function, looked up at call time; older torch: ``fallback``."""
    return getattr(dist, name, None) or getattr(dist, fallback)


def reduce_scatter_sum(flat: torch.Tensor, world: int) -> torch.Tensor:
    """Rank r gets the sum over ranks of ``flat[r*s:(r+1)*s]`` (``s = flat.numel() // world``).

    gloo: ``all_to_all`` then a local sum (sends ``(W-1)/W n``; gloo's reduce_scatter would send twice that).
    NCCL: the native ring reduce-scatter (the same bytes, no receive buffer of size n).
    """
    s = flat.numel() // world
    if flat.is_cuda:
        out = flat.new_empty(s)
        _dist_fn("reduce_scatter_single", "reduce_scatter_tensor")(out, flat)
        return out
    recv = torch.empty_like(flat)
    dist.all_to_all_single(recv, flat)  # recv.view(world, s)[j]: rank j's part of my slice
    return recv.view(world, s).sum(dim=0)


def all_gather_flat(out: torch.Tensor, mine: torch.Tensor) -> torch.Tensor:
    """``out`` (world * n,) = every rank's ``mine`` (n,), in rank order."""
    _dist_fn("all_gather_single", "all_gather_into_tensor")(out, mine)
    return out


# ------------------------------------------------------------------------------------------- 1-bit messages
ALIGN = 2048  # slice sizes are multiples of this: whole bytes of signs and whole 1-bit chunks
ONEBIT_CHUNK = 2048  # elements that share one fp32 scale in a 1-bit message (1 + 32/2048 bits per element)


def onebit_compress(x: torch.Tensor, chunk: int = ONEBIT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (n,), n a multiple of ``chunk`` -> (signs packed 8 per byte (n/8,) uint8, scales (n/chunk,) fp32).

    The scale of a chunk is the mean of ``|x|`` over it: the ``s`` minimizing ``||x - s * sign(x)||^2``.
    """
    scales = x.view(-1, chunk).abs().mean(dim=1)  # (n/chunk,)
    return pack_signs(x), scales.float()


def onebit_decompress(bits: torch.Tensor, scales: torch.Tensor, chunk: int = ONEBIT_CHUNK) -> torch.Tensor:
    """``sign * scale`` per element, (n,): :func:`onebit_compress`'s input up to the compression error."""
    n = scales.numel() * chunk
    return (unpack_signs(bits, (scales.numel(), chunk)) * scales[:, None]).view(n)


def _encode(x: torch.Tensor, parts: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (parts * s,) -> (messages (parts, s/8 + 4 s/chunk) uint8: signs then scale bytes, decoded x)."""
    s = x.numel() // parts
    bits, scales = onebit_compress(x, chunk)
    msg = torch.cat([bits.view(parts, s // 8), scales.view(parts, s // chunk).view(torch.uint8)], dim=1)
    return msg, onebit_decompress(bits, scales, chunk)


def _decode(msgs: torch.Tensor, s: int, chunk: int) -> torch.Tensor:
    """(parts, s/8 + 4 s/chunk) uint8 messages -> (parts, s) values."""
    bits, scales = msgs[:, :s // 8], msgs[:, s // 8:].contiguous().view(torch.float32)
    return onebit_decompress(bits.reshape(-1), scales.reshape(-1), chunk).view(msgs.shape[0], s)


class OneBitExchange:
    """1-bit gradient exchange with error feedback over a :class:`BinaryLayout` (after 1-bit Adam).

    * :meth:`reduce_scatter` (sender side): ``x = g + send_error``; every peer gets the signs of its slice of
      ``x`` plus one fp32 scale per :data:`ONEBIT_CHUNK` elements (``all_to_all``), and what the message did
      not carry, ``x - decoded``, is the new ``send_error``. The receiver averages the W decoded messages at
      full precision: this rank's slice of the averaged gradient.
    * :meth:`all_gather` (receiver side, for modes that must send the averaged gradient back to everyone):
      ``z = slice + recv_error`` is compressed the same way and all-gathered; ``z - decoded`` is the new
      ``recv_error``. Every rank decodes every slice: the full averaged gradient, identical on all ranks.

    New error buffers are pending until :meth:`commit` (the step was taken); :meth:`discard` drops them (a
    skipped step: its gradient is dropped, so is what it left unsent). Padding elements stay exactly zero.
    """

    def __init__(self, layout: BinaryLayout, receiver_side: bool):
        self.layout = layout
        dev = layout.params[0].device
        self.send_error = torch.zeros(layout.padded, device=dev)  # (padded,) indexed like the flat gradient
        self.recv_error = torch.zeros(layout.slice, device=dev) if receiver_side else None  # (slice,)
        self._pending: dict[str, torch.Tensor] = {}

    def reduce_scatter(self, g: torch.Tensor) -> torch.Tensor:
        """(padded,) local gradient (consumed) -> (slice,) this rank's slice of the average over ranks."""
        lay, c = self.layout, ONEBIT_CHUNK
        x = g.add_(self.send_error)
        msg, decoded = _encode(x, lay.world, c)  # (world, slice/8 + 4 slice/c): one message per destination
        error = x.sub_(decoded)
        error[lay.numel:] = 0
        self._pending["send_error"] = error
        recv = torch.empty_like(msg)
        dist.all_to_all_single(recv, msg)  # recv[j]: rank j's message about my slice
        mine = _decode(recv, lay.slice, c).sum(dim=0).mul_(1.0 / lay.world)
        mine[lay.valid:] = 0
        return mine

    def all_gather(self, mine: torch.Tensor) -> torch.Tensor:
        """(slice,) this rank's averaged slice -> (padded,) every slice, as decoded 1-bit messages."""
        lay, c = self.layout, ONEBIT_CHUNK
        z = mine + self.recv_error
        msg, decoded = _encode(z, 1, c)  # (1, slice/8 + 4 slice/c)
        error = z.sub_(decoded)
        error[lay.valid:] = 0
        self._pending["recv_error"] = error
        out = all_gather_flat(msg.new_empty(lay.world * msg.numel()), msg.view(-1))
        full = _decode(out.view(lay.world, -1), lay.slice, c).view(-1)
        full[lay.numel:] = 0
        return full

    def commit(self) -> None:
        for name, t in self._pending.items():
            setattr(self, name, t)
        self._pending.clear()

    def discard(self) -> None:
        self._pending.clear()


# ------------------------------------------------------------------------------------------ binary layout
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

    def flat(self, tensors) -> torch.Tensor:
        """(padded,) fp32: ``tensors`` (one per latent, None = zeros) concatenated, zero padding."""
        out = torch.zeros(self.padded, dtype=torch.float32, device=self.params[0].device)
        o = 0
        for p, t in zip(self.params, tensors, strict=True):
            if t is not None:
                out[o:o + p.numel()].copy_(t.reshape(-1))
            o += p.numel()
        return out

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``flat`` shaped like the latents (inverse of :meth:`flat`)."""
        out, o = [], 0
        for p in self.params:
            out.append(flat[o:o + p.numel()].view_as(p))
            o += p.numel()
        return out

    @torch.no_grad()
    def write_signs(self, packed: torch.Tensor) -> None:
        """Set every latent to the +-1 signs in ``packed`` ((padded/8,) uint8, the flat vector's layout)."""
        o = 0
        for p in self.params:
            n = p.numel()
            lo, hi = o // 8, (o + n + 7) // 8  # the bytes holding bits [o, o + n)
            bits = unpack_signs(packed[lo:hi], (hi - lo) * 8, p.dtype)
            p.copy_(bits[o - 8 * lo:o - 8 * lo + n].view_as(p))
            o += n


def slice_size(numel: int, world: int) -> int:
    """Elements per rank: ``numel / world`` rounded up to a multiple of :data:`ALIGN`."""
    return max(1, math.ceil(numel / (world * ALIGN))) * ALIGN


# ------------------------------------------------------------------------------------ per-rank checkpoints
PARTITION_DIR = "packed"


def _partition_name(rank: int, world: int) -> str:
    return f"rank_{rank:05d}_of_{world:05d}.pt"


def save_partition(directory: str | Path, layout: BinaryLayout, ranged: dict, full: dict, extra: dict) -> Path:
    """This rank's part of a checkpoint: ``ranged`` tensors cover its slice (only the real elements are
    written), ``full`` ones the whole flat vector (``numel`` elements); None values are kept as None."""
    d = Path(directory) / PARTITION_DIR
    d.mkdir(parents=True, exist_ok=True)
    part = {"format": 1, "world_size": layout.world, "rank": layout.rank, "start": layout.start,
            "stop": layout.start + layout.valid, "numel": layout.numel, **extra}
    for k, t in ranged.items():
        part[k] = None if t is None else t.detach()[:layout.valid].cpu().clone()
    for k, t in full.items():
        part[k] = None if t is None else t.detach()[:layout.numel].cpu().clone()
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
        raise RuntimeError(f"{directory}: no per-rank partitions ({PARTITION_DIR}/rank_*_of_*.pt); was the "
                           f"checkpoint written with another comm mode?")
    old_world = int(files[0].stem.rsplit("_", 1)[1])
    names = {f.name for f in files}
    expected = {_partition_name(r, old_world) for r in range(old_world)}
    if names != expected:
        raise RuntimeError(f"{d}: incomplete partitions for {old_world} ranks (missing "
                           f"{sorted(expected - names)[:4]}, unexpected {sorted(names - expected)[:4]})")
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
                    out[k][x - lo:y - lo] = part[k][x - a:y - a].to(dev)
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
            out[k][:layout.numel] = torch.stack(ts).mean(dim=0)
    return out


# --------------------------------------------------------------------------------------------- the modes
def _check_stage0(engine, mode: str) -> None:
    if engine.zero_optimization_stage() != 0:
        raise ValueError(f"comm {mode} does its own gradient exchange: needs scale.zero_stage=0")


def _binary_group(optimizer, mode: str) -> dict:
    groups = [g for g in optimizer.param_groups if g.get("binary")]
    if not groups:
        raise ValueError(f"comm {mode}: the model has no binary layers")
    return groups[0]


@torch.no_grad()
def _all_reduce_mean(params) -> None:
    """One all-reduce of the flattened gradients of ``params``, averaged, written back (as DeepSpeed's stage-0
    reduction does it: sum, then times 1/W)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.mul_(1.0 / dist.get_world_size())
    o = 0
    for p in params:
        p.grad = flat[o:o + p.numel()].view_as(p)
        o += p.numel()


class PackedSync:
    """``comm.binary_weights: packed``: binary latents and their Adam state sharded over the ranks; module
    weights are the +-1 signs, refreshed from a packed all-gather after every step.

    Per step (every rank)::

        backward                 local; DeepSpeed's all-reduce is off (ZeRO stage 0 required)
        reduce     grad          full-precision gradients: one all-reduce, averaged (as DeepSpeed's would)
                                 binary gradients: flattened, reduce-scattered (all_to_all + local sum on gloo,
                                 ring reduce-scatter on NCCL), averaged -> this rank's slice; or, with
                                 binary_grads: onebit after the warm-up, 1-bit messages (OneBitExchange)
        grad_norm  other         sqrt(full-precision part + all-reduced sum of the slices' squares)
        step       weight        Adam (ClientAdam: skip, clip_coef, clamp) on the full-precision params and on
                                 this rank's latent slice; then the slice's signs, 8 per byte, all-gathered and
                                 written into every rank's module (a skipped step changes nothing, sends nothing)

    The full-precision params stay in the engine's client optimizer; the binary group moves into
    ``self.binary_optimizer`` (a ClientAdam over the slice), so the per-element math is the one plain data
    parallelism runs: with 2 ranks on gloo the reduced gradients are bit-identical to DeepSpeed's all-reduce.

    With 1-bit gradients, only the sender side of :class:`OneBitExchange` is used: the receiver owns the
    optimizer of its slice and consumes the averaged gradient at full precision, and what goes back is the
    lossless sign all-gather, so unlike 1-bit Adam's compressed all-reduce there is no second compression and
    nothing for a receiver-side error buffer to hold (:class:`DataParallelOnebitSync` has both sides).

    Adam runs unchanged on the decoded 1-bit gradients. 1-bit Adam freezes the second moment after its
    warm-up (it compresses the momentum); we measured that rule here and dropped it: frozen from a short
    warm-up it diverged (paper RVAE, 1 warm-up step: elements whose first gradient was tiny got huge steps,
    and steps were skipped), and it was not better on the tiny RVAE (0.6% vs 0.2% above uncompressed after
    80 steps, 15 warm-up). The per-chunk scale keeps the decoded gradients, and so the second moment, at the
    gradient's scale; the warm-up keeps the first, fastest-changing steps exact.

    The module's binary weights are +-1, so an EMA (``train.ema_decay``) averages signs, not latents: EMA
    weights then use the sign of a running average of signs (a majority vote over recent steps).

    Checkpoints: every rank writes ``packed/rank_<r>_of_<W>.pt`` (latent slice, Adam moments and step, sender
    error) next to DeepSpeed's files; on resume every rank reads the element ranges it now owns from whichever
    files hold them (:func:`load_partitions`), so any number of workers can resume any packed checkpoint.
    """

    mode = "packed"

    def __init__(self, engine, optimizer, cfg):
        _check_stage0(engine, "binary_weights=packed")
        self.engine, self.optimizer = engine, optimizer
        engine.enable_backward_allreduce = False
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        group = _binary_group(optimizer, "binary_weights=packed")
        self.layout = BinaryLayout(group["params"], self.world, self.rank)
        self.fp_params = [p for g in optimizer.param_groups if not g.get("binary") for p in g["params"]]
        optimizer.param_groups.remove(group)  # the engine's optimizer keeps the full-precision params only
        full = self.layout.flat([p.detach() for p in self.layout.params])  # identical on every rank (broadcast)
        start = self.layout.start
        self.latent = torch.nn.Parameter(full[start:start + self.layout.slice].clone())  # (slice,)
        self.binary_optimizer = type(optimizer)([dict(group, params=[self.latent])], lr=group["lr"])
        self.layout.write_signs(pack_signs(full))  # from here on the module holds signs only
        self.onebit = cfg.comm.binary_grads == "onebit"
        self.exchange = OneBitExchange(self.layout, receiver_side=False) if self.onebit else None
        self.warmup = cfg.comm.onebit_warmup_steps
        self.steps = 0  # reduce() calls (skipped steps included): the warm-up clock
        self._compressed = False
        log.info("packed sync: %d binary latents in %d tensors, slice %d per rank (%d real), %s",
                 self.layout.numel, len(self.layout.params), self.layout.slice, self.layout.valid,
                 f"1-bit gradients after {self.warmup} steps" if self.onebit else "uncompressed gradients")

    def backward(self, loss, last):
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss)  # scales by 1 / grad_accum; no reduction (enable_backward_allreduce off)

    @torch.no_grad()
    def reduce(self):
        with comm_kind("grad"):
            _all_reduce_mean(self.fp_params)
            g = self.layout.flat([p.grad for p in self.layout.params])  # (padded,)
            for p in self.layout.params:
                p.grad = None
            self._compressed = self.onebit and self.steps >= self.warmup
            if self._compressed:
                mine = self.exchange.reduce_scatter(g)
            else:
                mine = reduce_scatter_sum(g, self.world).mul_(1.0 / self.world)
        self.latent.grad = mine  # (slice,); padding is zero
        self.steps += 1

    @torch.no_grad()
    def grad_norm(self):
        with comm_kind("other"):
            fp = torch.stack([p.grad.float().pow(2).sum() for p in self.fp_params]).sum()
            mine = self.latent.grad.float().pow(2).sum().reshape(1)
            dist.all_reduce(mine)  # identical on every rank, as is the full-precision part
        return torch.nan_to_num(torch.sqrt(fp + mine[0]), nan=math.inf)

    def step(self, lr, clip_coef, skip):
        skip = bool(skip)  # a host decision: whether to send this step's signs and keep its errors depends on it
        for g in (*self.optimizer.param_groups, *self.binary_optimizer.param_groups):
            g["lr"] = lr
        self.optimizer.skip, self.optimizer.clip_coef = skip, clip_coef
        self.engine.step()  # full-precision update (ClientAdam), DeepSpeed's counters, module grads cleared
        self.binary_optimizer.skip, self.binary_optimizer.clip_coef = skip, clip_coef
        self.binary_optimizer.step()  # Adam + clamp on the slice
        if self._compressed and skip:
            self.exchange.discard()  # the step's gradient is dropped, and so is what it left unsent
        elif self._compressed:
            self.exchange.commit()
        self.latent.grad = None
        if not skip:
            self._gather_signs()

    @torch.no_grad()
    def _gather_signs(self) -> None:
        with comm_kind("weight"):
            mine = pack_signs(self.latent)  # (slice/8,) uint8
            full = all_gather_flat(mine.new_empty(self.world * mine.numel()), mine)  # (padded/8,)
        self.layout.write_signs(full)

    # ---------------------------------------------------------------------------------------- checkpoints
    def state_dict(self):
        """The rank-independent part (in the engine's client state, written by rank 0)."""
        return {"mode": self.mode, "steps": self.steps}

    def load_state_dict(self, state):
        if state.get("mode") != self.mode:
            raise RuntimeError(f"checkpoint written with comm mode {state.get('mode', 'dp')!r}, not {self.mode!r}")
        self.steps = state["steps"]

    def save_partition(self, directory):
        state = self.binary_optimizer.state.get(self.latent, {})
        ranged = {"latent": self.latent, "exp_avg": state.get("exp_avg"), "exp_avg_sq": state.get("exp_avg_sq")}
        full = {"send_error": self.exchange.send_error if self.exchange else None}
        step = state["step"].cpu().clone() if state else None
        return save_partition(directory, self.layout, ranged, full, {"step": step})

    @torch.no_grad()
    def load_partition(self, directory):
        part = load_partitions(directory, self.layout, ["latent", "exp_avg", "exp_avg_sq"],
                               ["send_error"] if self.onebit else [])
        if part["latent"] is None:
            raise RuntimeError(f"{directory}: the partitions hold no latents (written by another comm mode?)")
        self.latent.copy_(part["latent"])
        self.binary_optimizer.state.pop(self.latent, None)
        if part["step"] is not None and part["exp_avg"] is not None:
            self.binary_optimizer.state[self.latent] = {"step": part["step"].clone(), "exp_avg": part["exp_avg"],
                                                        "exp_avg_sq": part["exp_avg_sq"]}
        if self.onebit and part["send_error"] is not None:
            self.exchange.send_error = part["send_error"]
        self._gather_signs()

    def full_state(self) -> dict[str, torch.Tensor]:
        """The whole (unsharded) binary state on every rank: latents, Adam moments and, with 1-bit gradients,
        the sum of the ranks' sender errors. For tests and inspection (all-gathers everything)."""
        state = self.binary_optimizer.state.get(self.latent, {})
        parts = {"latent": self.latent.detach()}
        if state:
            parts.update(exp_avg=state["exp_avg"], exp_avg_sq=state["exp_avg_sq"])
        out = {}
        with comm_kind("other"):
            for k, t in parts.items():
                out[k] = all_gather_flat(t.new_empty(self.layout.padded), t.contiguous())[:self.layout.numel]
            if self.exchange is not None:
                e = self.exchange.send_error.clone()
                dist.all_reduce(e)
                out["send_error_sum"] = e[:self.layout.numel]
        return out


class DataParallelOnebitSync:
    """``comm: binary_weights dp, binary_grads onebit``: plain data parallelism (every rank holds every latent
    and its Adam state) with the binary gradients' all-reduce compressed after the warm-up, as 1-bit Adam's
    compressed all-reduce: a 1-bit reduce-scatter with sender-side error feedback, then each rank's averaged
    slice compressed again with its receiver-side error buffer and all-gathered as 1-bit messages
    (:class:`OneBitExchange`). Full-precision gradients are all-reduced as usual; during the warm-up
    everything goes through DeepSpeed's own all-reduce. Error buffers are per rank, in
    ``packed/rank_<r>_of_<W>.pt``; latents and Adam state are in DeepSpeed's (replicated) checkpoint.
    """

    mode = "dp_onebit"

    def __init__(self, engine, optimizer, cfg):
        _check_stage0(engine, "binary_grads=onebit")
        self.engine, self.optimizer = engine, optimizer
        engine.enable_backward_allreduce = False
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.layout = BinaryLayout(_binary_group(optimizer, "binary_grads=onebit")["params"], self.world, self.rank)
        self.fp_params = [p for g in optimizer.param_groups if not g.get("binary") for p in g["params"]]
        self.exchange = OneBitExchange(self.layout, receiver_side=True)
        self.warmup = cfg.comm.onebit_warmup_steps
        self.steps, self._compressed = 0, False

    def backward(self, loss, last):
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss)

    @torch.no_grad()
    def reduce(self):
        self._compressed = self.steps >= self.warmup
        with comm_kind("grad"):
            if not self._compressed:
                self.engine.allreduce_gradients()
            else:
                _all_reduce_mean(self.fp_params)
                g = self.layout.flat([p.grad for p in self.layout.params])  # (padded,)
                full = self.exchange.all_gather(self.exchange.reduce_scatter(g))  # (padded,), same on all ranks
                for p, t in zip(self.layout.params, self.layout.split(full), strict=True):
                    p.grad = t
        self.steps += 1

    @torch.no_grad()
    def grad_norm(self):
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False).float().reshape(1)
        norm = torch.nan_to_num(norm, nan=math.inf)
        with comm_kind("other"):
            dist.all_reduce(norm, op=dist.ReduceOp.MAX)  # agree bit-for-bit
        return norm[0]

    def step(self, lr, clip_coef, skip):
        skip = bool(skip)  # a host decision: whether to keep this step's compression errors depends on it
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.skip, self.optimizer.clip_coef = skip, clip_coef
        self.engine.step()  # ClientAdam on every (replicated) parameter
        if self._compressed and skip:
            self.exchange.discard()  # the step's gradient is dropped, and so is what it left unsent
        elif self._compressed:
            self.exchange.commit()

    def state_dict(self):
        return {"mode": self.mode, "steps": self.steps}

    def load_state_dict(self, state):
        if not state:  # a plain data-parallel checkpoint: same latents and optimizer; warm up, zero errors
            return
        if state.get("mode") != self.mode:
            raise RuntimeError(f"checkpoint written with comm mode {state.get('mode')!r}, not {self.mode!r}")
        self.steps = state["steps"]

    def save_partition(self, directory):
        return save_partition(directory, self.layout, {"recv_error": self.exchange.recv_error},
                              {"send_error": self.exchange.send_error}, {"step": None})

    def load_partition(self, directory):
        if not (Path(directory) / PARTITION_DIR).is_dir():
            return  # written by plain data parallelism: no error buffers yet
        part = load_partitions(directory, self.layout, ["recv_error"], ["send_error"])
        if part["recv_error"] is not None:
            self.exchange.recv_error = part["recv_error"]
        if part["send_error"] is not None:
            self.exchange.send_error = part["send_error"]


# ------------------------------------------------------------------------------------ phases -> byte kinds
class CountedSync:
    """A GradientSync whose collectives count by phase: ``backward``/``reduce`` as ``grad``, ``grad_norm`` as
    ``other``, ``step`` as ``weight`` (ZeRO's parameter all-gather; the packed sign all-gather). A sync may
    label its own collectives more precisely (the innermost :func:`comm_kind` wins). Everything else, and the
    optional per-rank checkpoint hooks ``save_partition``/``load_partition`` (no-ops when absent), pass
    through."""

    def __init__(self, sync):
        self.inner = sync

    def backward(self, loss, last):
        with comm_kind("grad"):
            return self.inner.backward(loss, last)

    def reduce(self):
        with comm_kind("grad"):
            return self.inner.reduce()

    def grad_norm(self):
        with comm_kind("other"):
            return self.inner.grad_norm()

    def step(self, lr, clip_coef, skip):
        with comm_kind("weight"):
            return self.inner.step(lr, clip_coef, skip)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        return self.inner.load_state_dict(state)

    def save_partition(self, directory) -> None:
        if hasattr(self.inner, "save_partition"):
            self.inner.save_partition(directory)

    def load_partition(self, directory) -> None:
        if hasattr(self.inner, "load_partition"):
            self.inner.load_partition(directory)

    def __getattr__(self, name):
        return getattr(self.inner, name)
