"""Per-tensor merge rules from mergekit and FusionBench, as stages on the stacked task vectors ``[K, ...]``.

Each rule rewrites the stack so that the usual merge ``θ0 + λ Σ_k τ̃_k`` (adamerge/core/combine.py) is the
rule's result: a rule that yields one merged update writes it into row 0 and zeros the others (SCE, WUDI,
MagMax, WIDEN; ``one_update``), a rule that reweights the experts scales their rows (Model Stock, with λ = 1/K). So they stream
tensor by tensor like the transforms (adamerge/streaming.py), and their method yamls are ``name: static``.
Each class follows its reference implementation's arithmetic (named in its docstring) so that their outputs
can be compared on identical inputs (bench/crosscheck.py, tests/test_streaming.py).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .stage import Stage, one_update


class Della(Stage):
    """DELLA's MagPrune (Deep et al., 2024; mergekit's ``della_magprune``): per task and row, keep each entry with a
    probability rising linearly with its magnitude's rank, from ``density − epsilon`` (smallest) to
    ``density + epsilon`` (largest); survivors are rescaled so that each task's tensor keeps its L1 norm
    (``rescale: l1``, mergekit's), or each by 1/its keep probability (``inverse``, the paper's), or not
    (``none``). One seeded generator runs through the tensors and tasks in order, restarted for every pass,
    drawing as ``torch.bernoulli`` does."""

    def __init__(self, density: float, epsilon: float, seed: int, rescale: str = "l1"):
        if not (0 < density - epsilon and density + epsilon < 1):
            raise ConfigError(f"della: density ± epsilon must lie in (0, 1), got density {density}, epsilon {epsilon}")
        self.density, self.epsilon, self.seed, self.rescale = density, epsilon, int(seed), rescale
        self.begin()

    def begin(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        work = t.dtype if t.dtype == torch.bfloat16 else torch.float32  # mergekit's working dtype on CPU
        for k in range(t.shape[0]):
            x = t[k] if t.dim() > 2 else t[k].unsqueeze(0)  # ranked along dim 1: a matrix's rows
            ranks = x.abs().argsort(dim=1).argsort(dim=1).to(work) + 1
            lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
            probs = (self.density - self.epsilon) + ((ranks - lo) / (hi - lo)).clamp(0, 1) * 2 * self.epsilon
            mask = torch.bernoulli(probs, generator=self.generator).to(work)
            xw = x.to(work)
            kept = xw * mask
            if self.rescale == "l1":
                before, after = xw.abs().sum(), kept.abs().sum()
                if before >= 1e-7 and after >= 1e-7:
                    kept = kept * (before / after)
            elif self.rescale == "inverse":  # the paper's: each survivor divided by its keep probability
                kept = kept / probs
            t[k].copy_(kept.view(t[k].shape))
        return t


class Sce(Stage):
    """SCE (FuseChat, Wan et al., 2024; mergekit's ``sce``): Select the ``select_topk`` share of entries with the largest
    variance across experts, Calculate one weight per expert, mean((masked τ_k)²) normalized to sum 1, Erase the
    entries whose sign disagrees with the sign of Σ_k τ_k (a zero sum counts as +), and merge
    Σ_k w_k e_k τ_k / Σ_k w_k e_k. ``mask_deltas``: mergekit also masks the merged deltas and the vote; the authors'
    code masks only the weights' input (false)."""

    def __init__(self, select_topk: float, mask_deltas: bool = True):
        self.select_topk, self.mask_deltas = select_topk, mask_deltas

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        masked = t
        if self.select_topk < 1:
            var = torch.var(t, dim=0, unbiased=False)
            k = int(torch.count_nonzero(var) * self.select_topk)
            mask = torch.zeros_like(var)
            if k > 0:
                mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
            masked = t * mask.unsqueeze(0)
        deltas = masked if self.mask_deltas else t
        weights = masked.square().reshape(t.shape[0], -1).mean(dim=1)
        total = torch.sum(weights).item()
        weights = torch.ones_like(weights) / t.shape[0] if abs(total) < 1e-6 else weights / total
        weights = weights.view(-1, *([1] * (t.dim() - 1)))
        majority = (deltas.sum(dim=0) >= 0).to(t.dtype) * 2 - 1
        erased = weights * (deltas.sign() == majority).to(t.dtype)
        update = (deltas * erased).sum(dim=0) / torch.sum(erased, dim=0).clamp(min=1e-6)
        return one_update(t, update)


class ModelStock(Stage):
    """Model Stock (Jang et al., ECCV 2024; mergekit's ``model_stock``): per tensor (or per row, ``filter_wise``) the
    ratio t = K·cos θ / (1 + (K − 1)·cos θ) from the mean pairwise cosine θ of the task vectors, and the merge
    θ0 + t · mean_k τ_k (with λ = 1/K: each row scaled by t). A singular denominator keeps the base."""

    def __init__(self, filter_wise: bool = False):
        self.filter_wise = filter_wise

    def fit(self, stream, K: int) -> None:
        if K < 2:
            raise ConfigError(f"model_stock needs at least 2 experts (their angle), got {K}")

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        K = t.shape[0]
        x = (t.unsqueeze(1) if t.dim() == 2 else t) if self.filter_wise else t.reshape(K, -1)
        cos = []
        for i in range(K):
            for j in range(i + 1, K):
                norms = torch.norm(x[i], dim=-1) * torch.norm(x[j], dim=-1)
                cos.append(((x[i] * x[j]).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
        cos_theta = torch.stack(cos).mean(dim=0).unsqueeze(-1)
        denominator = 1 + (K - 1) * cos_theta
        singular = denominator.abs() < 1e-6
        ratio = torch.where(singular, torch.zeros_like(cos_theta),
                            K * cos_theta / torch.where(singular, torch.ones_like(denominator), denominator))
        x.mul_(ratio.unsqueeze(0))  # x is a view of t
        return t


class MagMax(Stage):
    """MagMax (Marczak et al., ECCV 2024; FusionBench's ``magmax``): per entry, the task vector entry of largest
    magnitude, folded over the tasks in order with ``>=`` (a later task wins a tie, as the authors' code)."""

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        best = t[0].clone()
        for k in range(1, t.shape[0]):
            best = torch.where(t[k].abs() >= best.abs(), t[k], best)
        return one_update(t, best)


class Wudi(Stage):
    """WUDI merging (Cheng et al., "Whoever Started the Interference Should End It", ICML 2025, arXiv 2503.08099;
    FusionBench's ``wudi_merging``): per matrix, the merged update m, from Σ_k τ_k, takes ``iterations`` Adam steps
    (lr ``lr``) on Σ_k ‖(m − τ_k) τ_kᵀ‖² / ‖τ_k‖², the interference of m with each task's own input directions; other
    tensors take the mean. Data-free: each matrix is its own small optimisation, so it streams. The gradient,
    2 Σ_k (m − τ_k) τ_kᵀ τ_k / ‖τ_k‖², is formed in whichever order is cheaper (never the O × O product for a tall
    matrix such as an embedding)."""

    def __init__(self, iterations: int, lr: float):
        self.iterations, self.lr = iterations, lr

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        taus = t.float()
        if t.dim() != 3:
            return one_update(t, taus.sum(0) / t.shape[0])
        merged = torch.nn.Parameter(taus.sum(0))
        optimizer = torch.optim.Adam([merged], lr=self.lr, weight_decay=0)
        sq_norms = taus.flatten(1).square().sum(1).view(-1, 1, 1)
        grams = taus.transpose(1, 2) @ taus if t.shape[1] > t.shape[2] else None  # [K, I, I] for tall matrices
        for _ in range(self.iterations):
            disturbing = merged.detach().unsqueeze(0) - taus
            inner = disturbing @ grams if grams is not None else (disturbing @ taus.transpose(1, 2)) @ taus
            merged.grad = (2 * inner / sq_norms).sum(0)
            optimizer.step()
        return one_update(t, merged.detach())


class Widen(Stage):
    """WIDEN (Yu et al., "Extend Model Merging from Fine-Tuned to Pre-Trained Large Language Models via Weight
    Disentanglement", arXiv 2408.03092; the authors' MergeLLM ``widen_merging``): each matrix (an embedding transposed,
    so that columns are tokens) is split into per-column magnitudes ‖W_:,j‖ and directions W_:,j / ‖W_:,j‖; per expert,
    the columns are ranked by how far each moved from the base (|Δ magnitude| and 1 − cos of the directions), each rank
    share is softmaxed over the experts and set to ``score_calibration_value`` where it is above
    ``above_average_value_ratio`` × the expert's mean, and θ0 + Σ_k w_k ⊙ τ_k with w_k the mean of the two scores per
    column (not normalized over the experts). Vectors (norms, biases) score |τ_k| itself the same way."""

    needs_pool = True  # the base's tensors and which of them are embeddings

    def __init__(self, above_average_value_ratio: float = 1.0, score_calibration_value: float = 1.0):
        self.ratio, self.calibration = above_average_value_ratio, score_calibration_value

    def scores(self, significance: torch.Tensor) -> torch.Tensor:
        """[K, n] significance -> [K, n] scores: softmax over the experts, calibrated above each expert's mean."""
        scores = torch.softmax(significance, dim=0)
        scores[significance > significance.mean(dim=1, keepdim=True) * self.ratio] = self.calibration
        return scores

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        taus = t.float()
        if t.dim() <= 2:  # vectors and scalars: scored entry by entry
            flat = taus.reshape(t.shape[0], -1)
            return one_update(t, (flat * self.scores(flat.abs())).sum(0).view(t.shape[1:]).to(t.dtype))
        module = self.pool.base_model.get_submodule(name.rpartition(".")[0])
        flip = isinstance(module, torch.nn.Embedding)  # (vocab, dim): a token is a column once transposed
        base = self.pool.base_tensor(name).to(t.device, torch.float32)
        base, taus = (base.T, taus.transpose(1, 2)) if flip else (base.reshape(base.shape[0], -1), taus.flatten(2))
        base_norm = base.norm(dim=0)
        experts = base + taus
        norms = experts.norm(dim=1)  # [K, columns]
        moved = (norms - base_norm).abs()
        turned = 1 - torch.cosine_similarity(experts / norms.unsqueeze(1), (base / base_norm).unsqueeze(0), dim=1)
        weights = 0.5 * (self.scores(column_ranks(moved)) + self.scores(column_ranks(turned)))
        update = (taus * weights.unsqueeze(1)).sum(0)
        return one_update(t, (update.T if flip else update.reshape(t.shape[1:])).to(t.dtype))


def column_ranks(x: torch.Tensor) -> torch.Tensor:
    """Per row of ``x`` [K, n], each entry's rank share in [0, 1): rank / n (ties in their order, as a stable sort)."""
    share = (torch.arange(x.shape[1]) / x.shape[1]).to(x.device).expand_as(x)
    return torch.zeros_like(x).scatter(1, x.argsort(dim=1, stable=True), share)
