"""Losses: pure functions of tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def entropy(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Shannon entropy of softmax(logits) over the last dim.

    ``mask`` (same shape as ``logits[..., 0]``) selects the positions that count, e.g. the
    non-padding tokens of a causal LM's next-token distributions.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    h = -(logp.exp() * logp).sum(-1)
    if mask is None:
        return h.mean()
    m = mask.to(h.dtype)
    return (h * m).sum() / m.sum().clamp(min=1)


def marginal_entropy(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy of the batch's mean prediction: high when the predictions spread over the classes."""
    p = F.softmax(logits.float(), dim=-1)
    if mask is None:
        pbar = p.reshape(-1, p.shape[-1]).mean(0)
    else:
        m = mask.to(p.dtype).unsqueeze(-1)
        pbar = (p * m).reshape(-1, p.shape[-1]).sum(0) / m.sum().clamp(min=1)
    return -(pbar * pbar.clamp_min(1e-12).log()).sum()


def distill_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over positions (``mask`` selects)."""
    T = float(temperature)
    logq = F.log_softmax(student.float() / T, dim=-1)
    logp = F.log_softmax(teacher.float() / T, dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1) * T * T
    if mask is None:
        return kl.mean()
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp(min=1)


def hidden_mse(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over the given layers of the MSE between hidden states."""
    if not student:
        return torch.zeros(())  # no layers configured: a CPU scalar, callers add it only when layers exist
    return torch.stack([F.mse_loss(s.float(), t.float()) for s, t in zip(student, teacher)]).mean()


def l1_to_init(values: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
    """Σ|v − init| normalised by the number of coefficients per task."""
    per_task = values.numel() / max(1, values.shape[-1] if values.dim() else 1)
    return (values - init).abs().sum() / max(1.0, per_task)
