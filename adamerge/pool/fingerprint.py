"""What a checkpoint was made from: the pool's fingerprint, checked when a run resumes.

Every tensor of the base and of every expert's files (a LoRA expert: its A/B factors and scaling) by
name, shape, dtype, a strided sample and an exact checksum; the task order and each task's heads (shapes,
and values: a head built rather than read from a file, e.g. CLIP's zero-shot head from its templates,
is in no expert's digest).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import torch

from .expert_files import LORA_SCALING_KEYS


def pool_fingerprint(pool) -> dict:
    """The fingerprint of a ``ModelPool`` (one read of each tensor; ``ModelPool.fingerprint`` caches it)."""
    experts = {}
    for task in pool.task_names:
        e = pool.experts[task]
        names = sorted(e.source.keys())
        lora = {k: e.lora.get(k) for k in LORA_SCALING_KEYS} if e.is_lora else None
        experts[task] = digest(((n, e.source.get(n)) for n in names), json.dumps(lora, sort_keys=True))
    return {
        "base": digest((n, pool.base_tensor(n)) for n in pool.shared_names()),
        "tasks": pool.task_names, "experts": experts,
        "heads": {t: {n: list(v.shape) for n, v in pool.head(t).items()} for t in pool.task_names},
        "head_values": {t: digest(sorted(pool.head(t).items())) for t in pool.task_names},
        "n_shared": len(pool.shared_names()),
    }


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def digest(tensors: Iterator[tuple[str, torch.Tensor]], extra: str = "") -> str:
    """sha256 of each tensor's name, shape, dtype, a strided sample and the sum of its bit patterns.

    The sum is over the raw bits as integers: it sees a change to any single element, costs one pass,
    and (unlike a floating-point sum, whose order follows the thread count) is exact, so the same
    files give the same fingerprint on any machine.
    """
    h = hashlib.sha256(extra.encode())
    for n, t in tensors:
        flat = t.detach().contiguous().flatten()
        h.update(f"{n}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(flat[:: max(1, flat.numel() // 64)].float().numpy().tobytes())
        h.update(str(int(flat.view(_INT_OF_SIZE[flat.element_size()]).sum(dtype=torch.int64))).encode())
    return h.hexdigest()[:16]
