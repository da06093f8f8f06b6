"""KnOTS (Stoica et al., "Model merging with SVD to tie the Knots", ICLR 2025, arXiv 2410.19735; the authors'
gstoica27/KnOTS ``SVDMerger``): merge LoRA experts in a basis they share. Per matrix, the SVD of the experts' updates
side by side, [τ_1 … τ_K] = U S [V_1 … V_K] (float64, singular values ≤ 1e-5 dropped), gives each task the
coordinates S V_k in one basis U; the usual transforms (TIES, DARE, adamerge/core/transforms.py) merge those
coordinates, and U maps the merge back. Two stages: ``KnotsIn`` before the transforms (the stack becomes the
coordinates ``[K, r, I]``, so TIES' model-wide top-k counts coordinates, as the authors' flattened vector does),
``KnotsOut`` after them (back to ``[K, O, I]``: Σ_k λ U c_k = λ U Σ_k c_k). Tensors that are not matrices pass as
they are.
"""

from __future__ import annotations

import torch

from .stage import Stage


def subspace_alignment(stack: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(U ``[O, r]``, the tasks' coordinates S V_k ``[K, r, I]``) of the concatenated updates of one matrix."""
    K, _, inputs = stack.shape
    u, s, vh = torch.linalg.svd(torch.cat(list(stack), dim=1).to(torch.float64), full_matrices=False)
    keep = s > eps
    u, s, vh = u[:, keep].float(), s[keep].float(), vh[keep].float()
    return u, torch.stack([torch.diag(s) @ v for v in torch.split(vh, inputs, dim=1)])


class KnotsIn(Stage):
    """Each matrix's stack replaced by its tasks' coordinates in the shared basis (kept for ``KnotsOut``)."""

    def __init__(self) -> None:
        self.bases: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if t.dim() != 3:
            return t
        self.bases[name], coordinates = subspace_alignment(t)
        return coordinates.to(t.dtype)


class KnotsOut(Stage):
    """The coordinates mapped back through their matrix's basis: U c_k for each task."""

    def __init__(self, into: KnotsIn) -> None:
        self.into = into

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        u = self.into.bases.pop(name, None)
        if u is None:
            return t
        return torch.einsum("or,kri->koi", u, t.float()).to(t.dtype)
