"""Parametrizations of the merge: what ``MergedModel`` multiplies the task vectors by.

``Coefficients.forward()`` returns one tensor per merged tensor: shape ``[K]`` (one coefficient per
task) or ``[K, m]`` (m contiguous chunks of the flattened tensor, each with its own coefficient).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError

GRANULARITIES = ("task", "layer", "chunk")


def chunk_layout(numel: int, m: int) -> tuple[int, int]:
    """(chunk size, number of chunks) when a tensor of ``numel`` entries is cut into ≤ m pieces."""
    m = max(1, min(int(m), numel))
    size = math.ceil(numel / m)
    return size, math.ceil(numel / size)


class Coefficients(nn.Module):
    """Task-wise ``[K]``, layer-wise ``[L, K]`` or chunk-wise ``[K, Σm]`` trainable coefficients.

    ``transform``: ``clamp`` (raw values, optionally clamped to ``[lo, hi]`` in every forward, as in
    AdaMerging) or ``sigmoid`` (raw values are logits; init is given in value space).
    """

    def __init__(
        self,
        num_tasks: int,
        num_tensors: int,
        granularity: str = "layer",
        init: float | list[float] = 0.3,
        clamp: tuple[float, float] | None = None,
        transform: str = "clamp",
        chunks: list[int] | None = None,
        tensor_numels: list[int] | None = None,
    ):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ConfigError(f"coefficients.granularity must be one of {GRANULARITIES}, got '{granularity}'")
        if transform not in ("clamp", "sigmoid"):
            raise ConfigError(f"coefficients.transform must be 'clamp' or 'sigmoid', got '{transform}'")
        if clamp is not None:
            lo, hi = float(clamp[0]), float(clamp[1])
            if not lo < hi:
                raise ConfigError(f"coefficients.clamp bounds reversed or empty: [{lo}, {hi}]")
            clamp = (lo, hi)
        self.K, self.L = num_tasks, num_tensors
        self.granularity, self.clamp, self.transform = granularity, clamp, transform
        init_t = torch.as_tensor(init, dtype=torch.float32).expand(num_tasks).clone()
        if transform == "sigmoid":
            if not ((init_t > 0) & (init_t < 1)).all():
                raise ConfigError(f"sigmoid coefficients need init in (0, 1), got {init}")
            init_t = torch.logit(init_t)
        self.chunk_sizes: list[int] = []
        self.chunk_counts: list[int] = []
        if granularity == "task":
            raw = init_t.clone()
        elif granularity == "layer":
            raw = init_t.unsqueeze(0).repeat(num_tensors, 1)
        else:
            if chunks is None or tensor_numels is None or len(chunks) != num_tensors:
                raise ValueError("chunk-wise coefficients need one chunk count and numel per merged tensor")
            for numel, m in zip(tensor_numels, chunks):
                size, count = chunk_layout(numel, m)
                self.chunk_sizes.append(size)
                self.chunk_counts.append(count)
            raw = init_t.unsqueeze(1).repeat(1, sum(self.chunk_counts))
        self.raw = nn.Parameter(raw)

    def values(self) -> torch.Tensor:
        """The raw parameter after the transform (clamp/sigmoid)."""
        if self.transform == "sigmoid":
            return torch.sigmoid(self.raw)
        if self.clamp is not None:
            return self.raw.clamp(*self.clamp)
        return self.raw

    def forward(self) -> list[torch.Tensor]:
        v = self.values()
        if self.granularity == "task":
            return [v] * self.L
        if self.granularity == "layer":
            return list(v.unbind(0))
        return list(torch.split(v, self.chunk_counts, dim=1))

    @torch.no_grad()
    def table(self) -> torch.Tensor:
        """``[L, K]`` summary for reports and heatmaps (chunk-wise: mean over a tensor's chunks)."""
        return torch.stack([c if c.dim() == 1 else c.mean(1) for c in self.forward()]).float().cpu()
