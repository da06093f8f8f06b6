"""LoRA experts kept factorized allocate no dense weight per expert: a training step over 16 adapters writes out
as many weight-shaped tensors as over 2 (none with the adapters step, the merged weight and its gradient with the
merge step)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

import helpers
from adamerge.methods import get_method
from adamerge.pool.config import pool_from_config


# -- memory: no dense weight per expert ---------------------------------------------------------------
def write_lora_pool(tmp, k: int) -> dict:
    """A tiny BERT and ``k`` LoRA adapters (r=3 on query and value) written directly (no peft: fast)."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    BertForSequenceClassification(helpers.tiny_config(num_labels=2)).save_pretrained(tmp / "base")
    tasks = {}
    for i in range(k):
        g = torch.Generator().manual_seed(i)
        sd = {}
        for layer in range(2):
            for mod in ("query", "value"):
                pre = f"base_model.model.bert.encoder.layer.{layer}.attention.self.{mod}"
                sd[f"{pre}.lora_A.weight"] = torch.randn(3, 32, generator=g) * 0.1
                sd[f"{pre}.lora_B.weight"] = torch.randn(32, 3, generator=g) * 0.1
        d = tmp / f"e{i}"
        d.mkdir()
        save_file(sd, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 3, "lora_alpha": 6,
                                                          "target_modules": ["query", "value"]}))
        tasks[f"t{i}"] = {"expert": str(d), "num_labels": 2}
    return {"base": str(tmp / "base"), "model_class": "sequence_classification",
            "head_prefixes": ["classifier."], "tasks": tasks}


class CountShape(TorchDispatchMode):
    """Counts the tensors of one shape (a merged weight's) that ops allocate (views of a weight are not)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape and not func.is_view:
                self.count += 1
        return out


def weight_shaped_allocations(pool, mode: str, lora_step: str = "adapters") -> int:
    m = get_method("adamerging")(pool, {"name": "adamerging", "granularity": "layer"},
                                 {"lora": mode, "lora_step": lora_step})
    ids = torch.randint(1000, 3000, (3, 7), generator=torch.Generator().manual_seed(0))
    # the same two tasks' batches whatever K: what grows with K is the merge, not the forward passes
    batch = {t: {"input_ids": ids, "attention_mask": torch.ones_like(ids)} for t in pool.task_names[:2]}
    m.step_loss(batch)  # the first step allocates the reused buffers
    counter = CountShape(pool.base_tensor("bert.encoder.layer.0.attention.self.query.weight").shape)
    with counter:
        _, surrogate = m.step_loss(batch)
        surrogate.backward()
    assert m.merged.coefficients.raw.grad.abs().sum() > 0
    return counter.count


def test_factorized_step_allocates_no_dense_weight_per_expert(tmp_path):
    cfg = write_lora_pool(tmp_path, 16)
    many = pool_from_config(cfg)
    few = pool_from_config({**cfg, "tasks": dict(list(cfg["tasks"].items())[:2])})
    assert len(many.task_names) == 16
    counts = {k: weight_shaped_allocations(p, "factorized") for k, p in ((2, few), (16, many))}
    assert counts[16] == counts[2] == 0  # neither τ_k nor ∂L/∂W of a factorized weight is ever written out
    assert weight_shaped_allocations(many, "dense") > 0  # the counter sees the dense path's ∂L/∂W
    # merged from the factors once per step: the merged weight and its gradient, as many whatever K
    merged = {k: weight_shaped_allocations(p, "factorized", "merge") for k, p in ((2, few), (16, many))}
    assert 0 < merged[2] == merged[16]
