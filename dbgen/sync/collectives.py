"""The flat collectives the sync modes issue themselves, each picked for the bytes it sends on each backend.

Every one is started asynchronously and returns a :class:`Pending`, whose ``wait()`` finishes it: the serial
schedule waits at once, the overlapped one (:mod:`dbgen.sync.buckets`) starts them during backward and waits
before the optimizer step. The math of a finished collective does not depend on when it was started.

* :func:`start_all_reduce_mean`: full-precision gradients, one all-reduce averaged as DeepSpeed's stage-0
  reduction does it (sum, then times 1/W), so a mode that reduces by itself matches plain data parallelism.
* :func:`start_slice_sum`: a range of the binary gradients' flat vector, each rank getting the sum over ranks
  of the part of it that falls in its slice: an ``all_to_all`` that sends each peer exactly that part
  (``(W-1)/W n`` for the whole vector; gloo's ``reduce_scatter`` runs a full all-reduce, twice the bytes),
  then a local sum, rows added in rank order, so the result does not depend on how the vector was cut.
* :func:`all_gather_flat`: packed signs (and 1-bit messages) back to every rank. NCCL has no bitwise
  reductions, so an OR-reduction of bit masks is not an option; an all_gather of bytes is what both support.

Every call goes through the (possibly counted, :mod:`dbgen.sync.accounting`) ``torch.distributed`` function
looked up at call time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

__all__ = ["Pending", "all_gather_flat", "start_all_reduce_mean", "start_slice_sum", "sum_rows"]


class Pending:
    """A started collective: ``wait()`` waits for it and returns ``finish()``'s result (the reduced values,
    or None where the result was written in place)."""

    def __init__(self, work, finish: Callable[[], object]):
        self.work, self.finish = work, finish

    def wait(self):
        self.work.wait()
        return self.finish()

    def done(self) -> bool:
        """Whether the collective has completed (``wait()`` would not block)."""
        return self.work.is_completed()


def _dist_fn(name: str, fallback: str):
    """The (possibly counted) torch.distributed function, looked up at call time; older torch: ``fallback``."""
    return getattr(dist, name, None) or getattr(dist, fallback)


def sum_rows(t: torch.Tensor) -> torch.Tensor:
    """(W, k) -> (k,): the rows added in order, so each element's sum is the same whatever ``k`` is (a
    reduction kernel may change its order with the shape). In place: the result is row 0 of ``t`` (a receive
    buffer needs no second one of its size)."""
    out = t[0]
    for row in t[1:]:
        out.add_(row)
    return out


def start_slice_sum(x: torch.Tensor, splits: list[int]) -> Pending:
    """Start the exchange of ``x``, this rank's values of one range of a flat vector cut into rank slices:
    ``splits[r]`` elements of ``x`` (consecutive, in rank order) fall in rank r's slice. ``wait()`` returns
    (splits[rank],): the sum over ranks of this rank's part."""
    world, rank = dist.get_world_size(), dist.get_rank()
    k = splits[rank]
    recv = x.new_empty(world * k)
    work = dist.all_to_all_single(recv, x.contiguous(), [k] * world, list(splits), async_op=True)
    return Pending(work, lambda: sum_rows(recv.view(world, k)))


def all_gather_flat(out: torch.Tensor, mine: torch.Tensor) -> torch.Tensor:
    """``out`` (world * n,) = every rank's ``mine`` (n,), in rank order."""
    _dist_fn("all_gather_single", "all_gather_into_tensor")(out, mine)
    return out


@torch.no_grad()
def start_all_reduce_mean(params) -> Pending:
    """Start one all-reduce of the flattened gradients of ``params`` (None: zeros), which become views of the
    flat buffer at once (the separate gradient tensors are freed: a bucket costs no second copy); ``wait()``
    averages them in place (sum, then times 1/W, as DeepSpeed's stage-0 reduction does). Nothing may read or
    write those gradients before ``wait()``."""
    params = list(params)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    o = 0
    for p in params:
        p.grad = flat[o : o + p.numel()].view_as(p)
        o += p.numel()
    work = dist.all_reduce(flat, async_op=True)

    def finish() -> None:
        flat.mul_(1.0 / dist.get_world_size())

    return Pending(work, finish)
