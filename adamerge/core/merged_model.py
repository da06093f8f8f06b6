"""MergedModel: frozen base + TaskVectors + one coefficient module (+ mask, + fixed offset).

``W = W0 [+ D] + [mask ⊙] Σ_k c_k τ_k`` per merged tensor, evaluated with ``torch.func.functional_call``
so only the coefficients (and mask) are trainable and the base module is never copied. The sum is
the custom autograd kernel of adamerge/core/combine.py. The training step merges into buffers kept across steps, and the input embedding table only on the
rows its batches look up (``merged_params(reuse_buffers=True, rows=...)``). LoRA experts' weights kept
factorized (``task_vectors.factors``, adamerge/core/lora_factors.py) are merged there from their factors or
run as the multi-adapter forward (``low_rank``), per ``lora_step``; evaluation and export write them out.
With ``task_vectors.shard=true`` (DDP) the task vectors become this process's slices (``shard``,
adamerge/core/sharded.py): the step merges its slices and all-gathers them (``sharded_params``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator

import torch
from torch import nn
from torch.func import functional_call

from ..errors import ConfigError
from .coefficients import Coefficients
from .combine import Combine, combine
from .concrete_mask import ConcreteMask
from .lookup_table import looked_up_rows, lookup_table, sparse_grad
from .sharded import ShardedTaskVectors
from .task_vectors import TaskVectors


def tied_sources(module: nn.Module) -> dict[str, str]:
    """Every parameter name of ``module`` -> the first name of the same parameter: tied weights (e.g. lm_head =
    embed_tokens) follow the tensor they are tied to."""
    first: dict[int, str] = {}
    return {n: first.setdefault(id(p), n) for n, p in module.named_parameters(remove_duplicate=False)}


class MergedModel(nn.Module):
    """Frozen base module + task vectors + coefficients (+ optional shared Concrete mask).

    W = W0 + offset + Σ_k c_k τ_k per merged tensor. A closed-form merge has no learned part
    (``task_vectors`` and ``coefficients`` None): W = W0 + D, with D its merged update as ``offset``.

    The base module and the task vectors are held outside the module tree so that the
    LightningModule's ``state_dict`` (and so every checkpoint) holds only what trains. ``_apply``
    forwards device moves to them: the Trainer places the base; task vectors follow the model
    unless ``tv_device`` pins them (e.g. ``cpu`` to keep accelerator memory flat in K).
    """

    def __init__(
        self,
        base: nn.Module,
        task_vectors: TaskVectors | None,
        coefficients: Coefficients | None,
        heads: dict[str, dict[str, torch.Tensor]] | None = None,
        mask: ConcreteMask | None = None,
        tv_device: str | None = None,
        offset: dict[str, torch.Tensor] | None = None,
        lora_step: str = "auto",
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
        if task_vectors is None:
            if not offset or coefficients is not None:
                raise ValueError("a MergedModel without task vectors is W0 + offset: give the offset, no coefficients")
            self.names = list(offset)
        elif coefficients is None:
            raise ValueError("task vectors need coefficients")
        else:
            self.names = task_vectors.names
        if task_vectors is not None and (coefficients.L != len(self.names) or coefficients.K != task_vectors.K):
            raise ValueError(
                f"coefficients are [{coefficients.L} tensors x {coefficients.K} tasks] but the task vectors are "
                f"[{len(self.names)} x {task_vectors.K}]"
            )
        self._base_params = dict(base.named_parameters())
        missing = [n for n in self.names if n not in self._base_params]
        if missing:
            raise ValueError(f"task vector tensor '{missing[0]}' is not a parameter of the base model")
        # a slice's every entry is merged each step: no row-sparse lookup table when sharded
        self.lookup_name = None if isinstance(task_vectors, ShardedTaskVectors) else lookup_table(base, self.names)
        factors = task_vectors.factors if task_vectors is not None else None
        self.factored_names = [n for n in self.names if factors is not None and n in factors]
        self.lora_step = lora_step  # how a training step runs the factorized weights (adamerge/core/lora_factors.py)
        self._out: dict[str, torch.Tensor] = {}  # merged weights of the training step, reused across steps
        self._dirty: dict[str, torch.Tensor] = {}  # rows of a lookup table's buffer that hold a merged value
        self._kept: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []  # sharded: merges gathered after training
        self.kept_only = False  # sharded, after training: merges not in ``_kept`` are refused (no collective)

    # -- placement --------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.base._apply(fn, recurse)
        self._base_params = dict(self.base.named_parameters())
        self._out, self._dirty = {}, {}
        self._kept = [(key, {n: fn(v) for n, v in m.items()}) for key, m in self._kept]
        object.__setattr__(self, "heads", {t: {n: fn(v) for n, v in h.items()} for t, h in self.heads.items()})
        object.__setattr__(self, "offset", {n: fn(v) for n, v in self.offset.items()})
        if self.tv_device is None and self.task_vectors is not None:
            tv = self.task_vectors
            # follow the model's device but keep the task vectors' storage dtype
            moved = tv.map(lambda n, t: fn(t).to(dtype=t.dtype))
            if tv.factors is not None:
                moved.factors = tv.factors.map(lambda t: fn(t).to(dtype=t.dtype))
            object.__setattr__(self, "task_vectors", moved)
        return self

    @property
    def device(self) -> torch.device:
        if self.coefficients is None:
            return self._base_params[self.names[0]].device
        return self.coefficients.raw.device

    @property
    def task_names(self) -> list[str]:
        """The combined task vectors' names (none for a closed-form merge: W0 + offset only)."""
        return self.task_vectors.task_names if self.task_vectors is not None else []

    # -- merging ----------------------------------------------------------------------------
    def _deltas(self):
        """(name, Σ_k c_k τ_k) per merged tensor (mask applied), one at a time; a scalar 0 without task vectors."""
        if self.task_vectors is None:
            for n in self.names:
                yield n, torch.zeros((), device=self._base_params[n].device)
            return
        coefs = self.coefficients()
        masks = self.mask() if self.mask is not None else None
        factors = self.task_vectors.factors
        for i, n in enumerate(self.names):
            w0 = self._base_params[n]
            if factors is not None and n in factors:  # written out one tensor at a time
                yield n, factors.delta(n, coefs[i], w0.device)
                continue
            size = self.coefficients.chunk_sizes[i] if self.coefficients.chunk_sizes else 0
            d = combine(coefs[i], self.task_vectors[n], w0.device, size)
            yield n, (masks[i] * d if masks is not None and masks[i] is not None else d)

    def deltas(self) -> dict[str, torch.Tensor]:
        """Σ_k c_k τ_k per merged tensor (mask applied), differentiable in the trainable parts."""
        return dict(self._deltas())

    @torch.no_grad()
    def expert_params(self, k: int, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Expert ``k``'s weights W0 + offset + τ_k for the merged tensors ``names`` (default all), in the
        base's dtype: what task vector k was taken from (with a starting merge, τ_k is held relative to it)."""
        out = {}
        factors = self.task_vectors.factors
        for n in self.names if names is None else names:
            w0 = self._base_params[n]
            if factors is not None and n in factors:
                out[n] = w0 + factors.expert_delta(n, k, w0.device).to(w0.dtype)
                continue
            d = self.task_vectors[n][k].to(w0.device, torch.float32 if n in self.offset else w0.dtype)
            out[n] = w0 + (d + self.offset[n] if n in self.offset else d).to(w0.dtype)
        return out

    def merged_params(self, reuse_buffers: bool = False, rows: torch.Tensor | None = None,
                      adapters: Collection[str] = ()) -> dict[str, torch.Tensor]:
        """Merged values of every merged tensor, in the base's dtype (``merged_tensors``, as one dict).
        ``reuse_buffers`` (the training step): into buffers kept across calls, valid until the next such call.
        ``rows`` (with it): the token ids this step looks up; the input embedding table (``lookup_name``) is merged
        on those rows only (the others hold the base value), exact for a lookup. ``adapters`` (with it): factorized
        LoRA weights left out for ``low_rank``; the others are merged from their factors (``lora_step``)."""
        if self.sharded:
            return self.gathered_merge()
        if not reuse_buffers or self.task_vectors is None or self.mask is not None:
            return dict(self.merged_tensors())
        coefs = self.coefficients()
        factors = self.task_vectors.factors
        out = {}
        for i, n in enumerate(self.names):
            w0 = self._base_params[n]
            adds = (w0, self.offset[n]) if n in self.offset else (w0,)
            if factors is not None and n in factors:
                if n not in adapters:  # W0 + B diag(c·s) A, a fresh tensor: ∂L/∂c through autograd
                    out[n] = sum(a.to(w0.dtype) for a in adds) + factors.delta(n, coefs[i], w0.device).to(w0.dtype)
                continue
            size = self.coefficients.chunk_sizes[i] if self.coefficients.chunk_sizes else 0
            r = rows if n == self.lookup_name and not size else None
            buf = self._out.get(n)
            if buf is None:
                buf = self._out[n] = sum(a.detach().to(w0.dtype) for a in adds).contiguous()
            with torch.no_grad():
                prev = self._dirty.pop(n, None)
                if prev is not None:  # put back the base value of rows a previous step merged
                    buf.index_copy_(0, prev, sum(a.index_select(0, prev).to(w0.dtype) for a in adds))
            if r is not None:
                self._dirty[n] = r
            # a fresh alias each step: the buffer itself never carries an autograd history
            out[n] = Combine.apply(coefs[i], self.task_vectors[n], w0.device, size, adds, buf.detach(), r)
        return out

    def merged_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, merged value in the base's dtype) one tensor at a time, so an export never holds the merged model.
        Sharded: the merge gathered from every process, or after training one kept by ``keep_merges`` (whole)."""
        if self.sharded:
            yield from self.gathered_merge().items()
            return
        self._out, self._dirty = {}, {}  # evaluation/export: the training step's buffers may go
        for n, d in self._deltas():
            w0 = self._base_params[n]
            yield n, w0 + (d + self.offset[n] if n in self.offset else d).to(w0.dtype)

    # -- sharded task vectors (task_vectors.shard=true, adamerge/core/sharded.py) ----------------------
    @property
    def sharded(self) -> bool:
        return isinstance(self.task_vectors, ShardedTaskVectors)

    def shard(self, rank: int, world: int) -> None:
        """Keep only this process's slice of every task vector. The row-sparse lookup table is off: a
        slice's every entry is merged each step."""
        if self.mask is not None or self.coefficients.chunk_sizes or self.task_vectors.factors is not None:
            raise ConfigError("sharded task vectors need task-/layer-wise coefficients, no mask and dense task vectors")
        object.__setattr__(self, "task_vectors", ShardedTaskVectors.from_full(self.task_vectors, rank, world))
        self.lookup_name, self._out, self._dirty = None, {}, {}

    def sharded_params(self, cache: dict | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(this process's merged slices, differentiable in the coefficients; the full merged tensors
        all-gathered, detached, in buffers reused across calls unless ``cache``). A collective."""
        adds = {n: (self._base_params[n], self.offset[n]) if n in self.offset else (self._base_params[n],)
                for n in self.names}
        return self.task_vectors.merge(self.coefficients(), adds, self._out if cache is None else cache)

    def state_key(self) -> torch.Tensor:
        """What trains, flattened: the key of a merge kept after sharded training."""
        return torch.cat([p.detach().float().flatten().cpu() for p in self.parameters()])

    @torch.no_grad()
    def gathered_merge(self) -> dict[str, torch.Tensor]:
        """Sharded: a merge kept after training (``keep_merges``), or gathered now (a collective)."""
        key = self.state_key()
        for k, merged in self._kept:
            if torch.equal(k, key):
                return dict(merged)
        if self.kept_only:
            raise RuntimeError("sharded task vectors: only the merges gathered after training can be evaluated")
        return self.sharded_params(cache={})[1]  # fresh buffers: the result is the caller's

    def keep_merges(self, keys: list[torch.Tensor], coefs: list[list[torch.Tensor]]) -> None:
        """Sharded, after training (a collective): the merges at these states (``keys``, their coefficients
        ``coefs``) gathered to the first process, which keeps them for evaluation and export once the others have
        left; the task vectors and the step's buffers are released (adamerge/core/sharded.py)."""
        self._out, self._dirty = {}, {}
        adds = {n: (self._base_params[n], self.offset[n]) if n in self.offset else (self._base_params[n],)
                for n in self.names}
        self._kept = list(zip(keys, self.task_vectors.merges_to_first(coefs, adds)))
        self.kept_only = True

    def via_adapters(self, tokens: int | None) -> list[str]:
        """The factorized LoRA weights a training step over ``tokens`` input rows runs as the multi-adapter
        forward (``low_rank``); the others it merges from their factors (``merged_params``)."""
        factors = self.task_vectors.factors if self.task_vectors is not None else None
        return factors.via_adapters(self.lora_step, tokens) if factors is not None else []

    def factor_coefficients(self, names: list[str]) -> torch.Tensor | None:
        """``[F, K]``: the coefficients of the factorized LoRA weights ``names``, differentiable; None without."""
        if not names:
            return None
        coefs, index = self.coefficients(), {n: i for i, n in enumerate(self.names)}
        return torch.stack([coefs[index[n]] for n in names])

    def low_rank(self, coefs: torch.Tensor | None, names: list[str]):
        """While active, the Linear of each factorized LoRA weight in ``names`` adds Σ_k c_k s_k (x A_kᵀ) B_kᵀ to its
        output with c = ``coefs`` (``[F, K]``, as ``factor_coefficients(names)``): W0 + Σ_k c_k τ_k without τ."""
        if coefs is None:
            return contextlib.nullcontext()
        return self.task_vectors.factors.hooks(self.base, dict(zip(names, coefs.unbind(0))))

    def sparse_lookup_grad(self, rows: torch.Tensor | None):
        """While active, the lookup table's ∂L/∂W is sparse (adamerge/core/lookup_table.py); a no-op without ``rows``."""
        return sparse_grad(self.base if self.lookup_name and rows is not None else None)

    def lookup_rows(self, inputs: list[dict[str, torch.Tensor]]) -> torch.Tensor | None:
        """The token ids these batches look up in the merged input embedding table (None: all rows)."""
        if self.lookup_name is None:
            return None
        return looked_up_rows(inputs, self._base_params[self.lookup_name].device)

    def forward(self, task: str | None = None, params: dict[str, torch.Tensor] | None = None, **inputs):
        """Run the base module with merged weights (``params``, default: merge now) and ``task``'s head."""
        params = self.merged_params() if params is None else params
        head = self.heads.get(task, {}) if task is not None else {}
        return functional_call(self.base, {**params, **head} if head else params, args=(), kwargs=inputs)

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The base's full state dict with merged weights (heads as in the base), on CPU."""
        was = self.training
        self.eval()
        merged = self.merged_params()
        self.train(was)
        alias = tied_sources(self.base)  # tied weights appear under several names: follow the merge
        return {n: merged.get(alias.get(n, n), v).detach().cpu().clone() for n, v in self.base.state_dict().items()}
