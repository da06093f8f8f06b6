"""Frank-Wolfe's iterate θ_t, its vertices, and the weight of each checkpoint in it (FW-Merging's state).

θ_t is held as its delta from the base, the single task-vector row (coefficient 1) of a MergedModel,
so evaluation and export see θ_t unchanged. Candidates are read from disk one tensor at a time when
scored and when stepped to: memory is constant in their number. Per tensor, ``weights`` ``[L, 1+N]``
tracks the weight of [pretrained, candidate 1..N] in θ_t — what ``coefficients.json`` reports.
The method (adamerge/methods/frank_wolfe.py) owns the objective and the loop.
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from ..core.coefficients import Coefficients
from ..core.merged_model import MergedModel
from ..core.task_vectors import TaskVectors
from ..core.transforms import TiesElect, TiesTrim, run_stages
from ..pool.candidates import CandidatePool
from ..pool.model_pool import ModelPool

Grads = dict[str, torch.Tensor]


def lmo(scores: torch.Tensor, granularity: str, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Vertex index per tensor ``[L]`` minimizing the linear term; ``scores[i, l] = ⟨∇_l ℓ, v_{i,l} − θ_l⟩``.

    task: one vertex for every tensor (smallest sum over tensors); layer: the smallest per tensor.
    ``exclude`` ``[V, L]`` marks (vertex, tensor) pairs that may not be chosen.
    """
    s = scores if exclude is None else scores.masked_fill(exclude, math.inf)
    if granularity == "task":
        return s.sum(1).argmin().expand(s.shape[1]).clone()
    return s.argmin(0)


