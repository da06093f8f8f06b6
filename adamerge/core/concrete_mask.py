"""The binary-Concrete mask of Concrete subspace learning (adamerge/methods/concrete.py).

``MergedModel`` multiplies the combined task vectors by it: W = W0 + m̂/mean(m̂) ⊙ Σ_k λ_k τ_k.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import ConfigError

STRUCTURES = ("element", "row", "column")


def logit_shape(shape: torch.Size, structure: str) -> tuple[int, ...]:
    """The mask logits' shape for a merged tensor of ``shape``: itself, or one of its two dimensions
    kept and the other 1 (broadcast) for a matrix under a ``row`` / ``column`` mask."""
    shape = tuple(shape)
    if len(shape) != 2 or structure == "element":
        return shape
    return (shape[0], 1) if structure == "row" else (1, shape[1])


class ConcreteMask(nn.Module):
    """One binary-Concrete mask per merged tensor, shared by every task vector.

    Logits start at ``init_logit`` (0: keep probability 0.5). A training sample is
    σ((logit(u) + x)/T), divided by its mean so the expected scale of the merged update is kept
    (DARE-style rescaling).

    Training samples: each draw takes one seed from the mask's own CPU generator (whose state
    ``MergeMethod`` saves in checkpoints) and generates the uniform noise with a generator on the
    logits' device, so no per-weight noise is made on the host and copied over every step. The final
    mask uses a device generator seeded with ``seed + 1`` on each call: a pure function of the logits
    that never advances the training stream. ``frozen`` makes training use the final mask too.

    ``masked`` (one flag per merged tensor, default all): tensors flagged False get no logits and
    mask ``None`` (i.e. 1: merged with λ alone), e.g. an embedding table of which a batch uses few rows.

    ``structure``: ``element`` (the paper's: one logit per weight) | ``row`` | ``column``: one logit per
    output row / input column of each matrix (vectors keep one per entry), broadcast over the other
    dimension — a mask that keeps a low-rank (LoRA) update low-rank, which an elementwise one does not.
    """

    def __init__(self, shapes: list[torch.Size], temperature: float = 0.5, init_logit: float = 0.0,
                 eval_mode: str = "continuous", seed: int = 0, masked: list[bool] | None = None,
                 structure: str = "element"):
        super().__init__()
        self.masked = [True] * len(shapes) if masked is None else [bool(b) for b in masked]
        if len(self.masked) != len(shapes):
            raise ValueError(f"mask: {len(self.masked)} flags for {len(shapes)} tensors")
        if temperature <= 0:
            raise ConfigError(f"mask temperature must be > 0, got {temperature}")
        if eval_mode not in ("continuous", "hard"):
            raise ConfigError(f"mask eval_mode must be 'continuous' or 'hard', got '{eval_mode}'")
        if structure not in STRUCTURES:
            raise ConfigError(f"mask structure must be one of {', '.join(STRUCTURES)}, got '{structure}'")
        self.logits = nn.ParameterList([nn.Parameter(torch.full(logit_shape(s, structure), float(init_logit)))
                                        for s, k in zip(shapes, self.masked) if k])
        self.temperature, self.eval_mode = temperature, eval_mode
        self.generator = torch.Generator().manual_seed(int(seed))  # training samples' seeds (checkpointed)
        self.final_seed = int(seed) + 1
        self.frozen = False  # phase 2 of Concrete AdaMerging: train λ under the final mask

    def get_rng_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def _spread(self, per_logit: list) -> list:
        """One entry per merged tensor: ``per_logit``'s in order for masked tensors, ``None`` otherwise."""
        it = iter(per_logit)
        return [next(it) if k else None for k in self.masked]

    def _noise(self, seed: int) -> list[torch.Tensor]:
        """logit(u), u ~ U(0, 1), one tensor per mask tensor, from a device generator seeded with ``seed``."""
        device = self.logits[0].device
        g = torch.Generator(device=device).manual_seed(seed)
        out = []
        for x in self.logits:
            u = torch.rand(x.shape, generator=g, device=device).clamp_(1e-6, 1 - 1e-6)
            out.append(torch.log(u) - torch.log1p(-u))
        return out

    def sample(self, temperature: float | None = None) -> list[torch.Tensor]:
        T = self.temperature if temperature is None else temperature
        seed = int(torch.randint(0, 2**62, (), generator=self.generator))
        out = []
        for x, n in zip(self.logits, self._noise(seed)):
            m = torch.sigmoid((n + x) / T)
            out.append(m / m.mean().clamp(min=1e-6))
        return self._spread(out)

    def _final_raw(self) -> list[torch.Tensor]:
        """logit(u) + x per tensor with the fixed final-mask noise, before the temperature."""
        return [n + x.detach() for x, n in zip(self.logits, self._noise(self.final_seed))]

    @torch.no_grad()
    def final(self) -> list[torch.Tensor]:
        out = []
        for z in self._final_raw():
            m = (z > 0).to(z.dtype) if self.eval_mode == "hard" else torch.sigmoid(z / self.temperature)
            out.append(m / m.mean().clamp(min=1e-6))
        return self._spread(out)

    def forward(self) -> list[torch.Tensor]:
        if self.training and not self.frozen:
            return self.sample()
        return self.final()

    @torch.no_grad()
    def sparsity(self) -> list[float]:
        """Fraction of entries the final mask drops (hard) or keeps below 0.5 (continuous), per tensor
        (0 for an unmasked tensor)."""
        return [0.0 if s is None else s for s in self._spread([float((z <= 0).float().mean()) for z in self._final_raw()])]


def mask_flags(names: list[str], exclude) -> list[bool]:
    """Which merged tensors get a mask: those matching no ``method.mask_exclude`` regex."""
    if exclude is None:
        exclude = []
    if not (isinstance(exclude, (list, tuple)) and all(isinstance(p, str) and p for p in exclude)):
        raise ConfigError(f"method.mask_exclude must be a list of regexes of merged tensor names, got {exclude!r}")
    for p in exclude:
        try:
            rx = re.compile(p)
        except re.error as e:
            raise ConfigError(f"method.mask_exclude: invalid regex {p!r} ({e})") from None
        if not any(rx.search(n) for n in names):
            raise ConfigError(f"method.mask_exclude: {p!r} matches no merged tensor (e.g. {names[0]!r})")
    flags = [not any(re.search(p, n) for p in exclude) for n in names]
    if not any(flags):
        raise ConfigError(f"method.mask_exclude {list(exclude)!r} excludes every merged tensor: nothing left to mask")
    return flags
