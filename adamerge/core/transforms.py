"""The data-free task-vector transforms, as one ordered list: DARE, DELLA, Breadcrumbs, TIES, consensus, the per-tensor
merge rules (SCE, Model Stock, WUDI, MagMax: adamerge/core/tensor_rules.py; SLERP, NuSLERP, Multi-SLERP, Karcher:
adamerge/core/spherical.py; Iso-C, Iso-CTS: adamerge/core/isotropic.py), LiNeS.

A method config turns each on with its key (``method.dare``, ``method.ties``, ``method.consensus``,
``method.lines``); they always apply in this order, before any coefficient is learned. A method whose
task vectors must stay as the experts made them (Expert Merging: the experts are its teachers)
refuses the whole list through its config's check.

Each transform is a ``Stage``: model-wide statistics (``fit``: TIES' top-k thresholds and majority sign)
taken over passes of a stream of ``(name, stack)``, then a per-tensor map (``__call__``). The same stages
run on task vectors held in memory (``apply_transforms``) and on tensors streamed one at a time from the
experts' files (``streamed``, adamerge/streaming.py), so both give the same merge bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from . import continual, isotropic, knots, reversible, spherical, task_masks
from . import tensor_rules as rules
from .stage import Stage
from .topk import BLOCK_ENTRIES, Stream, column_blocks, topk_thresholds


class Dare(Stage):
    """Drop each entry with probability ``p`` and rescale survivors by 1/(1−p); one seeded generator runs
    through the tensors in order, restarted for every pass."""

    def __init__(self, p: float, seed: int, rescale: bool = True):
        from ..errors import ConfigError

        if not 0 <= p < 1:
            raise ConfigError(f"dare drop probability must be in [0, 1), got {p}")
        self.p, self.seed, self.rescale = p, int(seed), rescale
        self.begin()

    def begin(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        flat = t.view(-1)
        for i in range(0, flat.numel(), BLOCK_ENTRIES):  # in order, in blocks: the draws of one rand(t.shape)
            block = flat[i:i + BLOCK_ENTRIES]
            block.masked_fill_(torch.rand(block.numel(), generator=self.generator).to(t.device) < self.p, 0)
            if self.rescale:
                block.div_(1 - self.p)
        return t


class Breadcrumbs(Stage):
    """Model Breadcrumbs (Davari & Belilovsky, ECCV 2024): per task and tensor, drop the largest ``gamma`` share of
    |τ| (outliers) and the smallest, keeping the ``density`` share between — mergekit's ``magnitude_outliers``
    (kept: ranks [n_bot, n_bot + ⌊density·n⌋) of |τ| ascending, ⌊gamma·n⌋ dropped at the top)."""

    def __init__(self, density: float, gamma: float):
        self.density, self.gamma = density, gamma

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        flat = t.view(t.shape[0], -1)
        n = flat.shape[1]
        keep, top = int(self.density * n), int(self.gamma * n)
        if keep == 0:
            return t.zero_()
        bottom = max(0, n - keep - top)
        mags = flat.abs().float()
        ranked = mags.sort(dim=1).values  # per tensor, as mergekit sorts it
        lo, hi = ranked[:, bottom:bottom + 1], ranked[:, bottom + keep - 1:bottom + keep]
        del ranked
        flat.masked_fill_((mags < lo) | (mags > hi), 0)
        return t


class TiesTrim(Stage):
    """Keep, per task, the top ``density`` share of entries by magnitude over the whole model (TIES' paper and
    FusionBench), or with ``per_tensor`` the top ``floor(density·n)`` of each tensor (mergekit's ``ties``)."""

    def __init__(self, density: float, what: str = "ties density", per_tensor: bool = False):
        self.density, self.what, self.per_tensor = density, what, per_tensor

    def fit(self, stream: Stream, K: int) -> None:
        if not self.per_tensor:
            self.thresholds = topk_thresholds(stream, K, self.density, self.what)

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if self.per_tensor:  # as mergekit's sparsify(method=magnitude): k = max(1, int(density · n)) per task
            mags = t.abs().float().flatten(1)
            k = max(1, int(self.density * mags.shape[1]))
            self.thresholds = mags.topk(k, dim=1).values[:, -1]
        for block in column_blocks(t):
            block.masked_fill_(~self.mask(block), 0)
        return t

    def mask(self, t: torch.Tensor) -> torch.Tensor:
        """Which entries of ``t`` (all tasks) reach their task's threshold."""
        return t.abs().float() >= self.thresholds.view(-1, *([1] * (t.dim() - 1))).to(t.device)


class TiesElect(Stage):
    """Zero the entries that disagree with the elected sign: the sign of the summed mass per entry, where
    that is zero the majority sign (the sign of the summed entry signs, as in the reference code), or with
    ``per_tensor`` plus (as mergekit's ``sum`` consensus)."""

    def __init__(self, per_tensor: bool = False):
        self.per_tensor, self.majority = per_tensor, 1.0

    def fit(self, stream: Stream, K: int) -> None:
        if self.per_tensor:
            return
        # per tensor, as the reference code sums (one float sum per tensor, added in the tensors' order)
        total = sum(sum(torch.sign(b.float().sum(0)).double().sum() for b in column_blocks(t)).item()
                    for _, t in stream())
        self.majority = 1.0 if total >= 0 else -1.0

    def signs(self, t: torch.Tensor) -> torch.Tensor:
        s = torch.sign(t.float().sum(0))
        return torch.where(s == 0, torch.full_like(s, self.majority), s)

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        for block in column_blocks(t):
            block.masked_fill_(torch.sign(block.float()) != self.signs(block), 0)
        return t


class DisjointMean(Stage):
    """TIES' disjoint mean Σ_k τ̂_k / #agreeing, expressed on the vectors so coefficients still apply."""

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        for block in column_blocks(t):
            block.copy_(block.float() / (block != 0).sum(0).clamp(min=1))
        return t


class Consensus(Stage):
    """Keep entries active in the TALL masks (|τ_t| ≥ λ·|τ_MTL − τ_t|) of at least ``k`` tasks."""

    def __init__(self, k: int, lam: float):
        self.k, self.lam = k, lam

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        for block in column_blocks(t):
            tf = block.float()
            masks = task_masks.tall_masks(tf, self.lam, tf.sum(0, keepdim=True))
            block.masked_fill_((masks.sum(0) < self.k).unsqueeze(0), 0)
        return t


class Lines(Stage):
    """LiNeS on the task vectors (adamerge/core/lines.py): each tensor scaled by its block's λ(l); the depth
    comes from the names of the tensors merged."""

    def __init__(self, value: Any):
        from .lines import lines_config

        self.cfg = lines_config(value)

    def fit(self, stream: Stream, K: int) -> None:
        from .lines import LAYER_PATTERN, lines_scales

        alpha = 1.0 / K if self.cfg["alpha"] == "auto" else float(self.cfg["alpha"])
        names = [n for n, _ in stream()]
        self.scales = lines_scales(names, alpha, float(self.cfg["beta"]), self.cfg.get("pattern", LAYER_PATTERN))

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        for block in column_blocks(t):
            block.copy_(block.float() * self.scales[name])
        return t


def _ties(c: Any) -> list[Stage]:
    per_tensor = getattr(c, "scope", "model") == "tensor"
    return [TiesTrim(c.density, per_tensor=per_tensor), TiesElect(per_tensor),
            *([DisjointMean()] if c.merge == "mean" else [])]


# key of the method config -> its stages, built from that key's config; in the order they apply (the merge rules of
# adamerge/core/tensor_rules.py after the sparsifying transforms, LiNeS' depth scaling last)
TRANSFORMS = {
    "knots": lambda c: [],  # placed around the others by build_stages
    "dare": lambda c: [Dare(c.p, c.seed)],
    "della": lambda c: [rules.Della(c.density, c.epsilon, c.seed, c.rescale)],
    "breadcrumbs": lambda c: [Breadcrumbs(c.density, c.gamma)],
    "ties": _ties,
    "consensus": lambda c: [Consensus(c.k, c.lam)],
    "sce": lambda c: [rules.Sce(c.select_topk, c.mask_deltas)],
    "model_stock": lambda c: [rules.ModelStock(c.filter_wise)],
    "slerp": lambda c: [spherical.Slerp(c.t)],
    "nuslerp": lambda c: [spherical.NuSlerp(c.t, c.flatten, c.row_wise)],
    "multislerp": lambda c: [spherical.MultiSlerp(c.weights)],
    "karcher": lambda c: [spherical.Karcher(c.max_iter, c.tol)],
    "iso": lambda c: [isotropic.IsoC() if c.common_space_fraction is None else isotropic.IsoCts(c.common_space_fraction)],
    "opcm": lambda c: [continual.Opcm(c.alpha, c.shuffle, c.seed, c.continue_from)],
    "wudi": lambda c: [rules.Wudi(c.iterations, c.lr)],
    "magmax": lambda c: [rules.MagMax()],
    "widen": lambda c: [rules.Widen(c.above_average_value_ratio, c.score_calibration_value)],
    "task_masks": lambda c: [task_masks.TaskMasks(c.rule, c.lam)],
    "rmm": lambda c: [reversible.Rmm(c.rank)],
    "lines": lambda c: [Lines(c)] if c not in (None, False) else [],
}


def active_transforms(cfg: Any) -> list[str]:
    """The transform keys a method config turns on, in the order they apply."""
    return [key for key in TRANSFORMS if getattr(cfg, key, None)]


def build_stages(cfg: Any, skip: tuple[str, ...] = (), pool=None) -> list[Stage]:
    """The stages of every transform ``cfg`` turns on, in order (``skip``: keys a method applies elsewhere); ``pool``
    (a ModelPool) is bound to the stages that read it."""
    stages = [s for key in active_transforms(cfg) if key not in skip for s in TRANSFORMS[key](getattr(cfg, key))]
    if getattr(cfg, "knots", None):  # the transforms before LiNeS run on the coordinates of the shared basis
        into = knots.KnotsIn()
        depth = len(stages) - sum(isinstance(s, Lines) for s in stages)
        stages = [into, *stages[:depth], knots.KnotsOut(into), *stages[depth:]]
    for s in stages:
        if s.needs_pool:
            if pool is None:
                raise ValueError(f"{type(s).__name__} reads the pool: build_stages needs pool=")
            s.bind(pool)
    return stages


def streamed(source: Stream, stages: list[Stage]) -> Stream:
    """``source`` with ``stages`` applied to each tensor, as a stream: every pass restarts the stages. ``source``
    gives tensors the stages may change in place (each pass a fresh read, as adamerge/streaming.py's)."""

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for s in stages:
            s.begin()
        for name, t in source():
            for s in stages:
                t = s(name, t)
            yield name, t

    return stream


def fit_stages(source: Stream, stages: list[Stage], K: int) -> None:
    """Fit each stage on the stream of the stages before it (one or more passes over ``source`` each)."""
    for i, s in enumerate(stages):
        s.fit(streamed(source, stages[:i]), K)


def run_stages(tv, stages: list[Stage]):
    """Task vectors held in memory after ``stages`` (on a copy: ``tv`` is left as it is), each stage fitted on
    the result of the ones before."""
    if stages:
        tv = tv.map(lambda n, t: t.clone())
    for s in stages:
        s.fit(tv.items, tv.K)
        s.begin()
        tv = tv.map(s)
    return tv


def apply_transforms(tv, cfg: Any, skip: tuple[str, ...] = (), pool=None):
    """``tv`` (TaskVectors) after every transform ``cfg`` turns on, in order (``skip``: keys applied elsewhere;
    ``pool``: for the stages that read it)."""
    return run_stages(tv, build_stages(cfg, skip, pool))
