"""Expert Merging and Expert Merging++ (Zhang et al., arXiv 2509.25712).

Coefficients σ(w) per merged tensor and task (Expert Merging) or per contiguous chunk of each
flattened tensor (Expert Merging++), initialised at α̅ (``init``: 0.1, or per-task values such as
the task-arithmetic λ). For a calibration batch of task k the loss is

    β_k·T²·KL(softmax(z_k/T) ‖ softmax(z_merged/T)) + β_k·w_h·mean_{ℓ∈S} MSE(h_ℓ, h_ℓ^(k)) + γ·R,
    R = Σ|σ(w) − α̅| / (#coefficients / K),

with z_k, h^(k) the logits and hidden states of expert k itself (its own head for classification
pools; next-token logits, padding masked, for causal-LM pools; the first decoder step's logits, without
hidden states, for seq2seq-LM pools). The per-task forward/backward into ∂L/∂W is the base class's
``step_loss``; this file only adds the targets, the loss and the optimizer.

Scale: the authors take one sample at a time and add γ·R to every sample's loss; here every
micro-step holds one batch of every task, so each task's term is divided by K and γ·R is added once:
the step's gradient is the authors' per-sample mean, and ``gradient_clip_val`` keeps its meaning.

Expert targets are computed on the fly: expert k = base + τ_k (plus the expert's own values of
any tensor excluded from merging) through the same ``functional_call`` as the merged model,
in a no-grad forward just before the merged forward of that task's micro-batch. Why not cache them
once per calibration sample: the cache would be K·N·T·V floats of logits (plus hidden states) —
for an LLM vocabulary far more than the task vectors themselves — and it would have to be rebuilt
identically on resume; the on-the-fly target costs one forward without activations kept, reuses
the task vectors already in memory, and is a pure function of (expert, batch), so resumed runs
see exactly the same targets. Peak extra memory is one transient set of expert weights, freed
before the merged forward; never K model copies.

Expert Merging++ (importance-guided chunk coefficients) is adamerge/methods/expert_merging_pp.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..core.coefficients import Coefficients
from ..core.objectives import distill_kl, hidden_mse, l1_to_init
from ..core.task_vectors import TaskVectors
from ..core.transforms import active_transforms
from ..pool.model_pool import ModelPool
from .base import MergeMethod
from .method_config import ConfigError, LearnedConfig, check_range
from .registry import register


@dataclass
class ExpertMergingConfig(LearnedConfig):
    """Expert Merging's keys; the defaults are the authors'."""
    init: float | list[float] = 0.1        # α̅: start of σ(w) and what the regulariser pulls toward
    temperature: float = 1.0               # T of the logit KL
    hidden_weight: float = 1.0             # w_h of the hidden-state MSE
    hidden_layers: list[int] = field(default_factory=list)  # S: hidden states aligned (empty: logits only)
    reg_weight: float = 5.0                # γ
    loss_weights: dict = field(default_factory=dict)        # β_k per task name (default 1)
    lr: float = 0.5
    weight_decay: float = 1e-5
    lr_schedule: Literal["constant", "cosine", "cosine_restarts"] = "cosine_restarts"  # the authors': AdamW, warm restarts
    restart_period: int = 50               # cosine warm restarts: first period (optimizer steps)
    restart_mult: int = 2                  # and its growth factor

    def check(self, prefix: str) -> None:
        super().check(prefix)
        refused = active_transforms(self)  # the whole list of task-vector transforms
        if refused:
            raise ConfigError(f"config key '{prefix}.{refused[0]}': not supported by {self.label} — the experts are "
                              "the teachers, so their task vectors must stay unprocessed")
        check_range(self.temperature, f"{prefix}.temperature", 0, strict_lo=True)
        check_range(self.reg_weight, f"{prefix}.reg_weight", 0)
        check_range(self.hidden_weight, f"{prefix}.hidden_weight", 0)
        check_range(self.restart_period, f"{prefix}.restart_period", 1)
        check_range(self.restart_mult, f"{prefix}.restart_mult", 1)


@register
class ExpertMerging(MergeMethod):
    """Layer-wise σ(w) coefficients aligned to each expert's logits (and hidden states)."""

    name = "expert_merging"
    Config = ExpertMergingConfig

    def __init__(self, pool: ModelPool, method: dict, task_vectors: dict | None = None):
        if not pool.family.hidden_states and self.parse_config(method).hidden_layers:  # before any τ is read
            raise ConfigError(f"config key 'method.hidden_layers': in a {pool.family.name} pool only logits are "
                              "aligned (no hidden states); leave hidden_layers empty")
        super().__init__(pool, method, task_vectors)
        m = self.cfg
        self.temperature = m.temperature
        self.hidden_weight = m.hidden_weight
        self.hidden_layers = list(m.hidden_layers)
        self.reg_weight = m.reg_weight
        weights = dict(m.loss_weights)
        unknown = sorted(set(weights) - set(pool.task_names))
        if unknown:
            raise ConfigError(f"method.loss_weights names unknown task(s) {unknown}; tasks: {pool.task_names}")
        self.loss_weights = {t: float(weights.get(t, 1.0)) for t in pool.task_names}
        self.register_buffer("alpha_init", self.initial_values(len(pool.task_names)), persistent=False)
        # expert values of shared tensors that are not merged (task_vectors.exclude): the teacher is
        # the real expert, the merged model keeps the base value there
        merged = set(self.merged.names)
        self._teacher_extra: dict[str, torch.Tensor] = {}
        for n in pool.shared_names():
            if n not in merged:
                t = torch.stack([pool.task_vector(task, n) for task in pool.task_names])
                if t.any():
                    self._teacher_extra[n] = t
        # per task, the merged tensors its expert changes (LoRA experts: only the adapted ones); the
        # others are left to the base in the teacher's forward instead of copying base + 0
        tv = self.merged.task_vectors
        self._teacher_names = [[n for n in self.merged.names if tv[n][k].any()] for k in range(tv.K)]

    # -- coefficients ------------------------------------------------------------------------
    def initial_values(self, K: int) -> torch.Tensor:
        """α̅ per task: where the coefficients start and what the regularizer pulls them toward."""
        return initial_alphas(self.cfg.init, K)

    def build_coefficients(self, tv: TaskVectors) -> Coefficients:
        return Coefficients(tv.K, len(tv), granularity=self.cfg.granularity,
                            init=self.initial_values(tv.K).tolist(), transform="sigmoid")

    # -- targets -----------------------------------------------------------------------------
    @torch.no_grad()
    def expert_params(self, task: str) -> dict[str, torch.Tensor]:
        """Expert ``task``'s weights (base + τ_k) wherever they differ from the base, for functional_call.

        With a starting merge the task vectors are held relative to it (τ'_k = τ_k − D, see
        ``start_from_merge``), so the expert is base + D + τ'_k.
        """
        k = self.merged.task_names.index(task)
        base = dict(self.merged.base.named_parameters())
        out = self.merged.expert_params(k, self._teacher_names[k])
        for n, t in self._teacher_extra.items():
            w0 = base[n]
            out[n] = w0 + t[k].to(w0.device, w0.dtype)
        return out

    def _forward_kwargs(self, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        kw: dict[str, Any] = self.family.model_inputs(self.merged.base, inputs)
        if self.hidden_layers:
            kw["output_hidden_states"] = True
        return kw

    def _hidden(self, out, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The configured layers' hidden states, restricted to non-padding positions."""
        hs = out.hidden_states
        for i in self.hidden_layers:
            if not -len(hs) <= i < len(hs):
                raise ConfigError(f"method.hidden_layers: layer {i} is out of range; the model returns "
                                  f"{len(hs)} hidden states (embeddings + {len(hs) - 1} layers)")
        mask = inputs.get("attention_mask")
        picked = [hs[i] for i in self.hidden_layers]
        if mask is not None and all(h.dim() == 3 and h.shape[:2] == mask.shape for h in picked):
            keep = mask.bool()
            picked = [h[keep] for h in picked]
        return picked

    # -- loss ----------------------------------------------------------------------------------
    def task_loss(self, task: str, inputs: dict[str, torch.Tensor], params: dict | None = None) -> torch.Tensor:
        """β_k·(T²·KL(expert ‖ merged) + w_h·hidden MSE) / K for one batch of task k."""
        kw = self._forward_kwargs(inputs)
        with torch.no_grad():
            t_out = self.merged(task=task, params=self.expert_params(task), **kw)
            t_logits = self.family.logits(t_out, inputs)[0].detach()
            t_hidden = [h.detach() for h in self._hidden(t_out, inputs)] if self.hidden_layers else []
            del t_out
        s_out = self.merged(task=task, params=params, **kw)
        s_logits, mask = self.family.logits(s_out, inputs)
        kl = distill_kl(s_logits, t_logits, self.temperature, mask)
        loss = kl
        if self.hidden_layers and self.hidden_weight:
            hid = hidden_mse(self._hidden(s_out, inputs), t_hidden).to(kl.device)
            loss = loss + self.hidden_weight * hid
            self._log(f"hidden/{task}", hid)
        self._log(f"kl/{task}", kl)
        return self.loss_weights[task] * loss / self.merged.task_vectors.K

    def regularizer(self) -> torch.Tensor:
        """γ·Σ|σ(w) − α̅| / (#coefficients per task)."""
        if not self.reg_weight:
            return torch.zeros((), device=self.device)
        c = self.merged.coefficients
        v = c.values()
        if c.granularity == "chunk":
            v = v.T  # [Σm, K]: l1_to_init normalises by the size of the last (task) dim
        r = l1_to_init(v, self.alpha_init.to(v.device, v.dtype))
        self._log("reg", r)
        return self.reg_weight * r

    def _log(self, key: str, value: torch.Tensor) -> None:
        # training steps only (not the start/end objective measured around them, with the module in eval mode)
        if self.training and self._trainer is not None and self.trainer.training:
            self.log(key, value.detach(), on_step=True)

    # -- optimizer -----------------------------------------------------------------------------
    def configure_optimizers(self):
        """``cosine_restarts`` (the authors'): AdamW on w + cosine warm restarts stepped once per optimizer
        step (after accumulation); otherwise MergeMethod's Adam (Distill merging: one cosine decay)."""
        m = self.cfg
        if m.lr_schedule != "cosine_restarts":
            return super().configure_optimizers()
        opt = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=m.lr,
                                betas=tuple(m.betas), weight_decay=m.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            opt, T_0=m.restart_period, T_mult=m.restart_mult, eta_min=m.eta_min_ratio * m.lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


def initial_alphas(init: float | Sequence[float], K: int) -> torch.Tensor:
    """α̅ per task from a scalar or a list of K values, each in (0, 1)."""
    t = torch.as_tensor(init, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(K).clone()
    if t.numel() != K:
        raise ConfigError(f"method.init: {t.numel()} values for {K} tasks")
    if not ((t > 0) & (t < 1)).all():
        raise ConfigError(f"method.init must lie in (0, 1) (σ(w) is initialised there), got {t.tolist()}")
    return t
