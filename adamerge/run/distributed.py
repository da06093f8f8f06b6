"""torch.distributed helpers for the work a Trainer does not reduce itself: closed-form statistics
(each process sees its slice of the calibration data), Concrete AdaMerging's hand-taken gradients, and
the all-gather / reduce-scatter of sharded task vectors (adamerge/core/sharded.py)."""

from __future__ import annotations

import os

import torch


def dist_rank_world() -> tuple[int, int]:
    """(rank, world) when torch.distributed is running, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def several_processes(trainer: dict) -> bool:
    """Whether a ``trainer`` config starts several DDP processes: a ``ddp`` strategy with more than one device
    (``auto`` counts as more) or more than one node."""
    devices = trainer.get("devices", 1)
    one_device = devices in (1, "1") or (isinstance(devices, list) and len(devices) == 1)
    one_node = str(trainer.get("num_nodes", 1) or 1) == "1"
    return str(trainer.get("strategy")).startswith("ddp") and not (one_device and one_node)


def launch_rank_world(devices: object, num_nodes: object = 1) -> tuple[int, int] | None:
    """(rank, world) this process will have in the DDP process group, known before the group starts: from
    torchrun's RANK and WORLD_SIZE, SLURM's task id and count under srun, else as Lightning's own launcher
    numbers its processes (the first has
    no LOCAL_RANK; those it starts get LOCAL_RANK and NODE_RANK): NODE_RANK·devices + LOCAL_RANK. None when
    the trainer's ``devices`` do not say how many processes a node runs (e.g. ``auto``)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if int(env.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in env:  # srun: one task per process
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    try:
        per_node = len(devices) if isinstance(devices, (list, tuple)) else int(devices)
        nodes = int(num_nodes or 1)
    except (TypeError, ValueError):
        return None
    if per_node < 1:
        return None
    return int(env.get("NODE_RANK", 0)) * per_node + int(env.get("LOCAL_RANK", 0)), per_node * nodes


def launch_is_rank_zero() -> bool:
    """Whether this process will be the global rank 0 of its run (the one that does start-up work: checking
    and cleaning the export target, writing the run's config), known before any process group starts:
    torchrun's RANK, SLURM's task id under srun, else Lightning's launcher, whose rank 0 is the first
    process (LOCAL_RANK 0) of node 0 — on a second node LOCAL_RANK is 0 too, so NODE_RANK decides."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]) == 0
    if int(env.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]) == 0
    return int(env.get("NODE_RANK", env.get("GROUP_RANK", 0))) == 0 and int(env.get("LOCAL_RANK", 0)) == 0


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


def all_gather_flat(out: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """Every process's equal-sized ``part`` concatenated in rank order into ``out`` (world · numel entries)."""
    import torch.distributed as dist

    if dist_rank_world()[1] == 1:  # no process group (one process): the slice is the whole
        return out.copy_(part)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the newer name first
    gather(out, part)
    return out


def gather_flat_to_first(part: torch.Tensor) -> torch.Tensor | None:
    """Every process's equal-sized ``part`` concatenated in rank order on the first process; None on the others,
    which never hold more than their own part."""
    import torch.distributed as dist

    rank, world = dist_rank_world()
    if world == 1:
        return part.clone()
    parts = [torch.empty_like(part) for _ in range(world)] if rank == 0 else None
    dist.gather(part.contiguous(), parts, dst=0)
    return torch.cat(parts) if rank == 0 else None


def reduce_scatter_flat(flat: torch.Tensor, size: int) -> torch.Tensor:
    """The sum over processes of ``flat`` (world · ``size`` entries), this process's ``size``-entry slice."""
    import torch.distributed as dist

    if dist_rank_world()[1] == 1:
        return flat.clone()
    out = flat.new_empty(size)
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, flat, op=dist.ReduceOp.SUM)
    return out
