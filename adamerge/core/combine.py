"""The combination kernel: Σ_k c_k τ_k for one stacked tensor, with the backward ∂L/∂c_k = ⟨∂L/∂W, τ_k⟩.

One stacked product per tensor (``c @ τ.view(K, -1)``) inside a custom autograd function that keeps
a reference to τ (no copy, whatever its dtype or device) instead of letting autograd save a converted
copy, so task vectors can live in bf16 or in host memory and move to the model's device one tensor
at a time. ``MergedModel`` (adamerge/core/merged_model.py) is its only user. ``InjectGrad`` is the other end of
the training step (``MergeMethod.step_loss``): it hands the per-task backward's ∂L/∂W to the merge.
"""

from __future__ import annotations

import torch


def _expand_chunks(c: torch.Tensor, size: int, numel: int) -> torch.Tensor:
    """``[K, m]`` chunk coefficients -> ``[K, numel]`` per-entry coefficients."""
    return c.repeat_interleave(size, dim=1)[:, :numel]


_BLOCK_ELEMS = 1 << 18  # entries of τ (all K rows) converted to fp32 at a time: 1 MiB, stays in L2 cache


def _blocks(tau: torch.Tensor, device: torch.device):
    """(start, stop, fp32 block of τ.view(K, -1) on ``device``); one small temporary at a time, not K copies.

    τ kept on another device (host memory) comes over one tensor at a time, as one contiguous copy
    (asynchronous from pinned memory), so the accelerator holds at most one tensor's τ.
    """
    flat = tau.flatten(1)
    if flat.device != device:
        flat = flat.to(device, non_blocking=True)
    if flat.dtype == torch.float32:
        yield 0, flat.shape[1], flat
        return
    block = max(1, _BLOCK_ELEMS // flat.shape[0])
    for i in range(0, flat.shape[1], block):
        j = min(i + block, flat.shape[1])
        yield i, j, flat[:, i:j].float()


def _gather_rows(tau: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``τ[:, rows]`` as ``[K, len(rows), ...]``: one gather over the flattened [K·V] rows (3× faster on CPU
    than ``index_select`` along dim 1)."""
    if not tau.is_contiguous():
        return tau.index_select(1, rows)
    K, V = tau.shape[:2]
    idx = (torch.arange(K, device=tau.device)[:, None] * V + rows).flatten()
    return tau.flatten(0, 1).index_select(0, idx).view(K, len(rows), *tau.shape[2:])


def _weighted_sum(c: torch.Tensor, tau: torch.Tensor, device: torch.device, chunk_size: int,
                  into: torch.Tensor | None = None, adds: tuple = ()) -> torch.Tensor:
    """Σ_k c_k τ_k (+ Σ adds) in fp32, written into ``into`` (flat) when given."""
    if c.dim() == 2:  # chunk coefficients [K, m]
        t = tau.to(device, non_blocking=True).float().flatten(1)
        return (_expand_chunks(c, chunk_size, t.shape[1]) * t).sum(0).view(tau.shape[1:])
    flat = into if into is not None else torch.empty(tau[0].numel(), dtype=torch.float32, device=device)
    flat_adds = [a.reshape(-1) for a in adds]
    for i, j, t in _blocks(tau, device):
        torch.mv(t.t(), c, out=flat[i:j])
        for a in flat_adds:  # while the block is still in cache
            flat[i:j].add_(a[i:j])
    return flat.view(tau.shape[1:])


class Combine(torch.autograd.Function):
    """Σ_k c_k τ_k for one tensor; backward = ⟨g, τ_k⟩ (per chunk when chunked).

    With ``out`` (a reused buffer) it writes ``Σ adds + Σ_k c_k τ_k`` there instead — no fresh
    model-sized allocation per step (on CPU its page faults cost as much as the arithmetic). With
    ``rows`` only those rows of ``out`` are written: an embedding table whose other rows this step
    never looks up.
    """

    @staticmethod
    def forward(ctx, coef: torch.Tensor, tau: torch.Tensor, device: torch.device, chunk_size: int,
                adds: tuple = (), out: torch.Tensor | None = None, rows: torch.Tensor | None = None):
        if rows is not None:  # gathered once (a few hundred rows), kept for backward
            tau = _gather_rows(tau, rows.to(tau.device))
            adds = tuple(a.index_select(0, rows) for a in adds)
        ctx.tau, ctx.chunk_size, ctx.coef_shape, ctx.rows = tau, chunk_size, coef.shape, rows
        c = coef.detach().float().to(device)
        fused = out is not None and rows is None and out.dtype == torch.float32 and c.dim() == 1
        with torch.autocast(device.type, enabled=False):  # CUDA autocast would run mv in half precision
            value = _weighted_sum(c, tau, device, chunk_size, out.view(-1) if fused else None, adds if fused else ())
        if out is None:
            return value
        if not fused:
            value = sum(adds, value).to(out.dtype)
            out.copy_(value) if rows is None else out.index_copy_(0, rows, value)
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        if ctx.rows is not None:
            g = g.index_select(0, ctx.rows)  # the other rows were not looked up: their gradient is zero
        if g.is_sparse:  # a lookup table's, from sparse_lookup_grad: duplicates are summed here
            g = g.to_dense()
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
        return grad, None, None, None, None, None, None


class InjectGrad(torch.autograd.Function):
    """A zero-valued loss whose backward hands the stored ∂L/∂W to each merged tensor W.

    Same gradient as the surrogate Σ⟨W, ∂L/∂W⟩ without its multiply and sum over the whole model;
    the incoming scale (AMP loss scaling, accumulation) is applied to the stored gradients.
    """

    @staticmethod
    def forward(ctx, grads: tuple, *params: torch.Tensor) -> torch.Tensor:
        ctx.grads = grads
        return params[0].new_zeros(()) if params else torch.zeros(())

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        if g.numel() == 1 and g.item() == 1.0:  # the usual case: no model-sized scaled copy
            return (None, *ctx.grads)
        return (None, *(gr * g.to(gr.dtype) for gr in ctx.grads))


def combine(coef: torch.Tensor, tau: torch.Tensor, device: torch.device | None = None,
            chunk_size: int = 0) -> torch.Tensor:
    """Σ_k coef_k τ_k for one stacked tensor, differentiable in ``coef`` only."""
    return Combine.apply(coef, tau, device if device is not None else coef.device, chunk_size)
