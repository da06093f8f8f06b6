"""DAM, Defense-Aware Merging (Yang et al., ICLR 2025, arXiv 2410.13910; the authors' code is FusionBench's
``clip_safe_concrete_adamerging``): Concrete AdaMerging whose mask is also learned against a backdoor.

Each phase-1 step of Concrete AdaMerging (adamerge/methods/concrete.py: λ reset, one inner λ step, one mask step)
gains an adversary step between the two. Per task k, a universal perturbation δ_k of the inputs, with the merge
detached, maximises the cross-entropy between the perturbed prediction f(x + δ_k) and the clean one, argmax f(x)
(Adam, ``adv_lr``): it searches for the input shift that flips the merge, the way a trigger does. The mask step then
minimises Σ_k H(f(x)) + ``adv_weight`` · H(f(x + δ_k)): the merge stays confident on clean inputs and on the
perturbed ones, which favours a mask without the backdoor's shortcut. The three sub-steps share one mask sample.
Phase 2 is Concrete AdaMerging's: plain AdaMerging under the final mask.

For text, δ_k lives where the authors' image perturbation cannot: it is added to the input token embeddings (one
vector per position, [max_position_embeddings, hidden], the first L rows for a batch of length L). The authors'
clamp to the image range has no counterpart and is left out. This adaptation is this implementation's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..run.distributed import all_reduce_mean
from .concrete import ConcreteAdaMerging, ConcreteAdaMergingConfig
from .method_config import check_range
from .registry import register


@dataclass
class DamConfig(ConcreteAdaMergingConfig):
    adv_lr: float = 1e-4          # Adam lr of the perturbations (the authors')
    adv_weight: float = 0.1       # weight of the perturbed inputs' entropy in the mask step (the authors')

    def check(self, prefix: str) -> None:
        super().check(prefix)
        check_range(self.adv_lr, f"{prefix}.adv_lr", 0, strict_lo=True)
        check_range(self.adv_weight, f"{prefix}.adv_weight", 0)


@register
class DefenseAwareMerging(ConcreteAdaMerging):
    """Concrete AdaMerging with DAM's adversary step and perturbed-entropy term (module docstring)."""

    name = "dam"
    Config = DamConfig

    def __init__(self, pool, method: dict, task_vectors: dict | None = None):
        if pool.family.name != "sequence_classification":
            raise ConfigError(f"method dam perturbs the input token embeddings of sequence_classification pools; "
                              f"this pool is {pool.family.name}")
        super().__init__(pool, method, task_vectors)
        positions = pool.base_model.config.max_position_embeddings
        hidden = pool.base_model.get_input_embeddings().embedding_dim
        self.perturbation = torch.nn.Parameter(torch.zeros(len(pool.task_names), positions, hidden))

    @contextmanager
    def perturbed(self, task: str, trains: bool) -> Iterator[None]:
        """Forwards inside add task ``task``'s δ to the input token embeddings (detached unless ``trains``)."""
        delta = self.perturbation[self.pool.task_names.index(task)]
        delta = delta if trains else delta.detach()

        def add(module, args, output: torch.Tensor) -> torch.Tensor:
            return output + delta[: output.shape[1]].to(output.dtype)

        hook = self.pool.base_model.get_input_embeddings().register_forward_hook(add)
        try:
            yield
        finally:
            hook.remove()

    def configure_optimizers(self):
        """Concrete AdaMerging's optimizers, and the perturbations' Adam (``adv_lr``) last."""
        configured = super().configure_optimizers()
        adversary = torch.optim.Adam([self.perturbation], lr=self.cfg.adv_lr, betas=tuple(self.cfg.betas))
        if isinstance(configured, list):
            return [*configured, adversary]
        optimizers, schedulers = configured
        return [*optimizers, adversary], schedulers

    def task_loss(self, task: str, inputs: dict[str, torch.Tensor], params: dict | None = None) -> torch.Tensor:
        """The entropy on clean inputs; in the mask step, plus ``adv_weight`` × the entropy on the perturbed ones."""
        clean = super().task_loss(task, inputs, params)
        if not self.in_mask_step:
            return clean
        with self.perturbed(task, trains=False):
            return clean + self.cfg.adv_weight * super().task_loss(task, inputs, params)

    def before_mask_step(self, batch: dict[str, dict[str, torch.Tensor]], rng) -> None:
        """The adversary: one Adam step of every task's δ on −CE(f(x + δ), argmax f(x)), the merge detached (the mask
        step's sample, which it then hands back)."""
        with torch.no_grad():
            params = self.merged.merged_params()
        total, grad = torch.zeros(()), torch.zeros_like(self.perturbation)
        for task, inputs in batch.items():
            with torch.no_grad():
                target = self.task_logits(task, inputs, params)[0].argmax(-1)
            with self.perturbed(task, trains=True):
                loss = -F.cross_entropy(self.task_logits(task, inputs, params)[0].float(), target)
            # autograd.grad, not backward: a second backward per step would break DDP's reducer (as concrete.py's)
            grad += torch.autograd.grad(loss, [self.perturbation])[0]
            total = total - loss.detach()
        self.perturbation.grad = all_reduce_mean(grad)
        optimizer = self.optimizers()[3].optimizer  # a bare torch step: only the mask step counts in global_step
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.merged.mask.set_rng_state(rng)
        self.log("adversary_ce", total, on_step=True)
