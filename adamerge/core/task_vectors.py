"""TaskVectors: per-tensor stacked deltas ``[K, *shape]``, and ``read_stack``, which reads one tensor's stack.

The data-free transforms on them (DARE, TIES, consensus, LiNeS) are stages in adamerge/core/transforms.py,
shared with the streamed merge (adamerge/streaming.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch

from ..errors import ConfigError
from ..pool.model_pool import ModelPool, PoolError
from .lora_factors import LoraFactors

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"task_vectors.dtype: unknown dtype '{dtype}'; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def select_names(names: Iterable[str], include: list[str] | None, exclude: list[str] | None) -> list[str]:
    """Names matching any ``include`` regex (all when empty) and no ``exclude`` regex."""
    out = []
    for n in names:
        if include and not any(re.search(p, n) for p in include):
            continue
        if exclude and any(re.search(p, n) for p in exclude):
            continue
        out.append(n)
    return out


class StackedTensors:
    """What ``MergedModel`` reads of task vectors: named stacks ``[K, ...]`` (``tensors``) over ``task_names``.
    ``TaskVectors`` holds whole stacks; ``ShardedTaskVectors`` (adamerge/core/sharded.py) one slice of each."""

    tensors: dict[str, torch.Tensor]
    task_names: list[str]
    factors = None  # LoRA factors (TaskVectors only)

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    @property
    def K(self) -> int:
        return len(self.task_names)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __len__(self) -> int:
        return len(self.names)

    def items(self):
        return self.tensors.items()

    def nbytes(self) -> int:
        """Bytes of the stacks held here."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def read_stack(pool: ModelPool, name: str, dtype: torch.dtype, keep_unchanged: bool = False,
               part: Callable[[torch.Tensor], torch.Tensor] | None = None,
               alloc: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None) -> torch.Tensor | None:
    """``[K, *shape]``: every expert's τ of tensor ``name`` (``part``: the part of each τ to keep, e.g. one
    process's flat slice), or None when no expert changes it (unless ``keep_unchanged``).

    Filled row by row in the storage dtype: no fp32 stack beside it. The stack is allocated at the first
    expert that changes the tensor (earlier rows are zero): a tensor no expert changes (e.g. outside every
    LoRA target) never costs K copies, even for a moment — it is left out, which also spares its gradient
    (the embedding's is the largest) in every training step. ``alloc(shape, dtype)`` gives the stack's memory
    (a streamed merge reuses two buffers)."""
    stacked = None
    for k, t in enumerate(pool.task_names):
        if stacked is not None and part is None:  # the rows after the first: subtracted in place
            pool.task_vector(t, name, out=stacked[k])
            continue
        tau = pool.task_vector(t, name)
        if stacked is None and not (keep_unchanged or tau.any()):
            continue
        kept = part(tau) if part is not None else tau
        if stacked is None:
            shape = (len(pool.task_names), *kept.shape)
            stacked = alloc(shape, dtype) if alloc is not None else torch.empty(shape, dtype=dtype)
            stacked[:k].zero_()  # the experts before this one leave the tensor unchanged
        stacked[k].copy_(kept)
    return stacked


def check_something_to_merge(found: bool) -> None:
    """One refusal for a selection in which no expert changes anything (dense, factorized or sharded)."""
    if not found:
        raise PoolError("no expert differs from the base in any selected tensor: nothing to merge")


class TaskVectors(StackedTensors):
    """Ordered mapping ``name -> Tensor[K, *shape]`` plus the task order.

    Placement (device, dtype) is a setting: the tensors may stay on CPU while the model runs
    elsewhere; ``MergedModel`` moves them one tensor at a time.

    ``factors`` (``task_vectors.lora: factorized``): LoRA experts' weights kept as their factors
    (adamerge/core/lora_factors.py), not in ``tensors``; ``names`` lists both kinds in the pool's order.
    The transforms below read τ's entries: they apply to dense task vectors only.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], task_names: list[str],
                 factors: LoraFactors | None = None, names: list[str] | None = None):
        if not tensors and not factors:
            raise PoolError("no tensors selected for merging (check task_vectors.include/exclude)")
        self.tensors = dict(tensors)
        self.task_names = list(task_names)
        self.factors = factors
        self._names = list(names) if names is not None else [*self.tensors, *(factors.names if factors else [])]
        for n, t in self.tensors.items():
            if t.shape[0] != len(self.task_names):
                raise ValueError(f"task vector '{n}' has {t.shape[0]} rows for {len(self.task_names)} tasks")

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_pool(
        cls,
        pool: ModelPool,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device = "cpu",
        pin_memory: bool = False,
        keep_unchanged: bool = False,
        factorize: bool = False,
    ) -> TaskVectors:
        """Read each expert lazily, one tensor at a time, into stacked deltas.

        Tensors that no expert changes are left out (they stay at the base value) unless
        ``keep_unchanged``. ``factorize``: LoRA-adapted Linear weights are kept as their factors.
        """
        if device == "disk":  # only MergeAlgorithm.build_task_vectors maps task vectors from disk
            raise ConfigError("task_vectors.device=disk: this method reads its task vectors itself; use "
                              "task_vectors.device=cpu")
        dt = resolve_dtype(dtype)
        names = select_names(pool.shared_names(), include, exclude)
        factors = LoraFactors.from_pool(pool, names, dt, keep_unchanged) if factorize else None
        if factors is not None and device is not None:
            factors = factors.map(lambda t: t.to(device))
        tensors = {}
        for n in names:
            if factors is not None and n in factors:
                continue
            stacked = read_stack(pool, n, dt, keep_unchanged)
            if stacked is None:
                continue
            if pin_memory and torch.cuda.is_available():
                stacked = stacked.pin_memory()
            tensors[n] = stacked.to(device)
        if names:
            check_something_to_merge(bool(tensors or factors))
        order = [n for n in names if n in tensors or (factors is not None and n in factors)]
        return cls(tensors, pool.task_names, factors, order)

    # -- mapping helpers --------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Every merged tensor: dense and factorized."""
        return list(self._names)

    def map(self, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> TaskVectors:
        """``fn`` on each dense tensor; the factors are kept as they are."""
        return TaskVectors({n: fn(n, t) for n, t in self.tensors.items()}, self.task_names, self.factors, self._names)

    def to(self, device=None, dtype=None) -> TaskVectors:
        out = self.map(lambda n, t: t.to(device=device, dtype=dtype))
        if self.factors is not None:
            # the factors A, B take the dtype; the experts' indices and scalings keep theirs
            out.factors = self.factors.map(lambda t: t.to(device=device, dtype=dtype if t.dim() == 2 else None))
        return out

    def nbytes(self) -> int:
        """Bytes held: the dense stacks and the factors."""
        return super().nbytes() + (self.factors.nbytes() if self.factors is not None else 0)
