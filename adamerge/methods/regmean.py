"""RegMean and RegMean++: closed-form merges of linear layers from input statistics.

RegMean ("Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023): for every
linear layer, the weight that best reproduces all experts' outputs on their own inputs,

    W* = argmin_W Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖²   ⇒   W*ᵀ = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ,

with G_i = X_iᵀX_i / n_i the (token-averaged, as in FusionBench) Gram matrix of the layer's inputs
in expert i on task i's calibration texts, and G̃ = α·G + (1−α)·diag(G) (off-diagonals shrunk).
Every other merged tensor (biases, norms, embeddings) is averaged. Padding tokens are left out of
the Grams, which are accumulated in float32; the solve runs in float64 (activation Grams are often
ill-conditioned) on deltas (W_i = W0 + τ_i, same W*), with a tiny ridge (1e-10 of the mean
diagonal) toward the average so that input directions no token ever takes (singular Grams) fall
back to the average instead of blowing up.

RegMean++ (Nguyen et al., 2025): the same closed form, but the inputs of block l come from the
merged model built so far (blocks < l merged, embeddings averaged); inside block l each expert
runs its own block, as in the authors' code.

Statistics are gathered one "unit" at a time (a numbered block such as ``encoder.layer.3``, or a
linear outside blocks such as the pooler), in execution order: each task's calibration data goes
through the model up to the end of that unit (the forward is stopped there), so only one block's
statistics live at once: per linear, one task's Gram and the running sums Σ_k G̃_k, Σ_k G̃_k·D_k
(memory independent of K). RegMean can take ``layers_per_pass`` units per pass (null: all at
once: one forward per example and task, all Grams in memory).
Under DDP each process takes its slice of the examples and the sums are all-reduced.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.lines import LAYER_PATTERN
from ..core.task_vectors import TaskVectors
from ..run.distributed import all_reduce_sum
from .closed_form import StatisticsConfig, StatisticsMerge
from .method_config import check_range
from .registry import register


class _Stop(Exception):
    """Raised by a forward hook to end a forward pass once the statistics needed are collected."""


def _conv1d_types() -> tuple[type, ...]:
    try:  # GPT-2 style Conv1D: weight [in, out], y = x W + b
        from transformers.pytorch_utils import Conv1D

        return (Conv1D,)
    except ImportError:  # pragma: no cover
        return ()


def unit_of(name: str, pattern: str = LAYER_PATTERN) -> str:
    """The unit a tensor or module belongs to: its numbered block, else its own module path."""
    m = re.search(pattern, name)
    if m:
        return name[: m.end(1)]
    return name


def shrink_offdiag(g: torch.Tensor, alpha: float) -> torch.Tensor:
    """α·G + (1−α)·diag(G)."""
    return alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))


def accumulate(sums: dict, key: str, gram: torch.Tensor, delta: torch.Tensor, alpha: float) -> None:
    """Add G̃ and G̃·D (float64) to the running sums of ``key``: memory independent of K."""
    gt = shrink_offdiag(gram.double(), alpha)
    sg, sgd = sums.get(key, (0.0, 0.0))
    sums[key] = (sg + gt, sgd + gt @ delta.double())


def regmean_solve(grams: list[torch.Tensor], deltas: list[torch.Tensor], alpha: float,
                  ridge: float = 1e-10) -> torch.Tensor:
    """(Σ G̃_i)⁻¹ Σ G̃_i D_i for inputs-first deltas D_i ``[in, out]`` (a tiny ridge toward their mean)."""
    sums: dict = {}
    for g, d in zip(grams, deltas):
        accumulate(sums, "w", g, d, alpha)
    return solve(*sums["w"], sum(deltas) / len(deltas), ridge)


def solve(sg: torch.Tensor, sgd: torch.Tensor, mean_d: torch.Tensor, ridge: float = 1e-10) -> torch.Tensor:
    """(ΣG̃ + εI)⁻¹ (ΣG̃D + ε·mean D) in float64 (activation Grams are often ill-conditioned, cond ~1e5)."""
    sg, sgd, mean_d = sg.double(), sgd.double(), mean_d.double()
    eps = ridge * float(torch.diagonal(sg).mean().clamp(min=1e-30))
    eye = torch.eye(sg.shape[0], dtype=sg.dtype, device=sg.device)
    return torch.linalg.solve(sg + eps * eye, sgd + eps * mean_d).float()


@dataclass
class RegMeanConfig(StatisticsConfig):
    alpha: float = 0.9                  # off-diagonal scale of the Gram matrices
    layers_per_pass: int | None = 1     # RegMean: blocks whose statistics one forward gathers (null: all)
    exclude_modules: list[str] = field(default_factory=list)  # regexes of linear modules averaged instead

    def check(self, prefix: str) -> None:
        super().check(prefix)
        check_range(self.alpha, f"{prefix}.alpha", 0, 1)
        check_range(self.layers_per_pass, f"{prefix}.layers_per_pass", 1)


@register
class RegMean(StatisticsMerge):
    """W* = (Σ G̃_i)⁻¹ Σ G̃_i W_i per linear layer, with G_i from expert i's own activations."""

    name = "regmean"
    plus_plus = False
    Config = RegMeanConfig

    def merge_direction(self, tv: TaskVectors) -> dict[str, torch.Tensor]:
        m = self.cfg
        alpha = m.alpha
        per_pass = 1 if self.plus_plus else m.layers_per_pass
        excluded = list(m.exclude_modules)
        base = self.merged.base
        names = set(tv.names)
        conv1d = _conv1d_types()
        # module -> (weight name, inputs-first layout); Conv1D already stores [in, out]
        targets: dict[str, tuple[str, bool]] = {}
        for mod_name, mod in base.named_modules():
            w = f"{mod_name}.weight"
            if w in names and isinstance(mod, (nn.Linear, *conv1d)) and not any(re.search(p, mod_name) for p in excluded):
                targets[mod_name] = (w, isinstance(mod, conv1d))
        delta = {n: t.float().mean(0) for n, t in tv.items()}  # everything else: the average
        if not targets:
            return delta
        tasks = tv.task_names
        data = {t: self.calibration_batches(t) for t in tasks}
        order = self._execution_order(tv, data)
        by_unit: dict[str, list[str]] = defaultdict(list)
        for mod_name in targets:
            if unit_of(mod_name) in order:  # modules the forward never reaches keep the average
                by_unit[unit_of(mod_name)].append(mod_name)
        units = sorted(by_unit, key=order.__getitem__)
        step = len(units) if per_pass is None else int(per_pass)
        for start in range(0, len(units), step):
            group = units[start:start + step]
            mods = [mod for u in group for mod in by_unit[u]]
            sums: dict = {}  # module -> (Σ G̃_k, Σ G̃_k D_k): one task's Gram alive at a time
            for k, task in enumerate(tasks):
                params = self._task_params(tv, k, delta, order, before=order[group[0]])
                for mod, g in self._grams(task, data[task], params, mods, stop=group[-1]).items():
                    accumulate(sums, mod, g, self._inputs_first(tv[targets[mod][0]][k], targets[mod][1], g), alpha)
                del params
            for mod in mods:
                w, inputs_first = targets[mod]
                mean_d = self._inputs_first(tv[w].float().mean(0), inputs_first, sums[mod][0])
                sol = solve(*sums[mod], mean_d)
                delta[w] = sol if inputs_first else sol.T.contiguous()
            del sums
        return delta

    @staticmethod
    def _inputs_first(d: torch.Tensor, inputs_first: bool, like: torch.Tensor) -> torch.Tensor:
        d = d.to(like.device, torch.float32)
        return d if inputs_first else d.T

    # -- pieces ----------------------------------------------------------------------------------
    def _units(self, tv: TaskVectors) -> dict[str, str]:
        return {n: unit_of(n.rsplit(".", 1)[0] if "." in n else "") for n in tv.names}

    def _execution_order(self, tv: TaskVectors, data: dict[str, list]) -> dict[str, int]:
        """Units (blocks / modules holding merged tensors) in the order one forward first calls them."""
        base = self.merged.base
        units = set(self._units(tv).values())
        order: dict[str, int] = {}
        handles = []
        for u in units:
            def hook(module, args, u=u):
                order.setdefault(u, len(order))
            handles.append(base.get_submodule(u).register_forward_pre_hook(hook))
        task = next((t for t, b in data.items() if b), None)
        try:
            if task is not None:
                batch = {k: v[:1] for k, v in data[task][0].items()}
                self.merged(task=task, params={}, **self.forward_kwargs(batch))
        finally:
            for h in handles:
                h.remove()
        return order

    def _task_params(self, tv: TaskVectors, k: int, delta: dict[str, torch.Tensor], order: dict[str, int],
                     before: int) -> dict[str, torch.Tensor]:
        """Expert k's weights; for RegMean++ the merged values of every unit run before ``before``."""
        base = dict(self.merged.base.named_parameters())
        units = self._units(tv)
        out = self.merged.expert_params(k)
        for n, w in out.items():
            if self.plus_plus and order.get(units[n], len(order)) < before:  # merged so far
                w.copy_(base[n] + delta[n].to(w.device, w.dtype))
        return out

    def _grams(self, task: str, batches: list, params: dict, mods: list[str], stop: str) -> dict[str, torch.Tensor]:
        """Token-averaged input Gram matrices of ``mods`` on ``task``'s data (padding left out)."""
        base = self.merged.base
        sums: dict[str, torch.Tensor] = {}
        counts = {mod: torch.zeros((), dtype=torch.float64) for mod in mods}
        mask_now: list[torch.Tensor | None] = [None]

        def gram_hook(mod_name):
            def hook(module, args):
                x = args[0].detach()
                mask = mask_now[0]
                if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
                    x = x[mask.bool()]
                x = x.reshape(-1, x.shape[-1]).float()
                s = x.T @ x
                sums[mod_name] = sums[mod_name] + s if mod_name in sums else s
                counts[mod_name] += x.shape[0]
            return hook

        def stop_hook(module, args, output):
            raise _Stop

        handles = [base.get_submodule(mod).register_forward_pre_hook(gram_hook(mod)) for mod in mods]
        handles.append(base.get_submodule(stop).register_forward_hook(stop_hook))
        try:
            for batch in batches:
                mask_now[0] = batch.get("attention_mask")
                try:
                    self.merged(task=task, params=params, **self.forward_kwargs(batch))
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
        out = {}
        for mod in mods:
            w = base.get_submodule(mod).weight
            d_in = w.shape[1] if isinstance(base.get_submodule(mod), nn.Linear) else w.shape[0]
            s = sums.get(mod, torch.zeros(d_in, d_in, device=w.device))
            s = all_reduce_sum(s)
            n = float(all_reduce_sum(counts[mod].to(s.device)))
            out[mod] = s / max(n, 1.0)
        return out


@register
class RegMeanPP(RegMean):
    """RegMean++: block l's inputs come from the merged model built so far (blocks < l merged)."""

    name = "regmean_pp"
    plus_plus = True
