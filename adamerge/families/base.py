"""What a model family decides, behind one interface (``ModelFamily``), and the registry by ``model_class``.

A family says how the pool's base module is built, how a task's data files are read and turned into
model inputs, which logits the objectives see, how a task is evaluated and what the export's model
card says. The pool holds its family (``pool.family``); everything else asks it instead of testing
``model_class``. ``model_class: auto`` is this base class: a plain ``AutoModel``, trained on
calibration text, not evaluated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import PoolError
from ..run.data import encode, load_tokenizer, read_jsonl

FAMILIES: dict[str, ModelFamily] = {}


def register_family(cls: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator: one instance of the family filed under its ``name`` (the pool's ``model_class``)."""
    FAMILIES[cls.name] = cls()
    return cls


def get_family(model_class: str) -> ModelFamily:
    if model_class not in FAMILIES:
        raise PoolError(f"unknown model_class '{model_class}'; choose one of {sorted(FAMILIES)}")
    return FAMILIES[model_class]


def build_model(auto_class: str, path: str | Path, meta: bool = False, **kwargs) -> nn.Module:
    """``<auto_class>.from_pretrained(path)`` (offline), or a PoolError naming the directory. ``meta``: the
    architecture alone, on the meta device, in the config's dtype (as ``from_pretrained`` would load it)."""
    import transformers

    cls = getattr(transformers, auto_class)
    try:
        if meta:
            kwargs.pop("ignore_mismatched_sizes", None)
            config = transformers.AutoConfig.from_pretrained(str(path), **kwargs)
            with torch.device("meta"):
                return cls.from_config(config, dtype=config.dtype)
        return cls.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as e:
        raise PoolError(f"base model {path}: cannot be loaded with {cls.__name__}.from_pretrained ({e})") from e


def check_names(key: str, names: object, what: str) -> list[str]:
    """``names`` (a task's ``classes``: label words or class names) as a list of two or more distinct
    non-empty strings (ignoring surrounding spaces), or a PoolError naming ``key``."""
    if (not isinstance(names, (list, tuple)) or len(names) < 2
            or not all(isinstance(c, str) and c.strip() for c in names)):
        raise PoolError(f"{key} must be a list of two or more {what} (non-empty strings), got {names!r}")
    if len({c.strip() for c in names}) != len(names):
        raise PoolError(f"{key}: {what} must differ (ignoring surrounding spaces), got {list(names)!r}")
    return list(names)


class ModelFamily:
    name = "auto"
    auto_class = "AutoModel"  # the transformers class of the base and of the exported model
    evaluated = False         # tasks have a per-task accuracy (their test/validation files carry answers)
    task_models = False       # the export writes tasks/<task>/ (a from_pretrained model per task)
    classifier_heads = False  # each task's head is a classifier: its output size is the task's class count,
                              # and labelled examples can be scored by cross-entropy (FW-Merging's objective)
    hidden_states = True      # the forward the objectives see returns hidden states to align (Expert Merging)
    backbone_export = False   # export/model is the backbone alone (the heads, per task, are in heads/ and tasks/)
    streams = True            # a data-free merge may stream (adamerge/streaming.py): the base built on the meta device

    # -- the pool ------------------------------------------------------------------------------
    def build_base(self, pool) -> nn.Module:
        """The pool's frozen base module (may also set the pool's family-built heads)."""
        return build_model(self.auto_class, pool.base_path, meta=not pool.base_in_memory)

    def check_pool(self, pool) -> None:
        """Checks that need the experts loaded (e.g. head sizes); raise PoolError."""

    def check_classes(self, task: str, classes) -> list[str] | None:
        """The task's ``classes`` pool key, checked (label words or class names where a family uses them)."""
        if classes is not None:
            raise PoolError(f"pool.tasks.{task}.classes: label words apply to causal_lm and seq2seq_lm pools only "
                            f"(class names: clip_zero_shot); a {self.name} task has num_labels (and label_names) "
                            "instead")
        return None

    def check_templates(self, task: str, templates) -> list[str] | None:
        if templates is not None:
            raise PoolError(f"pool.tasks.{task}.templates: zero-shot prompt templates apply to clip_zero_shot pools "
                            f"only; remove the key from this {self.name} task")
        return None

    # -- data ----------------------------------------------------------------------------------
    def read_split(self, pool, task: str, split: str, path: str, need_labels: bool,
                   tokenizer=None) -> tuple[list, list]:
        """The inputs (texts; image paths) and, with ``need_labels``, the answers of one data file."""
        return read_jsonl(path, task, need_labels=need_labels,
                          num_labels=pool.num_labels(task) if need_labels else None, key=split)

    def check_data(self, pool) -> Any:
        """Family checks before the data files are read; returns the tokenizer answers are checked with (or None)."""
        return None

    def load_tokenizer(self, pool) -> Any:
        """The tokenizer of the base's text inputs (None: the family's inputs are not text); ``ModelPool.tokenizer``
        keeps the one every reader of the pool shares."""
        return load_tokenizer(pool.base_path)

    def encode(self, pool, items: list, tokenizer, max_length: int) -> dict[str, torch.Tensor]:
        """Calibration inputs (``read_split``'s first list) as model inputs, padded to ``max_length``."""
        return encode(tokenizer, items, max_length)

    # -- the objectives' view of an output -------------------------------------------------------
    def model_inputs(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The forward's keyword arguments for a calibration batch."""
        return dict(inputs)

    def logits(self, out, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, mask of the positions that count, or None) of a forward's output."""
        return out.logits, None

    # -- evaluation and export --------------------------------------------------------------------
    def load_test_sets(self, pool, tokenizer, max_length: int, max_examples: int | None, split: str,
                       max_new_tokens: int) -> dict:
        """{task: test set} of each task with a labelled ``split`` file; each test set has ``accuracy``."""
        return {}

    def saves_tokenizer(self) -> bool:
        return True

    def exported_module(self, model: nn.Module) -> nn.Module:
        """The module export/model is (its tensors' names, config and class): the backbone alone with
        ``backbone_export``, else the pool's model."""
        return model.base_model if self.backbone_export else model

    def save_extra_files(self, model: nn.Module, model_dir: Path) -> None:
        """What export/model needs beside its weights and config (CLIP: the image processor)."""

    def how_to_load(self, pool) -> list[str]:
        """The model card's "How to load" lines."""
        c = self.auto_class
        return ["```python", f"from transformers import {c}", f'model = {c}.from_pretrained("export/model")', "```"]


register_family(ModelFamily)
