"""LoRA experts kept factorized: τ_k = s_k·B_k@A_k is never written out dense to train on.

``LoraFactors`` holds, for each merged Linear weight that every expert changing it adapts with LoRA,
all experts' factors concatenated along the rank: A [R, in], B [out, R], and for each rank row its
expert and that expert's scaling (experts may have different ranks). ``TaskVectors`` owns it beside
its dense tensors (``TaskVectors.factors``). The training step runs the multi-adapter forward
y = x W0ᵀ + Σ_k c_k s_k (x A_kᵀ) B_kᵀ through forward hooks (``hooks``), so neither τ nor ∂L/∂W of
those weights is ever dense — or merges W0 + B diag(c·s) A once per step (``delta``; one matmul of the
concatenated factors, its gradient ∂L/∂c from autograd through it), which costs less when the step has
many tokens (``task_vectors.lora_step``: ``auto`` picks per weight, ``Factors.merge_is_cheaper``). No
τ_k is ever dense either way. Evaluation and export materialize W0 + Σ_k c_k s_k B_k A_k one tensor at a
time. Which methods may use it is decided by ``MergeAlgorithm.lora_factorized``.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..pool.model_pool import ModelPool

LORA_CHOICES = {
    "lora": ("auto", "dense", "factorized"),  # task_vectors.lora: whether LoRA experts stay factorized
    "lora_step": ("auto", "adapters", "merge"),  # task_vectors.lora_step: how a training step runs them
}


def check_lora_key(key: str, value: object) -> None:
    """``task_vectors.<key>`` (``lora`` or ``lora_step``) must be one of its ``LORA_CHOICES``: a one-line
    ConfigError otherwise."""
    choices = LORA_CHOICES[key]
    if value not in choices:
        raise ConfigError(f"config key 'task_vectors.{key}' must be one of {', '.join(choices)}, got {value!r}")


@dataclass
class Factors:
    """One weight's factors, every expert's stacked along the rank: Σ_k c_k s_k B_k A_k = B diag(c[owner]·scale) A."""

    a: torch.Tensor  # [R, in]
    b: torch.Tensor  # [out, R]
    owner: torch.Tensor  # [R] int64: the expert of each rank row
    scale: torch.Tensor  # [R] fp32: that expert's LoRA scaling s_k

    def weights(self, c: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``[R]``: c_k s_k for each rank row (differentiable in ``c``)."""
        return c.to(device).float()[self.owner.to(device)] * self.scale.to(device)

    def merge_is_cheaper(self, tokens: int | None) -> bool:
        """Whether merging B diag(w) A once per step costs fewer multiply-adds than the adapters' forward over
        ``tokens`` rows: R·out·in < tokens·R·(out + in), each with its backward (None: unknown, e.g. images)."""
        out_features, in_features = self.b.shape[0], self.a.shape[1]
        return tokens is None or tokens * (out_features + in_features) > out_features * in_features


def linear_weights(base: nn.Module) -> set[str]:
    """Names of the ``weight`` of each plain ``nn.Linear`` of ``base`` that no other module shares (a tied
    weight is also used elsewhere, where a forward hook on the Linear would not see it)."""
    uses = Counter(id(p) for _, p in base.named_parameters(remove_duplicate=False))
    return {f"{n}.weight" if n else "weight" for n, m in base.named_modules()
            if type(m) is nn.Linear and uses[id(m.weight)] == 1}


