"""Spawned process groups for tests: ``world`` processes, each one rank of a gloo group on 127.0.0.1.

:func:`spawn` runs ``fn(rank, world, *args)`` in every rank after :func:`join_group` (the environment
``torch.distributed`` and DeepSpeed read, then ``init_process_group("gloo")``) and leaves the group when ``fn``
returns. ``fn`` must be a module-level function (the ranks are spawned, not forked, and import it by name).
Child processes inherit the environment tests/conftest.py sets (extension and data caches).
"""

from __future__ import annotations

import os

import torch.multiprocessing as mp
from ray_cluster import free_port

__all__ = ["join_group", "spawn"]


def join_group(rank: int, world: int, port: int) -> None:
    """Make this process rank ``rank`` of a ``world``-rank gloo group whose rank 0 listens on ``port``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)


def _rank_main(rank: int, fn, world: int, port: int, args: tuple) -> None:
    import torch.distributed as dist

    join_group(rank, world, port)
    fn(rank, world, *args)
    dist.destroy_process_group()


def spawn(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned ranks of one gloo group; wait for all of them (an
    exception in any rank is raised here)."""
    mp.start_processes(_rank_main, args=(fn, world, free_port(), args), nprocs=world, join=True, start_method="spawn")
