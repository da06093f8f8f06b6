"""``model_class: sequence_classification``: text classifiers (``AutoModelForSequenceClassification``).

Each task's head is its expert's own (the pool's ``head_prefixes``, kept per task, not merged); data
files are JSON lines of ``{"text": ..., "label": int}``; evaluation is top-1 accuracy through the
task's head; the export adds ``tasks/<task>/``, the merged backbone with that task's head.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call

from ..evaluate import accuracy
from ..run.data import encode, labelled_splits
from .base import ModelFamily, build_model, register_family


class ClassifierTestSet(NamedTuple):
    """One task's labelled texts, tokenized; shortest first (batches of similar lengths carry little padding)."""

    encoded: dict[str, torch.Tensor]
    labels: torch.Tensor
    num_classes: int

    def __len__(self) -> int:
        return len(self.labels)

    def shard(self, rank: int, world: int) -> ClassifierTestSet:
        """Examples rank, rank + world, … (one DDP process's share)."""
        return ClassifierTestSet({k: v[rank::world] for k, v in self.encoded.items()}, self.labels[rank::world],
                                 self.num_classes)

    def accuracy(self, base: nn.Module, params: dict[str, torch.Tensor], batch_size: int = 64) -> float:
        device = next(base.parameters()).device
        return accuracy(lambda b: functional_call(base, params, args=(), kwargs=b).logits,
                        self.encoded, self.labels, self.num_classes, batch_size, device)


@register_family
class SequenceClassification(ModelFamily):
    name = "sequence_classification"
    auto_class = "AutoModelForSequenceClassification"
    evaluated = True
    task_models = True  # the export writes tasks/<task>/: backbone + that task's head, from_pretrained as is
    classifier_heads = True
    backbone_export = True  # no head in export/model that a user could mistake for a task's

    def build_base(self, pool) -> nn.Module:
        nl = [t.num_labels for t in pool.tasks.values() if t.num_labels]
        # the base's own head is only a fallback; a wrong size must reach the per-task head check
        kwargs = dict(num_labels=nl[0], ignore_mismatched_sizes=True) if nl else {}
        return build_model(self.auto_class, pool.base_path, meta=not pool.base_in_memory, **kwargs)

    def check_pool(self, pool) -> None:
        pool.check_head_sizes()

    def load_test_sets(self, pool, tokenizer, max_length: int, max_examples: int | None, split: str,
                       max_new_tokens: int) -> dict[str, ClassifierTestSet]:
        out = {}
        for name, texts, labels in labelled_splits(pool, split, max_examples):
            n_cls = pool.num_labels(name) or (max(labels) + 1)
            enc, y = encode(tokenizer, texts, max_length), torch.tensor(labels)
            order = torch.argsort(enc["attention_mask"].sum(1), stable=True)  # accuracy ignores the order
            out[name] = ClassifierTestSet({k: v[order] for k, v in enc.items()}, y[order], n_cls)
        return out

    def how_to_load(self, pool) -> list[str]:
        task = pool.task_names[0]
        return ["Each task's model (merged backbone, that task's head and labels):", "", "```python",
                "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
                f'model = AutoModelForSequenceClassification.from_pretrained("export/tasks/{task}")',
                f'tokenizer = AutoTokenizer.from_pretrained("export/tasks/{task}")', "```", "",
                "`model/` is the merged backbone alone (`AutoModel`; from a sentence-transformers base also "
                "`SentenceTransformer(\"export/model\")`): use `tasks/<task>/` to classify."]