class LoraFactors:
    """Ordered mapping ``name -> Factors`` for the merged tensors kept factorized, over ``K`` experts."""

    def __init__(self, factors: dict[str, Factors], K: int):
        self.factors = dict(factors)
        self.K = K

    @classmethod
    def from_pool(cls, pool: ModelPool, names: list[str], dtype: torch.dtype,
                  keep_unchanged: bool = False) -> LoraFactors | None:
        """The factors of those ``names`` (Linear weights) that every expert either adapts with LoRA or leaves
        alone; None when there is none. A tensor some expert changes densely (a full fine-tune,
        ``modules_to_save``) is left to the dense task vectors."""
        linear = linear_weights(pool.base_model)
        out = {}
        for n in names:
            if n not in linear:
                continue
            parts = []
            for k, t in enumerate(pool.task_names):
                f = pool.lora_factors(t, n)
                if f is not None:
                    parts.append((k, *f))
                elif pool.task_vector(t, n).any():
                    break  # changed densely by this expert
            else:
                if parts and (keep_unchanged or any(a.any() and b.any() for _, a, b, _ in parts)):
                    out[n] = Factors(
                        a=torch.cat([a for _, a, _, _ in parts]).to(dtype),
                        b=torch.cat([b for _, _, b, _ in parts], dim=1).to(dtype),
                        owner=torch.cat([torch.full((a.shape[0],), k) for k, a, _, _ in parts]),
                        scale=torch.cat([torch.full((a.shape[0],), float(s)) for _, a, _, s in parts]),
                    )
        return cls(out, len(pool.task_names)) if out else None

    @property
    def names(self) -> list[str]:
        return list(self.factors)

    def __contains__(self, name: str) -> bool:
        return name in self.factors

    def __len__(self) -> int:
        return len(self.factors)

    def map(self, fn) -> LoraFactors:
        """Every tensor through ``fn`` (e.g. a device move)."""
        return LoraFactors({n: Factors(*(fn(t) for t in (f.a, f.b, f.owner, f.scale)))
                            for n, f in self.factors.items()}, self.K)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for f in self.factors.values() for t in (f.a, f.b, f.owner, f.scale))

    def via_adapters(self, lora_step: str, tokens: int | None) -> list[str]:
        """The weights a step over ``tokens`` input rows runs as adapters (``hooks``) under ``lora_step``; the
        others are merged from their factors (``delta``) once per step."""
        if lora_step == "merge":
            return []
        return [n for n, f in self.factors.items() if lora_step == "adapters" or not f.merge_is_cheaper(tokens)]

    def delta(self, name: str, c: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Σ_k c_k s_k B_k A_k of one weight, dense fp32 on ``device`` (evaluation, export), differentiable in ``c``."""
        f = self.factors[name]
        return (f.b.to(device).float() * f.weights(c, device)) @ f.a.to(device).float()

    def expert_delta(self, name: str, k: int, device: torch.device) -> torch.Tensor:
        """τ_k = s_k B_k A_k of one weight, dense fp32 on ``device``."""
        return self.delta(name, torch.eye(self.K, device=device)[k], device)

    @contextlib.contextmanager
    def hooks(self, base: nn.Module, coefs: dict[str, torch.Tensor]):
        """While active, the Linear of each weight ``name`` in ``coefs`` adds Σ_k c_k s_k (x A_kᵀ) B_kᵀ to its
        output, c = ``coefs[name]`` ([K], differentiable); ``torch.func.functional_call`` honours the hooks."""
        handles = []
        try:
            for n, c in coefs.items():
                module = base.get_submodule(n.rpartition(".")[0])
                handles.append(module.register_forward_hook(partial(_low_rank, self.factors[n], c), with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()


class LowRank(torch.autograd.Function):
    """((x Aᵀ) · w) Bᵀ with the backward recomputing x Aᵀ: autograd would keep x Aᵀ and its scaled copy
    ([tokens, R] each, R = Σ_k r_k) for every adapted layer until the backward — per expert about the
    adapter's own size again. Only x (already kept by the Linear itself), A, B and w are saved; the factors
    are frozen, so only x and w get gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, a, b, w)
        return F.linear(F.linear(x, a) * w, b)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, a, b, w = ctx.saved_tensors
        gh = F.linear(g.to(x.dtype), b.t())  # ∂/∂(h·w), [..., R]; under autocast g may come in half precision
        grad_w = (gh * F.linear(x, a)).reshape(-1, gh.shape[-1]).sum(0).to(w.dtype) if ctx.needs_input_grad[3] else None
        grad_x = F.linear(gh * w, a.t()) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, grad_w


def _low_rank(f: Factors, c: torch.Tensor, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor):
    x = args[0] if args else kwargs["input"]
    a, b = f.a.to(x.device, x.dtype), f.b.to(x.device, x.dtype)
    return output + LowRank.apply(x, a, b, f.weights(c, x.device).to(x.dtype))
