"""ModelPool: one pretrained model and the named experts fine-tuned from it.

Experts are read lazily, tensor by tensor, from
  (a) a Hugging Face ``save_pretrained`` directory (safetensors or .bin, sharded with an index),
  (b) a single ``.safetensors`` file holding a state dict, or
  (c) a PEFT LoRA adapter directory (task vector = scaling * B @ A on its target modules).
Every expert is validated against the base (adamerge/pool/validation.py: names, shapes, dtypes, finite values) and each problem
is reported with the expert and tensor at fault. An expert saved in another floating-point dtype than the
base (fp16 or bf16 fine-tunes of an fp32 base, or the reverse) is read in the base's dtype, its task vector
computed in float32; the log says once per expert what was cast.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import PoolError
from ..families import get_family
from . import validation
from .expert_files import BaseFiles, Expert, load_expert, lora_scaling, open_checkpoint, strip_prefixes
from .fingerprint import pool_fingerprint

log = logging.getLogger(__name__)



# ----------------------------------------------------------------------------------------------
# The pool
# ----------------------------------------------------------------------------------------------
@dataclass
class TaskSpec:
    """What a pool knows about one task: its expert, head, and data files."""

    name: str
    expert: str
    calibration: str | None = None
    test: str | None = None
    validation: str | None = None  # labelled, optional: chooses between the start and the end of training
    num_labels: int | None = None
    label_names: list[str] | None = None
    classes: list[str] | None = None  # LMs: label words scored after the prompt (none: exact match, first token)
    templates: list[str] | None = None  # clip_zero_shot: prompt templates of the zero-shot head ({} = class name)
    optimizer_state: str | None = None  # the expert's Adam exp_avg_sq (safetensors), for ota_merging's curvature
    # labelled, optional: texts carrying a backdoor's trigger, each labelled with the attacker's target class; the
    # share predicted as that class is the attack success rate (the evaluation table's ASR column) ...
    attack_test: str | None = None
    # ... and the same texts without the trigger, so labelled too: how often the target is predicted anyway
    attack_clean: str | None = None


class ModelPool:
    """The pretrained model (in memory, frozen) and lazily read experts, validated against it.

    Canonical tensor names are the base module's ``named_parameters()``. Experts saved with or
    without the model's ``base_model_prefix`` (e.g. ``bert.``) are aligned to them.
    """

    def __init__(
        self,
        base: str | Path,
        tasks: dict[str, TaskSpec],
        model_class: str = "sequence_classification",
        head_prefixes: list[str] | tuple[str, ...] = ("classifier.",),
        check_finite: bool = True,
        check_fine_tuned: bool | str = True,
        base_in_memory: bool = True,
    ):
        """``base_in_memory=False`` (a streamed merge): the base module is built on the meta device — names,
        shapes and dtypes only — and ``base_tensor`` reads each tensor from the base's files when asked."""
        if not tasks:
            raise PoolError("the pool has no tasks/experts")
        self.base_path = Path(base)
        if not self.base_path.exists():
            raise PoolError(f"base model {self.base_path}: path does not exist")
        self.model_class = model_class
        self.tasks = dict(tasks)
        self.head_prefixes = tuple(head_prefixes)
        self.fixed_heads: dict[str, dict[str, torch.Tensor]] = {}  # heads the family builds (not the experts')
        self.optional_names: set[str] = set()  # shared tensors an expert may lack (then the base's)
        self.ignored_prefixes: tuple[str, ...] = ()  # expert tensors outside the pool's model (not merged)
        self.family = get_family(model_class)
        # {pool key: how the config named the model there}, for models resolved elsewhere (adamerge/pool/hub.py):
        # {"pool.tasks.sst2.expert": "hf://org/name (commit ...)"}
        self.sources: dict[str, str] = {}
        self.base_in_memory = base_in_memory
        self.base_model: nn.Module = self.family.build_base(self)
        self.base_model.eval().requires_grad_(False)
        self._params = dict(self.base_model.named_parameters())
        prefix = getattr(self.base_model, "base_model_prefix", "") or ""
        self._prefix = prefix + "." if prefix else ""
        # base on meta: its tensors read from its files
        self.base_files = None if base_in_memory else BaseFiles(open_checkpoint(self.base_path), self.canonical_name)
        self._fingerprint: dict | None = None
        self._tokenizer: Any = None
        self.experts: dict[str, Expert] = {}
        for t in self.tasks.values():
            self.experts[t.name] = load_expert(t.name, t.expert)
        self.cast_dtypes: dict[str, dict[str, str]] = {}  # expert -> {stored dtype: base dtype} read across
        if check_fine_tuned not in (True, False, "warn"):
            raise PoolError(f"pool config key 'check_fine_tuned' must be true, false or warn, got {check_fine_tuned!r}")
        self._cosines: dict[str, list[tuple[float, str]]] = {}  # expert -> (cos(expert, base), tensor) of matrices
        self.check_finite, self.fine_tuned_check = check_finite, check_fine_tuned
        # base on meta (a streamed merge): names, shapes and dtypes checked now, values as each is first read
        self.deferred_values: set[tuple[str, str]] | None = None if base_in_memory else set()
        for e in self.experts.values():
            validation.validate_expert(self, e, check_finite)
        if base_in_memory:
            self.check_fine_tuned_experts()
        for name, casts in self.cast_dtypes.items():
            log.info("expert '%s' (%s): tensors stored as %s are read as the base's %s", name,
                     self.experts[name].path, ", ".join(casts), ", ".join(sorted(set(casts.values()))))
        self.family.check_pool(self)

    # -- names -----------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def is_head(self, name: str) -> bool:
        return any(name.startswith(h) for h in self.head_prefixes)

    def shared_names(self) -> list[str]:
        """Floating-point parameters of the shared backbone (candidates for merging)."""
        return [n for n, p in self._params.items() if not self.is_head(n) and p.is_floating_point()]

    def head_names(self) -> list[str]:
        return [n for n in self._params if self.is_head(n)]

    def base_tensor(self, name: str) -> torch.Tensor:
        """The base's value of one tensor: the module's, or read from the base's files (``base_in_memory=False``)."""
        p = self._params[name]
        return p.detach() if not p.is_meta else self.base_files.get(name, p.dtype)

    # -- validation ------------------------------------------------------------------------
    def canonical_name(self, file_name: str) -> str | None:
        """Map a name in an expert file to the base module's parameter name (or None)."""
        for cand in (file_name, self._prefix + file_name, strip_prefixes(file_name, (self._prefix,))):
            if cand in self._params:
                return cand
        return None

    def check_head_sizes(self) -> None:
        """Each task's num_labels (and label_names) must be its head's output size; otherwise it would
        train and export a model whose labels mean nothing."""
        names = self.head_names()
        if not names:
            return
        out_name = names[-1]
        for t in self.tasks.values():
            out = self._head_outputs(t.name)
            for key, n in (("num_labels", t.num_labels), ("label_names", len(t.label_names or []) or None)):
                if n is not None and n != out:
                    raise PoolError(
                        f"task '{t.name}': {key} gives {n} labels but its expert ({self.experts[t.name].path}) has "
                        f"{out} outputs ('{out_name}'); set num_labels: {out} (and {out} label_names) for this task "
                        "or give the expert fine-tuned for it"
                    )

    def _head_outputs(self, task: str) -> int | None:
        """The output size of the task's head (None without a head)."""
        names = self.head_names()
        if not names:
            return None
        # the head's output layer comes last (classifier.bias, out_proj.bias, score.weight)
        return self.head(task)[names[-1]].shape[0]

    def num_labels(self, task: str) -> int | None:
        """The task's number of classes: its ``num_labels``, else its head's output size."""
        n = self.tasks[task].num_labels
        if n is None and self.family.classifier_heads:
            n = self._head_outputs(task)
        return n

    def is_lora_module(self, e: Expert, canon: str) -> bool:
        return e.is_lora and not e.file_names[canon].startswith("base_model.model.")

    def check_fine_tuned_experts(self) -> None:
        """``check_fine_tuned`` on every expert (a pool that defers value checks: once its tensors were read)."""
        if self.fine_tuned_check:
            for e in self.experts.values():
                validation.check_fine_tuned(self, e, warn_only=self.fine_tuned_check == "warn")

    # -- access ----------------------------------------------------------------------------
    def _read(self, e: Expert, name: str) -> torch.Tensor:
        """Expert ``e``'s stored tensor ``name``; its values checked on this first read where they were deferred."""
        t = e.source.get(e.file_names[name])
        if self.deferred_values is not None and (e.name, name) in self.deferred_values:
            validation.check_values(self, e, name, t, self.check_finite, compare_shape=not self.is_head(name))
            self.deferred_values.discard((e.name, name))
        return t

    def expert_tensor(self, task: str, name: str) -> torch.Tensor:
        """The expert's full value of one tensor (base + its delta), read lazily."""
        e = self.experts[task]
        if name not in e.file_names:
            if (e.is_lora or name in self.optional_names) and name in self._params:
                return self.base_tensor(name)  # LoRA (or an expert without it) leaves this tensor untouched
            raise PoolError(f"expert '{task}' ({e.path}): missing tensor '{name}'")
        if self.is_lora_module(e, name):
            return self.base_tensor(name) + self._lora_delta(e, name).to(self._params[name].dtype)
        return self._read(e, name).to(self._params[name].dtype)  # another dtype: the base's

    def lora_factors(self, task: str, name: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A [r, in], B [out, r], scaling s) in fp32 with τ = s·B@A when ``task``'s expert is a LoRA adapter on
        tensor ``name``; None when that expert does not factor it (untouched, a full tensor, or not LoRA)."""
        e = self.experts[task]
        if name not in e.file_names or not self.is_lora_module(e, name):
            return None
        module = e.file_names[name]
        keys = e.source.keys()

        pre = f"base_model.model.{module}.lora_"
        embedding = any(k.startswith(pre + "embedding_") for k in keys)

        def find(ab: str) -> torch.Tensor:
            keyed = [f"{pre}embedding_{ab}", f"{pre}embedding_{ab}.default"] if embedding else \
                [f"{pre}{ab}.weight", f"{pre}{ab}.default.weight"]
            for k in keyed:
                if k in keys:
                    return e.source.get(k).float()
            raise PoolError(f"expert '{e.name}' ({e.path}): lora_{'embedding_' if embedding else ''}{ab} for "
                            f"'{module}' is missing")

        a, b = find("A"), find("B")
        _, scale = lora_scaling(e.lora, module)
        # an Embedding's delta is (B@A)ᵀ (A [r, vocab], B [dim, r]: peft's Embedding), as is a Conv1D's
        # (fan_in_fan_out); (B@A)ᵀ = Aᵀ@Bᵀ, so the factors swap and transpose
        if embedding or e.lora.get("fan_in_fan_out"):
            a, b = b.T, a.T
        ref = self._params[name]
        shape = (b.shape[0], a.shape[1]) if a.dim() == b.dim() == 2 and b.shape[1] == a.shape[0] \
            else f"B{tuple(b.shape)} @ A{tuple(a.shape)}"
        if shape != tuple(ref.shape):
            raise PoolError(
                f"expert '{e.name}' ({e.path}), tensor '{name}': LoRA delta shape {shape} does not "
                f"match the base's {tuple(ref.shape)} — the adapter was made for another base model"
            )
        return a, b, scale

    def _lora_delta(self, e: Expert, name: str) -> torch.Tensor:
        a, b, scale = self.lora_factors(e.name, name)
        return (b @ a) * scale

    def task_vector(self, task: str, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Expert minus base for one shared tensor; written into ``out`` when given (the same values)."""
        e = self.experts[task]
        if name in e.file_names and self.is_lora_module(e, name):
            tau = self._lora_delta(e, name).to(self._params[name].dtype)
        elif name in e.file_names:
            stored, base = self._read(e, name), self.base_tensor(name)
            if stored.dtype != base.dtype:  # in float32, then the base's dtype (bf16 − bf16 would round twice)
                tau = (stored.float() - base.float()).to(base.dtype)
            elif out is not None and out.dtype == base.dtype:  # no temporary: subtract into place
                return torch.sub(stored, base, out=out)
            else:
                tau = stored - base
        else:
            tau = self.expert_tensor(task, name) - self.base_tensor(name)
        return tau if out is None else out.copy_(tau)

    def head(self, task: str) -> dict[str, torch.Tensor]:
        """The per-task head tensors (never merged). Falls back to the base's head."""
        out = {}
        for n in self.head_names():
            e = self.experts[task]
            out[n] = self.expert_tensor(task, n) if n in e.file_names else self.base_tensor(n)
        return {**out, **self.fixed_heads.get(task, {})}

    def iter_expert_state(self, task: str) -> Iterator[tuple[str, torch.Tensor]]:
        fixed = self.fixed_heads.get(task, {})
        for n in self._params:
            yield n, fixed[n] if n in fixed else self.expert_tensor(task, n)

    def tokenizer(self) -> Any:
        """The base's tokenizer as the family loads it (None for image inputs), loaded once per pool."""
        if self._tokenizer is None:
            self._tokenizer = self.family.load_tokenizer(self)
        return self._tokenizer

    def fingerprint(self) -> dict:
        """What a checkpoint's coefficients were learned on (adamerge/pool/fingerprint.py), computed once per pool."""
        if self._fingerprint is None:
            self._fingerprint = pool_fingerprint(self)
        return copy.deepcopy(self._fingerprint)  # callers add their own keys
