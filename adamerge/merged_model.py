"""MergedModel: frozen base + TaskVectors + one coefficient module — the only place weights are combined.

``W = W0 + [mask ⊙] Σ_k c_k τ_k`` per merged tensor, evaluated with ``torch.func.functional_call`` so
only the coefficients (and mask) are trainable and the base module is never copied.

The combination is one stacked product per tensor (``c @ τ.view(K, -1)``) inside a custom autograd
function whose backward is the inner product ``∂L/∂c_k = ⟨∂L/∂W, τ_k⟩``. It keeps a reference to
τ (no copy, whatever its dtype or device) instead of letting autograd save a converted copy, so task
vectors can live in bf16 or in host memory and move to the model's device one tensor at a time.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from .coefficients import Coefficients, ConcreteMask
from .task_vectors import TaskVectors


def _expand_chunks(c: torch.Tensor, size: int, numel: int) -> torch.Tensor:
    """``[K, m]`` chunk coefficients -> ``[K, numel]`` per-entry coefficients."""
    return c.repeat_interleave(size, dim=1)[:, :numel]


_BLOCK = 1 << 16  # columns of τ converted to fp32 at a time when τ is stored in another dtype/device


def _blocks(tau: torch.Tensor, device: torch.device):
    """(start, stop, fp32 block of τ.view(K, -1) on ``device``); one small reused temporary, not K copies."""
    flat = tau.flatten(1)
    if flat.dtype == torch.float32 and flat.device == device:
        yield 0, flat.shape[1], flat
        return
    for i in range(0, flat.shape[1], _BLOCK):
        j = min(i + _BLOCK, flat.shape[1])
        yield i, j, flat[:, i:j].to(device, non_blocking=True).float()


class _Combine(torch.autograd.Function):
    """delta = Σ_k c_k τ_k for one tensor; backward = ⟨g, τ_k⟩ (per chunk when chunked)."""

    @staticmethod
    def forward(ctx, coef: torch.Tensor, tau: torch.Tensor, device: torch.device, chunk_size: int):
        c = coef.detach().float().to(device)
        ctx.tau, ctx.chunk_size, ctx.coef_shape = tau, chunk_size, coef.shape
        if c.dim() == 1:
            delta = torch.empty(tau[0].numel(), dtype=torch.float32, device=device)
            for i, j, t in _blocks(tau, device):
                torch.mv(t.t(), c, out=delta[i:j])
        else:
            t = tau.to(device, non_blocking=True).float().flatten(1)
            delta = (_expand_chunks(c, chunk_size, t.shape[1]) * t).sum(0)
        return delta.view(tau.shape[1:])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        gf = g.float().flatten()
        if len(ctx.coef_shape) == 1:
            grad = torch.zeros(ctx.coef_shape, dtype=torch.float32, device=g.device)
            for i, j, t in _blocks(ctx.tau, g.device):
                grad.addmv_(t, gf[i:j])
        else:
            t = ctx.tau.to(g.device, non_blocking=True).float().flatten(1)
            prod = t * gf
            K, n = prod.shape
            m = ctx.coef_shape[1]
            pad = m * ctx.chunk_size - n
            grad = torch.nn.functional.pad(prod, (0, pad)).view(K, m, ctx.chunk_size).sum(-1)
        return grad, None, None, None


def combine(coef: torch.Tensor, tau: torch.Tensor, device: torch.device | None = None,
            chunk_size: int = 0) -> torch.Tensor:
    """Σ_k coef_k τ_k for one stacked tensor, differentiable in ``coef`` only."""
    return _Combine.apply(coef, tau, device if device is not None else coef.device, chunk_size)


class MergedModel(nn.Module):
    """Frozen base module + task vectors + coefficients (+ optional shared Concrete mask).

    The base module and the task vectors are held outside the module tree so that the
    LightningModule's ``state_dict`` (and so every checkpoint) holds only what trains. ``_apply``
    forwards device moves to them: the Trainer places the base; task vectors follow the model
    unless ``tv_device`` pins them (e.g. ``cpu`` to keep accelerator memory flat in K).
    """

    def __init__(
        self,
        base: nn.Module,
        task_vectors: TaskVectors,
        coefficients: Coefficients,
        heads: dict[str, dict[str, torch.Tensor]] | None = None,
        mask: ConcreteMask | None = None,
        tv_device: str | None = None,
        offset: dict[str, torch.Tensor] | None = None,
    ):
        super().__init__()
        object.__setattr__(self, "base", base.eval().requires_grad_(False))
        object.__setattr__(self, "task_vectors", task_vectors)
        object.__setattr__(self, "heads", heads or {})
        # a fixed starting merge (e.g. RegMean's) added under the learned part: W = W0 + offset + Σ c τ
        object.__setattr__(self, "offset", offset or {})
        self.coefficients = coefficients
        self.mask = mask
        self.tv_device = tv_device
        self.names = task_vectors.names
        if coefficients.L != len(self.names) or coefficients.K != task_vectors.K:
            raise ValueError(
                f"coefficients are [{coefficients.L} tensors x {coefficients.K} tasks] but the task vectors are "
                f"[{len(self.names)} x {task_vectors.K}]"
            )
        self._base_params = dict(base.named_parameters())
        missing = [n for n in self.names if n not in self._base_params]
        if missing:
            raise ValueError(f"task vector tensor '{missing[0]}' is not a parameter of the base model")

    # -- placement --------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.base._apply(fn, recurse)
        self._base_params = dict(self.base.named_parameters())
        object.__setattr__(self, "heads", {t: {n: fn(v) for n, v in h.items()} for t, h in self.heads.items()})
        object.__setattr__(self, "offset", {n: fn(v) for n, v in self.offset.items()})
        if self.tv_device is None:
            tv = self.task_vectors
            # follow the model's device but keep the task vectors' storage dtype
            object.__setattr__(self, "task_vectors",
                               tv.map(lambda n, t: fn(t).to(dtype=t.dtype)))
        return self

    @property
    def device(self) -> torch.device:
        return self.coefficients.raw.device

    @property
    def task_names(self) -> list[str]:
        return self.task_vectors.task_names

    # -- merging ----------------------------------------------------------------------------
    def _deltas(self):
        """(name, Σ_k c_k τ_k) per merged tensor (mask applied), one at a time."""
        coefs = self.coefficients()
        masks = self.mask() if self.mask is not None and self.mask.enabled else None
        for i, n in enumerate(self.names):
            w0 = self._base_params[n]
            size = self.coefficients.chunk_sizes[i] if self.coefficients.chunk_sizes else 0
            d = combine(coefs[i], self.task_vectors[n], w0.device, size)
            yield n, (masks[i] * d if masks is not None else d)

    def deltas(self) -> dict[str, torch.Tensor]:
        """Σ_k c_k τ_k per merged tensor (mask applied), differentiable in the trainable parts."""
        return dict(self._deltas())

    def merged_params(self) -> dict[str, torch.Tensor]:
        """Merged values of every merged tensor, in the base's dtype (merged one tensor at a time, so
        no model-sized dict of deltas lives beside the merged weights)."""
        out = {}
        for n, d in self._deltas():
            w0 = self._base_params[n]
            out[n] = w0 + (d + self.offset[n] if n in self.offset else d).to(w0.dtype)
        return out

    def forward(self, task: str | None = None, params: dict[str, torch.Tensor] | None = None, **inputs):
        """Run the base module with merged weights (``params``, default: merge now) and ``task``'s head."""
        if params is None:
            params = self.merged_params()
        if task is not None and task in self.heads:
            params = {**params, **self.heads[task]}
        return functional_call(self.base, params, args=(), kwargs=inputs)

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The base's full state dict with merged weights (heads as in the base), on CPU."""
        was = self.training
        self.eval()
        merged = self.merged_params()
        self.train(was)
        # tied weights (e.g. lm_head = embed_tokens) appear under several names: follow the merge
        first: dict[int, str] = {}
        alias = {}
        for n, p in self.base.named_parameters(remove_duplicate=False):
            alias[n] = first.setdefault(id(p), n)
        sd = {}
        for n, v in self.base.state_dict().items():
            src = alias.get(n, n)
            sd[n] = merged[src].detach().cpu().clone() if src in merged else v.detach().cpu().clone()
        return sd
