"""Fisher merging ("Merging Models with Fisher-Weighted Averaging", Matena & Raffel, NeurIPS 2022).

θ* = Σ_i c_i (F_i + ε) θ_i / Σ_i c_i (F_i + ε) per entry, with F_i the diagonal Fisher of expert i
on its own calibration texts: the mean over examples of the squared gradient of log p(ŷ | x), ŷ
sampled from the expert's own predictive distribution (one draw per example, seeded by the seed and
the example's index; for causal
LMs one token per non-padding position). ε (``floor``) keeps entries no example touches at the
plain average. ``normalize`` (FusionBench / MergeLM default) sets c_i = 1/‖F_i‖ so experts with
larger gradients do not dominate; otherwise c_i = 1. Only the merged backbone tensors get a
Fisher — heads stay per task. Expressed on task vectors, θ* − θ0 = Σ c_i (F_i+ε) τ_i / Σ c_i (F_i+ε).

Per-example gradients: one example at a time (a squared mini-batch gradient is not the diagonal
Fisher). Memory: one expert copy, its Fisher and two running sums — never K Fishers at once.
Under DDP each process takes its slice of the examples and the Fisher sums are all-reduced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.task_vectors import TaskVectors
from ..run.distributed import all_reduce_sum, dist_rank_world
from .closed_form import StatisticsConfig, StatisticsMerge
from .method_config import check_range
from .registry import register


def inverse_norm(tensors: dict[str, torch.Tensor], floor: float) -> float:
    """1 / (‖tensors‖ + floor), the norm over every tensor together: one expert's normalization."""
    return 1.0 / (sum(float(f.double().pow(2).sum()) for f in tensors.values()) ** 0.5 + floor)


def fisher_combine_step(num: dict, den: dict, fisher: dict[str, torch.Tensor], tau: dict[str, torch.Tensor],
                        floor: float, normalize: bool) -> None:
    """Add expert i's weighted Fisher terms to the running numerator/denominator (in place)."""
    c = inverse_norm(fisher, floor) if normalize else 1.0
    for n, f in fisher.items():
        w = c * (f + floor)
        num[n] = num[n] + w * tau[n] if n in num else w * tau[n]
        den[n] = den[n] + w if n in den else w


@dataclass
class FisherConfig(StatisticsConfig):
    normalize: bool = True        # divide each expert's Fisher by its norm before combining
    floor: float = 1e-6           # added to every Fisher entry (no division by zero)
    seed: int = 0                 # label sampling from each expert's own prediction

    def check(self, prefix: str) -> None:
        super().check(prefix)
        check_range(self.floor, f"{prefix}.floor", 0, strict_lo=True)


@register
class FisherMerging(StatisticsMerge):
    """Diagonal-Fisher weighted average of the experts (backbone only)."""

    name = "fisher_merging"
    Config = FisherConfig

    def merge_direction(self, tv: TaskVectors) -> dict[str, torch.Tensor]:
        m = self.cfg
        floor, normalize = m.floor, m.normalize
        num: dict[str, torch.Tensor] = {}
        den: dict[str, torch.Tensor] = {}
        for k, task in enumerate(tv.task_names):
            fisher = self.fisher(task, k, seed=m.seed + k)
            fisher_combine_step(num, den, fisher, {n: t[k].float() for n, t in tv.items()}, floor, normalize)
            del fisher
        return {n: num[n] / den[n] for n in tv.names}

    def fisher(self, task: str, k: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Diagonal Fisher of expert ``task`` (task vector ``k``) on its calibration examples, per merged tensor."""
        params = {n: w.requires_grad_(True) for n, w in self.merged.expert_params(k).items()}
        names = list(params)
        fisher = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
        rank, world = dist_rank_world()
        count = torch.zeros((), dtype=torch.float64)
        with torch.enable_grad():
            for batch in self.calibration_batches(task):
                for i in range(next(iter(batch.values())).shape[0]):
                    ex = {key: v[i:i + 1] for key, v in batch.items()}
                    if "attention_mask" in ex:  # text: right padding only (images have none)
                        n_tok = int(ex["attention_mask"].sum())
                        ex = {key: v[:, :n_tok] for key, v in ex.items()}
                    # one generator per example (by its index in the whole set): the same draws
                    # whatever the number of processes
                    g = torch.Generator().manual_seed(seed * 1_000_003 + rank + world * int(count))
                    loss = self._sampled_nll(task, ex, params, g)
                    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
                    for n, gr in zip(names, grads):
                        if gr is not None:
                            fisher[n] += gr.float().pow(2)
                    count += 1
        n_ex = float(all_reduce_sum(count.to(next(iter(fisher.values())).device)))
        return {n: all_reduce_sum(f) / max(n_ex, 1.0) for n, f in fisher.items()}

    def _sampled_nll(self, task: str, ex: dict, params: dict, g: torch.Generator) -> torch.Tensor:
        """−log p(ŷ | x) with ŷ drawn from the model's own prediction (summed over tokens for LMs)."""
        logits = self.merged(task=task, params=params, **self.forward_kwargs(ex)).logits.float()
        logp = F.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)  # [1, C] or [T, V]
        y = torch.multinomial(logp.detach().exp().cpu(), 1, generator=g).to(logp.device)
        return -logp.gather(1, y).sum()
