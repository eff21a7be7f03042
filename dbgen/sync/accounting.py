"""Byte accounting: one place that counts the bytes every collective of this process sends, by kind.

Why here and not in each caller: DeepSpeed, the trainer and the sync modes all issue collectives, and the
per-step bytes must cover all of them, whoever issues them. :func:`install` wraps the collective entry points
of ``torch.distributed`` (``all_reduce``, ``reduce_scatter_*``, ``all_gather*``, ``all_to_all*``,
``broadcast``, ``reduce``, the object collectives, point-to-point) in this process. DeepSpeed's communication
backend calls exactly these functions (``deepspeed.comm`` -> ``TorchBackend`` -> ``torch.distributed.<op>``,
looked up at call time), and so do the trainer and the sync modes, so every collective is counted here. Each
call adds the bytes THIS rank sends under the algorithm the backend runs, to the kind (:data:`KINDS`: ``grad``,
``weight``, ``other``) of the innermost :func:`comm_kind` context (``other`` outside any). :data:`COUNTER`'s
``take()`` gives the bytes sent since the last call; the trainer takes once per step (``comm_bytes``).

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
"""

from __future__ import annotations

import functools
import math
import pickle
import threading
from collections import Counter
from contextlib import contextmanager

import torch
import torch.distributed as dist

__all__ = ["COUNTER", "KINDS", "CommCounter", "bytes_sent", "comm_kind", "current_kind", "install"]

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


def _arg(args, kwargs, i, name, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _pickled_size(obj) -> int:
    try:
        return len(pickle.dumps(obj))
    except Exception:  # what torch cannot pickle either fails in the collective itself
        return 0


# Each counter gets one call's (args, kwargs) as passed to torch.distributed.
def _by_formula(op: str, data: tuple[int, str], group_pos: int, root: tuple[int, str] | None = None):
    """The counter of a collective whose bytes follow :func:`bytes_sent`: its input (a tensor or a list of
    tensors) is argument ``data`` (position, name), its group argument ``group_pos``, its root (a global rank)
    argument ``root``."""

    def count(a, k):
        t, group = _arg(a, k, *data), _arg(a, k, group_pos, "group")
        first = t if isinstance(t, torch.Tensor) else (t[0] if t else None)  # which backend: the device
        w, r, backend = _group_info(group, first)
        src = None if root is None else _arg(a, k, *root, 0)
        if src is not None and group is not None:
            src = dist.get_group_rank(group, src)  # torch takes the global rank; the algorithm uses the group's
        COUNTER.add(current_kind(), bytes_sent(op, _nbytes(t), w, r, backend, src), op)

    return count


def _c_all_to_all_single(a, k):
    inp = _arg(a, k, 1, "input")
    splits, group = _arg(a, k, 3, "input_split_sizes"), _arg(a, k, 4, "group")
    w, r, backend = _group_info(group, inp)
    if w <= 1:
        return
    if splits:  # rows per destination; what stays here is not sent
        row = inp.element_size() * math.prod(inp.shape[1:])  # an empty input (nothing for anyone) has rows too
        sent = (sum(splits) - splits[r]) * row
    else:
        sent = bytes_sent("all_to_all", _nbytes(inp), w, r, backend)
    COUNTER.add(current_kind(), sent, "all_to_all")


def _c_all_to_all(a, k):
    ins, group = _arg(a, k, 1, "input_tensor_list"), _arg(a, k, 2, "group")
    w, r, _ = _group_info(group)
    if w > 1:
        COUNTER.add(current_kind(), sum(_nbytes(t) for i, t in enumerate(ins) if i != r), "all_to_all")


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


_reduce_scatter_single = _by_formula("reduce_scatter", (1, "input"), 3)
_all_gather_single = _by_formula("all_gather", (1, "input_tensor"), 2)
_COUNTERS = {  # the torch.distributed function's name -> how to count one call
    "all_reduce": _by_formula("all_reduce", (0, "tensor"), 2),
    "all_reduce_coalesced": _by_formula("all_reduce", (0, "tensors"), 2),
    "reduce_scatter_single": _reduce_scatter_single,
    "reduce_scatter_tensor": _reduce_scatter_single,
    "reduce_scatter": _by_formula("reduce_scatter", (1, "input_list"), 3),
    "all_gather_single": _all_gather_single,
    "all_gather_into_tensor": _all_gather_single,
    "all_gather": _by_formula("all_gather", (1, "tensor"), 2),
    "all_gather_coalesced": _by_formula("all_gather", (1, "input_tensor_list"), 2),
    "all_to_all_single": _c_all_to_all_single,
    "all_to_all": _c_all_to_all,
    "broadcast": _by_formula("broadcast", (0, "tensor"), 2, root=(1, "src")),
    "reduce": _by_formula("reduce", (0, "tensor"), 3, root=(1, "dst")),
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


def _wrap(fn, count):
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
                setattr(dist, name, _wrap(fn, count))
    return COUNTER
