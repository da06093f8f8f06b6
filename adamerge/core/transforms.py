"""The data-free task-vector transforms, as one ordered list: DARE, TIES, consensus, LiNeS.

A method config turns each on with its key (``method.dare``, ``method.ties``, ``method.consensus``,
``method.lines``); they always apply in this order, before any coefficient is learned. A method whose
task vectors must stay as the experts made them (Expert Merging: the experts are its teachers)
refuses the whole list through its config's check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .lines import lines_task_vectors
from .task_vectors import TaskVectors


def _ties(tv: TaskVectors, cfg: Any) -> TaskVectors:
    tv = tv.ties_trim(cfg.density).ties_elect()
    if cfg.merge == "mean":
        # disjoint mean = Σ_k τ̂_k / #agreeing, expressed on the vectors so coefficients still apply
        counts = {n: (v != 0).sum(0).clamp(min=1) for n, v in tv.items()}
        tv = tv.map(lambda n, v: (v.float() / counts[n]).to(v.dtype))
    return tv


# key of the method config -> transform(task vectors, that key's config); in the order they apply
TRANSFORMS: dict[str, Callable[[TaskVectors, Any], TaskVectors]] = {
    "dare": lambda tv, c: tv.dare(p=c.p, seed=c.seed),
    "ties": _ties,
    "consensus": lambda tv, c: tv.consensus(k=c.k, lam=c.lam),
    "lines": lambda tv, c: lines_task_vectors(tv, c),
}


def active_transforms(cfg: Any) -> list[str]:
    """The transform keys a method config turns on, in the order they apply."""
    return [key for key in TRANSFORMS if getattr(cfg, key, None)]


def apply_transforms(tv: TaskVectors, cfg: Any, skip: tuple[str, ...] = ()) -> TaskVectors:
    """``tv`` after every transform ``cfg`` turns on, in order (``skip``: keys a method applies elsewhere)."""
    for key in active_transforms(cfg):
        if key not in skip:
            tv = TRANSFORMS[key](tv, getattr(cfg, key))
    return tv
