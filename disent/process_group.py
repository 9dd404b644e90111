"""The process group as the rest of the code sees it: whether there is one, this rank and the world size,
a barrier and rank 0's value on every rank (the one `from_rank_zero`). Each is a no-op (or the trivial answer)
without a group, so the same code runs in one process and in many."""
from __future__ import annotations

from typing import Any

import torch.distributed as dist


def active() -> bool:
    """Whether this process is in an initialized process group."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def barrier() -> None:
    if active():
        dist.barrier()


class _Control:
    """The CPU groups training adds beside the world group (disent.train.distributed.make_control_groups)."""

    group: Any = None  # a gloo group beside an NCCL world; None: the world group is gloo already (or no training)
    waiting: Any = None  # the gloo group with the evaluation's timeout, for wait_for_rank_zero


CONTROL = _Control()


def from_rank_zero(value: Any) -> Any:
    """Rank 0's (picklable) value on every rank: a collective, so also a barrier after rank 0's work. It runs on
    the CPU control group when training made one, so a broadcast neither copies through the GPU nor waits behind
    the GPU's queued work."""
    if rank_and_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=CONTROL.group)
    return box[0]
