"""LiNeS layer scaling of a merge's task vectors or merged update (a data-free transform).

LiNeS ("Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging", ICLR 2025):
the merged update of layer l (0-based block index from the tensor name, L blocks) is scaled by

    λ(l) = α + β · l / (L − 1),

so shallow layers stay near the pretrained weights; tensors outside numbered blocks (embeddings,
final norms, pooler) get α, as in the authors' code. In multi-task merging LiNeS *replaces* the
merge's global scale; the authors set α = ‖Σ_k τ_k‖ / (K·‖τ_MTL‖) (``alpha: auto``: shallow layers
move as far as the average of the task vectors) and tune β ∈ [0, 1] on validation data.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..errors import ConfigError
from .task_vectors import TaskVectors

LAYER_PATTERN = r"(?:^|\.)(\d+)\."  # first numbered module in a name: encoder.layer.3., model.layers.3.
LINES_DEFAULTS = {"alpha": "auto", "beta": 0.5}  # β: middle of the paper's tuning grid [0, 1]


def layer_index(name: str, pattern: str = LAYER_PATTERN) -> int | None:
    """Block index of a tensor name (``bert.encoder.layer.3.output.dense.weight`` -> 3), or None."""
    m = re.search(pattern, name)
    return int(m.group(1)) if m else None


def lines_config(value: Any) -> dict | None:
    """``method.lines``: null/false (off), true (defaults) or ``{alpha, beta, pattern}``."""
    if value is None or value is False:
        return None
    if value is True:
        return dict(LINES_DEFAULTS)
    if not isinstance(value, dict):
        raise ConfigError(f"method.lines must be true/false or {{alpha, beta}}, got {value!r}")
    unknown = sorted(set(value) - {"alpha", "beta", "pattern"})
    if unknown:
        raise ConfigError(f"method.lines: unknown key(s) {unknown}; expected alpha, beta, pattern")
    cfg = {**LINES_DEFAULTS, **value}
    if cfg["alpha"] != "auto" and not isinstance(cfg["alpha"], (int, float)):
        raise ConfigError(f"method.lines.alpha must be a number or 'auto', got {cfg['alpha']!r}")
    if isinstance(cfg["beta"], bool) or not isinstance(cfg["beta"], (int, float)):
        raise ConfigError(f"method.lines.beta must be a number, got {cfg['beta']!r}")
    return cfg


def lines_scales(names: list[str], alpha: float, beta: float, pattern: str = LAYER_PATTERN) -> dict[str, float]:
    """λ per tensor: α + β·l/(L−1) for block l of L (L = deepest index + 1); α outside blocks."""
    idx = {n: layer_index(n, pattern) for n in names}
    found = [i for i in idx.values() if i is not None]
    depth = max(found) + 1 if found else 1
    return {n: alpha if i is None or depth == 1 else alpha + beta * i / (depth - 1) for n, i in idx.items()}


def auto_alpha(tv: TaskVectors, direction: dict[str, torch.Tensor]) -> float:
    """The authors' α for multi-task merging: ‖Σ_k τ_k‖ / (K·‖D‖) over all merged tensors."""
    sum_sq = sum(float(t.float().sum(0).pow(2).sum()) for _, t in tv.items())
    d_sq = sum(float(d.float().pow(2).sum()) for d in direction.values())
    return (sum_sq ** 0.5) / (tv.K * max(d_sq ** 0.5, 1e-12))


def apply_lines(direction: dict[str, torch.Tensor], tv: TaskVectors, cfg: dict) -> dict[str, torch.Tensor]:
    """LiNeS on an unscaled merged update D (in place of the merge's global scale)."""
    alpha = auto_alpha(tv, direction) if cfg["alpha"] == "auto" else float(cfg["alpha"])
    scales = lines_scales(list(direction), alpha, float(cfg["beta"]), cfg.get("pattern", LAYER_PATTERN))
    return {n: d * scales[n] for n, d in direction.items()}