class FrankWolfeState:
    """θ_t over the merged tensors ``names``; vertices are the candidates, plus θ_0 ("initial") if asked."""

    def __init__(self, pool: ModelPool, candidates: CandidatePool, names: list[str], start: str,
                 start_scale: float, initial_vertex: bool, tv_device: str | None = None):
        self.pool, self.candidates, self.names = pool, candidates, names
        N, L = len(candidates), len(names)
        self.weights = torch.zeros(L, 1 + N, dtype=torch.float64)
        if start == "task_arithmetic":
            delta0 = self._task_arithmetic(start_scale)
            self.weights[:, 0], self.weights[:, 1:] = 1 - start_scale * N, start_scale
        else:
            delta0 = {n: torch.zeros_like(pool.base_tensor(n), dtype=torch.float32) for n in names}
            self.weights[:, 0] = 1
        # the authors' code adds θ_0 to the vertex set ("initial"): one more model in memory, whatever N
        self.vertex_names = list(candidates.names)
        self.initial: Grads | None = None
        if initial_vertex:
            self.initial = {n: d.clone() for n, d in delta0.items()}
            self.initial_weights = self.weights.clone()
            self.vertex_names.append("initial")
        coefs = Coefficients(1, L, granularity="task", init=1.0).requires_grad_(False)
        theta = TaskVectors({n: d.unsqueeze(0) for n, d in delta0.items()}, ["frank_wolfe"])
        self.merged = MergedModel(pool.base_model, theta, coefs, {t: pool.head(t) for t in pool.task_names},
                                  tv_device=tv_device)

    # -- θ_t and the vertices ---------------------------------------------------------------------
    def delta(self, name: str) -> torch.Tensor:
        """θ_t − θ_pretrained for one merged tensor (a view: updated in place)."""
        return self.merged.task_vectors[name][0]

    def theta(self, name: str) -> torch.Tensor:
        d = self.delta(name)
        return self.pool.base_tensor(name).to(d.device, torch.float32) + d.float()

    def vertex_tensor(self, i: int, name: str) -> torch.Tensor:
        """Vertex ``i``'s value of one tensor: a candidate read from disk now, or θ_0 ("initial")."""
        base = self.pool.base_tensor(name)
        if i < len(self.candidates):
            return self.candidates.tensor(i, name)
        return base.float() + self.initial[name].to(base.device)

    def vertex_weights(self, i: int, li: int) -> torch.Tensor:
        """Weight of each checkpoint in vertex ``i`` at tensor ``li``."""
        if i < len(self.candidates):
            w = torch.zeros(self.weights.shape[1], dtype=torch.float64)
            w[i + 1] = 1
            return w
        return self.initial_weights[li]

    def counts(self, sel: torch.Tensor) -> dict[str, int]:
        """How many tensors chose each vertex, most chosen first."""
        return {self.vertex_names[i]: c for i, c in Counter(sel.tolist()).most_common()}

    @torch.no_grad()
    def _task_arithmetic(self, scale: float) -> Grads:
        """scale · Σ_i (θ_i − θ_pretrained), streamed: one tensor of one candidate in memory at a time."""
        out = {}
        for n in self.names:
            base = self.pool.base_tensor(n).float()
            acc = torch.zeros_like(base)
            for i in range(len(self.candidates)):
                acc += self.candidates.tensor(i, n).float() - base
            out[n] = acc.mul_(scale)
        return out

    def fp32(self):
        """Scores and θ updates stay in float32 under bf16/fp16 autocast (they accumulate over iterations)."""
        return torch.autocast(self.delta(self.names[0]).device.type, enabled=False)

    # -- Frank-Wolfe ------------------------------------------------------------------------------
    @torch.no_grad()
    def linear_terms(self, grads: list[Grads]) -> torch.Tensor:
        """``[G, V, L]``: ⟨g_n, v_{i,n} − θ_{t,n}⟩ per gradient, vertex and tensor — each vertex read one tensor at a time."""
        with self.fp32():
            per_tensor = []
            for n in self.names:
                th = self.theta(n).flatten()
                gs = torch.stack([g[n].flatten().to(th.device, torch.float32) for g in grads])
                per_tensor.append(torch.stack([gs @ (self.vertex_tensor(i, n).to(th.device, torch.float32).flatten()
                                                     - th) for i in range(len(self.vertex_names))], 1))
            return torch.stack(per_tensor, -1).double().cpu()

    @torch.no_grad()
    def hard_step(self, sel: torch.Tensor, move: torch.Tensor, step: float, merge_fn: str,
                  ties_density: float) -> None:
        """θ ← θ + step·MergeFn(s − θ), streamed per tensor (TIES needs the whole step: one model)."""
        steps = {}
        with self.fp32():
            for li, n in enumerate(self.names):
                d = self.delta(n)
                if not move[li]:
                    steps[n] = torch.zeros_like(d)
                    continue
                towards = self.vertex_tensor(int(sel[li]), n).to(d.device, torch.float32) - self.theta(n)
                if merge_fn == "task_arithmetic":
                    d.add_(towards.to(d.dtype), alpha=step)
                else:
                    steps[n] = towards
                self.weights[li] = (1 - step) * self.weights[li] + step * self.vertex_weights(int(sel[li]), li)
            if merge_fn == "ties" and move.any():
                # TIES of one vector: keep its top-density entries by magnitude (sign election is trivial)
                trimmed = run_stages(TaskVectors({n: s.unsqueeze(0) for n, s in steps.items()}, ["step"]),
                                     [TiesTrim(ties_density), TiesElect()])
                for n in self.names:
                    self.delta(n).add_(trimmed[n][0], alpha=step)

    def vertex_rows(self, sels: list[torch.Tensor]) -> TaskVectors:
        """Rows [θ_t − θ_0, s_1 − θ_t, ..., s_m − θ_t]: the soft step's task vectors over base θ_0."""
        dev = self.delta(self.names[0]).device
        with torch.no_grad():
            rows = {}
            for li, n in enumerate(self.names):
                th = self.theta(n)
                rows[n] = torch.stack([self.delta(n).float()] + [
                    self.vertex_tensor(int(s[li]), n).to(dev, torch.float32) - th for s in sels])
        return TaskVectors(rows, ["theta_t"] + [f"vertex{j}" for j in range(len(sels))])

    @torch.no_grad()
    def soft_step_to(self, new_deltas: Grads, table: torch.Tensor, sels: list[torch.Tensor]) -> None:
        """θ_{t+1} from the soft step's merge (``table`` ``[L, 1+m]``: its coefficients over ``vertex_rows``)."""
        with self.fp32():
            for li, n in enumerate(self.names):
                self.delta(n).copy_(new_deltas[n])
                c = table[li, 1:]
                self.weights[li] = (1 - c.sum()) * self.weights[li] + sum(
                    c[j] * self.vertex_weights(int(s[li]), li) for j, s in enumerate(sels))

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"theta_delta": {n: self.delta(n).detach().cpu().clone() for n in self.names},
                "weights": self.weights.clone()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for n in self.names:
            self.delta(n).copy_(state["theta_delta"][n])
        self.weights = state["weights"].clone()
