"""MAP's pieces (Li et al., "MAP: Low-compute Model Merging with Amortized Pareto Fronts via Quadratic
Approximation", ICLR 2025; the authors' luli-git/MAP): the sampled task-wise coefficient vectors, a quadratic surrogate
of each task's metric, the Pareto front of the surrogates, the point a preference picks, and the front's plot.
adamerge/methods/map.py measures the metrics and runs them.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch


def map_samples(K: int, total: int, generator: torch.Generator) -> torch.Tensor:
    """``total`` coefficient vectors [total, K] as the authors' ``generate_combined_points`` (plain mode): the K
    one-hot vectors, then points of a uniform grid on [0, 1]^K (⌈(n / 0.5)^(1/K)⌉ values per axis) that are not
    one-hot, do not sum to one and are not isotropic, n of them drawn at random."""
    n = total - K
    if n <= 0:
        raise ValueError(f"MAP needs more than K = {K} samples, got {total}")
    size = max(2, math.ceil((n / 0.5) ** (1 / K)))
    grid = torch.tensor(list(itertools.product(range(size), repeat=K)), dtype=torch.float64) / (size - 1)
    onehot = ((grid == 1).sum(1) == 1) & ((grid == 0).sum(1) == K - 1)
    keep = ~onehot & (grid.sum(1) != 1) & ~(grid == grid[:, :1]).all(1)
    grid = grid[keep]
    if len(grid) > n:
        grid = grid[torch.randperm(len(grid), generator=generator)[:n]]
    return torch.cat([torch.eye(K, dtype=torch.float64), grid])


def quadratic_features(c: torch.Tensor) -> torch.Tensor:
    """[n, K] -> [n, (K+1)(K+2)/2]: c_i², c_i c_j (i < j), c_i, 1, in the authors' order."""
    K = c.shape[1]
    pairs = [c[:, i] * c[:, j] for i in range(K) for j in range(i + 1, K)]
    return torch.cat([c.square(), torch.stack(pairs, 1) if pairs else c[:, :0], c, torch.ones_like(c[:, :1])], 1)


class Surrogate:
    """M̃(c) = sigmoid(quadratic(c)) of one task's metric in [0, 1], fitted by least squares on the measured points
    (the authors' ``curve_fit``): started from the linear least squares on the metric's logit, refined by L-BFGS."""

    def __init__(self, c: torch.Tensor, y: torch.Tensor):
        x, y = quadratic_features(c.double()), y.double()
        logit = torch.logit(y.clamp(1e-3, 1 - 1e-3))
        start = torch.linalg.lstsq(x, logit.unsqueeze(1), driver="gelsd").solution.squeeze(1)
        self.params = start.clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([self.params], max_iter=200, line_search_fn="strong_wolfe")

        def loss() -> torch.Tensor:
            optimizer.zero_grad()
            value = (torch.sigmoid(x @ self.params) - y).square().mean()
            value.backward()
            return value

        optimizer.step(loss)
        with torch.no_grad():
            error = {name: float((torch.sigmoid(x @ p) - y).square().mean()) for name, p in
                     (("fitted", self.params), ("start", start))}
        # L-BFGS diverged or did not improve on its start: keep the start
        self.params = self.params.detach() if error["fitted"] <= error["start"] else start

    def __call__(self, c: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(quadratic_features(c.double()) @ self.params)


def r_squared(measured: torch.Tensor, predicted: torch.Tensor) -> float:
    """1 − SS_res / SS_tot (of points the surrogate was not fitted on)."""
    total = (measured - measured.mean()).square().sum()
    return float(1 - (measured - predicted).square().sum() / total) if total > 0 else float("nan")


def non_dominated(points: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Mask of the rows of ``points`` [n, K] (higher is better) that no other row dominates."""
    keep = torch.ones(len(points), dtype=torch.bool)
    for start in range(0, len(points), chunk):
        block = points[start:start + chunk].unsqueeze(1)  # [b, 1, K] against every [1, n, K]
        dominated = ((points.unsqueeze(0) >= block).all(-1) & (points.unsqueeze(0) > block).any(-1)).any(1)
        keep[start:start + chunk] = ~dominated
    return keep


def surrogate_front(surrogates: list[Surrogate], bounds: tuple[float, float], candidates: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-dominated points among ``candidates`` uniform coefficient vectors in ``bounds`` (a dense sweep of
    the surrogates, where the authors run NSGA-III): (coefficients [m, K], predicted metrics [m, K])."""
    K = len(surrogates)
    lo, hi = bounds
    c = lo + (hi - lo) * torch.rand(candidates, K, generator=generator, dtype=torch.float64)
    predicted = torch.stack([s(c) for s in surrogates], 1)
    keep = non_dominated(predicted)
    return c[keep], predicted[keep]


def choose(predicted: torch.Tensor, preference: torch.Tensor) -> int:
    """The front point a preference picks: argmax ⟨w / ‖w‖, predicted metrics⟩ (the authors' ``get_scaling_from_pf``)."""
    return int((predicted.double() @ (preference.double() / preference.double().norm())).argmax())


def pair_grid(path: Path, tasks: list[str], draw, scale: float = 1.0) -> None:
    """One panel per pair of tasks (i on x, j on y), each drawn by ``draw(ax, i, j)``; the first panel's legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(itertools.combinations(range(len(tasks)), 2))
    cols = min(4, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols * scale, 3.4 * rows * scale), squeeze=False)
    for ax, (i, j) in zip(axes.flat, pairs):
        draw(ax, i, j)
        ax.set_xlabel(tasks[i])
        ax.set_ylabel(tasks[j])
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_front(path: Path, tasks: list[str], front: torch.Tensor, samples: torch.Tensor, chosen: torch.Tensor,
               measured_chosen: torch.Tensor | None) -> None:
    """Every pair of tasks' trade-off: the surrogates' front, the measured samples and the chosen point."""

    def draw(ax, i: int, j: int) -> None:
        ax.scatter(samples[:, i], samples[:, j], s=10, c="0.6", label="measured samples")
        ax.scatter(front[:, i], front[:, j], s=6, c="tab:blue", alpha=0.5, label="surrogate front")
        ax.scatter([chosen[i]], [chosen[j]], s=60, marker="*", c="tab:red", label="chosen (predicted)")
        if measured_chosen is not None:
            ax.scatter([measured_chosen[i]], [measured_chosen[j]], s=40, marker="x", c="k", label="chosen (measured)")

    pair_grid(path, tasks, draw)
