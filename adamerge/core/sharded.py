"""Task vectors sharded across the processes of a DDP run (``task_vectors.shard=true``).

Each of N processes keeps, of every stacked task vector ``[K, *shape]``, one flat slice
``[K, ceil(numel / N)]`` (the last slices zero-padded), so it holds 1/N of the K·P entries. A training
step then:

1. merges its slice: W_shard = (W0 + offset)_shard + Σ_k c_k τ_k,shard (``Combine``, differentiable in c);
2. all-gathers the slices into the full merged tensors the forward runs on (one tensor at a time);
3. after the per-task backward, reduce-scatters ∂L/∂W (summed over the processes' batches) so each
   process gets the gradient of its own slice, and hands it to its W_shard: ∂L/∂c_k = ⟨g_shard, τ_k,shard⟩.

Every process's coefficient gradient is then its slices' part of the sum over all processes' batches;
DDP all-reduces the coefficients' gradients as a mean over processes, so the result equals unsharded
DDP (where each process holds the full ⟨g_own batch, τ_k⟩ and DDP averages those).

After training, ``merges_to_first`` gathers the merges at the kept states to the first process only, tensor by
tensor, releasing each slice as it goes (the other processes never hold a whole tensor).

``ShardedTaskVectors`` has ``TaskVectors``' reading interface (``StackedTensors``: names, K, ``[name]``,
``nbytes``; and ``map``), so ``MergedModel`` moves and reads it the same way; its tensors are the local slices.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from ..errors import ConfigError
from ..run.distributed import all_gather_flat, gather_flat_to_first, reduce_scatter_flat
from .combine import Combine
from .task_vectors import (
    StackedTensors,
    TaskVectors,
    check_something_to_merge,
    read_stack,
    resolve_dtype,
    select_names,
)

log = logging.getLogger(__name__)


def local_slice(flat: torch.Tensor, rank: int, world: int, copy: bool = True) -> torch.Tensor:
    """``flat[..., rank·s:(rank+1)·s]`` with s = ceil(numel / world), zero-padded to s entries: a copy, or with
    ``copy=False`` a view where no padding is needed."""
    numel = flat.shape[-1]
    size = math.ceil(numel / world)
    lo, hi = min(rank * size, numel), min((rank + 1) * size, numel)
    part = flat[..., lo:hi]
    if hi - lo == size:
        return part.clone() if copy else part
    out = flat.new_zeros((*flat.shape[:-1], size))
    out[..., : hi - lo] = part
    return out


class ShardedTaskVectors(StackedTensors):
    """This process's flat slice ``[K, ceil(numel / world)]`` of every stacked task vector (dense only:
    LoRA factors are not sharded); ``nbytes`` counts the slices, padding included."""

    def __init__(self, tensors: dict[str, torch.Tensor], task_names: list[str], shapes: dict[str, torch.Size],
                 rank: int, world: int):
        self.tensors = tensors
        self.task_names = list(task_names)
        self.shapes = shapes
        self.rank, self.world = rank, world

    @classmethod
    def from_full(cls, tv: TaskVectors, rank: int, world: int) -> ShardedTaskVectors:
        """Keep this process's slice of each of ``tv``'s stacks (the full stacks can then be freed)."""
        if tv.factors is not None:
            raise ConfigError("sharded task vectors need dense task vectors (task_vectors.lora=dense)")
        tensors = {n: local_slice(t.flatten(1), rank, world) for n, t in tv.items()}
        out = cls(tensors, tv.task_names, {n: t.shape[1:] for n, t in tv.items()}, rank, world)
        out.log_held(tv.nbytes())
        return out

    @classmethod
    def from_pool(cls, pool, rank: int, world: int, include: list[str] | None = None,
                  exclude: list[str] | None = None, dtype: str | torch.dtype = "float32",
                  keep_unchanged: bool = False) -> ShardedTaskVectors:
        """This process's slice of every task vector read straight from the experts, one expert's tensor at a
        time: no process ever holds a whole stack (``TaskVectors.from_pool``'s selection of tensors)."""
        dt = resolve_dtype(dtype)
        tensors, shapes, full = {}, {}, 0
        for n in select_names(pool.shared_names(), include, exclude):
            part = read_stack(pool, n, dt, keep_unchanged, lambda tau: local_slice(tau.reshape(1, -1), rank, world)[0])
            if part is not None:
                tensors[n], shapes[n] = part, pool.base_tensor(n).shape
                full += part.shape[0] * shapes[n].numel() * part.element_size()
        check_something_to_merge(bool(tensors))
        out = cls(tensors, pool.task_names, shapes, rank, world)
        out.log_held(full)
        return out

    def log_held(self, full_bytes: int) -> None:
        log.info("task vectors sharded over %d processes: rank %d holds %d of %d bytes (%d padding entries per task)",
                 self.world, self.rank, self.nbytes(), full_bytes, self.padding())

    def map(self, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> ShardedTaskVectors:
        return ShardedTaskVectors({n: fn(n, t) for n, t in self.tensors.items()}, self.task_names, self.shapes,
                                  self.rank, self.world)

    def padding(self) -> int:
        """Padded (zero) entries per task over this process's slices."""
        return sum(t.shape[1] - max(0, min(t.shape[1], self.shapes[n].numel() - self.rank * t.shape[1]))
                   for n, t in self.tensors.items())

    # -- the collectives of a step ----------------------------------------------------------------
    def local(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This process's slice of a full (unstacked) tensor of ``name``'s shape, flat and padded: a view of it
        where no padding is needed (the base's slices cost no copy)."""
        return local_slice(full.reshape(-1), self.rank, self.world, copy=False)

    def gather(self, name: str, part: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The full tensor ``name`` from every process's slice ``part`` (a collective: every process calls
        it for the same names in the same order). ``out``: a reused flat buffer of world·s entries."""
        if out is None:
            out = part.new_empty(part.numel() * self.world)
        all_gather_flat(out, part.contiguous())
        shape = self.shapes[name]
        return out[: shape.numel()].view(shape)

    def merge(self, coefs: list[torch.Tensor], adds: dict[str, tuple], cache: dict) -> tuple[dict, dict]:
        """(merged slices (adds)_shard + Σ_k c_k τ_k,shard, differentiable in ``coefs``; the full merged tensors
        gathered from every process, detached). ``adds``: name -> the full tensors added (W0 [, offset]);
        ``cache``: per name (their slices, the slice's buffer, the gathered buffer), kept across calls."""
        shards, full = {}, {}
        for c, (n, tau) in zip(coefs, self.tensors.items()):
            if n not in cache:
                parts = tuple(self.local(n, a.detach()) for a in adds[n])
                part = parts[0].new_empty(parts[0].shape, dtype=adds[n][0].dtype)
                cache[n] = (parts, part, part.new_empty(part.numel() * self.world))
            parts, part, whole = cache[n]
            shards[n] = Combine.apply(c, tau, part.device, 0, parts, part.detach(), None)
            full[n] = self.gather(n, shards[n].detach(), whole)
        return shards, full

    @torch.no_grad()
    def merges_to_first(self, coefs: list[list[torch.Tensor]], adds: dict[str, tuple]) -> list[dict[str, torch.Tensor]]:
        """After training (a collective): the merges at each state's coefficients (``coefs``, one list per state)
        gathered to the first process tensor by tensor, each slice of τ released once its merges are gathered —
        training is over. The first process gets them (on CPU, for evaluation and export); the others an empty
        list, having held no whole tensor."""
        kept: list[dict[str, torch.Tensor]] = [{} for _ in coefs]
        for i, n in enumerate(list(self.tensors)):
            parts = tuple(self.local(n, a.detach()) for a in adds[n])
            for merged, c in zip(kept, coefs):
                part = parts[0].new_empty(parts[0].shape, dtype=adds[n][0].dtype)
                Combine.apply(c[i], self.tensors[n], part.device, 0, parts, part, None)  # as ``merge``
                whole = gather_flat_to_first(part)
                if whole is not None:
                    merged[n] = whole[: self.shapes[n].numel()].view(self.shapes[n]).cpu()
            del self.tensors[n]
        return kept if self.rank == 0 else []

    def scatter_grads(self, grads: dict[str, torch.Tensor | None], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each tensor's ∂L/∂W summed over processes, this process's slice of it (fp32). A collective: every
        process scatters every tensor of ``like`` (a missing gradient counts as zeros), in the same order."""
        out = {}
        for n, part in like.items():
            g = grads.get(n)
            size = part.numel()
            flat = torch.zeros(size * self.world, dtype=torch.float32, device=part.device)
            if g is not None:
                if g.is_sparse:
                    g = g.to_dense()
                flat[: g.numel()] = g.reshape(-1)
            out[n] = reduce_scatter_flat(flat, size)
        return out
