"""torch.distributed helpers for the work a Trainer does not reduce itself: closed-form statistics
(each process sees its slice of the calibration data) and Concrete AdaMerging's hand-taken gradients."""

from __future__ import annotations

import torch


def dist_rank_world() -> tuple[int, int]:
    """(rank, world) when torch.distributed is running, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a statistic over processes (each process saw its own slice of the calibration data)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over processes (``t`` itself in a single process)."""
    _, world = dist_rank_world()
    return all_reduce_sum(t) / world if world > 1 else t
