"""Model-wide top-k magnitude thresholds, exact, from passes over a stream of stacked task vectors.

TIES and DARE-TIES keep, per task, the ``density`` share of entries largest in magnitude over the whole
model. Sorting or ``kthvalue`` over all of them needs every entry in memory at once; here the k-th largest
|τ| is selected by its float32 bit pattern (for non-negative floats, integer order is value order) in two
passes of bounded memory: a histogram of the high 16 bits finds the bin that holds it, a histogram of
the low 16 bits inside that bin finds it exactly. The value equals ``kthvalue`` over the concatenation
(tests/test_streaming.py), so the in-memory and the streamed merge trim the same entries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ..errors import ConfigError

Stream = Callable[[], Iterable[tuple[str, torch.Tensor]]]  # a fresh pass: (name, stack [K, ...]) per tensor
_HIGH, _LOW = 1 << 15, 1 << 16  # bins of the high bits (sign bit clear) and of the low 16 bits
BLOCK_ENTRIES = 1 << 22  # entries of a stack handled at a time


def _bits(task_row: torch.Tensor) -> torch.Tensor:
    """|τ| of one task's row as int32 bit patterns (monotone in the value)."""
    return task_row.abs().float().flatten().view(torch.int32)


def column_blocks(t: torch.Tensor):
    """Views ``[K, b]`` of a stack ``[K, ...]`` over its entries, a few MiB each: what is entrywise across tasks
    (the top-k histograms, every transform stage) runs block by block, in place, whatever the tensor's size."""
    flat = t.view(t.shape[0], -1)
    step = max(1, BLOCK_ENTRIES // max(1, t.shape[0]))
    for i in range(0, flat.shape[1], step):
        yield flat[:, i:i + step]


def _find(hist: torch.Tensor, rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (bin holding the ``rank``-th smallest entry (1-based), its rank inside that bin)."""
    cum = hist.cumsum(1)
    b = torch.searchsorted(cum, rank.unsqueeze(1)).squeeze(1)
    before = torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0).unsqueeze(1)).squeeze(1), torch.zeros_like(b))
    return b, rank - before


def topk_thresholds(stream: Stream, K: int, density: float, what: str = "ties density") -> torch.Tensor:
    """``[K]``: per task, the |τ| of its ``density``-th largest entry over every tensor of ``stream``."""
    if not 0 < density <= 1:
        raise ConfigError(f"{what} must be in (0, 1], got {density}")
    high = torch.zeros(K, _HIGH, dtype=torch.int64)
    for _, t in stream():
        for block in column_blocks(t):
            for k in range(K):
                high[k] += torch.bincount(_bits(block[k]) >> 16, minlength=_HIGH)
    n = int(high[0].sum())
    n_keep = max(1, int(round(density * n)))
    rank = torch.full((K,), n - n_keep + 1, dtype=torch.int64)  # the n_keep-th largest is this smallest
    high_bin, rank_in_bin = _find(high, rank)
    low = torch.zeros(K, _LOW, dtype=torch.int64)
    for _, t in stream():
        for block in column_blocks(t):
            for k in range(K):
                bits = _bits(block[k])
                low[k] += torch.bincount(bits[(bits >> 16) == high_bin[k]] & 0xFFFF, minlength=_LOW)
    low_bin, _ = _find(low, rank_in_bin)
    return ((high_bin << 16) | low_bin).to(torch.int32).view(torch.float32)
