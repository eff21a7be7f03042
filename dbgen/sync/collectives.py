"""The flat collectives the sync modes issue themselves, each picked for the bytes it sends on each backend.

* :func:`all_reduce_mean`: the full-precision gradients, one all-reduce averaged as DeepSpeed's stage-0
  reduction does it (sum, then times 1/W), so a mode that reduces by itself matches plain data parallelism.
* :func:`reduce_scatter_sum`: the binary gradients, each rank getting the sum of its slice. gloo's
  ``reduce_scatter`` runs a full all-reduce and sends ``2(W-1)/W n``, twice what a reduce-scatter needs; an
  ``all_to_all`` sends each peer exactly its slice, ``(W-1)/W n``, and the sum happens locally. On NCCL the
  native ``reduce_scatter`` is a ring that sends ``(W-1)/W n`` with no extra buffer, so it is used there.
* :func:`all_gather_flat`: packed signs (and 1-bit messages) back to every rank. NCCL has no bitwise
  reductions, so an OR-reduction of bit masks is not an option; an all_gather of bytes is what both support.

Every call goes through the (possibly counted, :mod:`dbgen.sync.accounting`) ``torch.distributed`` function
looked up at call time.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_gather_flat", "all_reduce_mean", "reduce_scatter_sum"]


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


@torch.no_grad()
def all_reduce_mean(params) -> None:
    """One all-reduce of the flattened gradients of ``params``, averaged, written back (as DeepSpeed's stage-0
    reduction does it: sum, then times 1/W)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.mul_(1.0 / dist.get_world_size())
    o = 0
    for p in params:
        p.grad = flat[o : o + p.numel()].view_as(p)
        o += p.numel()
