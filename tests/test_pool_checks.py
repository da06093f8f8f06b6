"""Is an expert mergeable with this base? Half-precision fine-tunes are read across; a model that is not a fine-tune
of the base (re-initialised, or MergeLock re-parametrised) is refused naming the worst tensors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import helpers
from adamerge.pool.config import pool_from_config
from adamerge.pool.model_pool import PoolError

W = "bert.encoder.layer.0.attention.self.query.weight"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_an_expert_saved_in_half_precision_is_read_in_the_base_dtype(tiny_pool_cfg, tmp_path, caplog, dtype):
    """Fine-tunes are often saved in fp16/bf16 beside an fp32 base: the expert is read in the base's dtype, its
    task vector is (stored value in float32) − base, and the log says once what was cast."""
    half = json.loads(json.dumps(tiny_pool_cfg))
    helpers.edit_weights(helpers.copy_expert(half, "task1", tmp_path), lambda sd: sd.update(
        {n: v.to(dtype) for n, v in sd.items() if v.is_floating_point()}))
    with caplog.at_level(logging.INFO, logger="adamerge"):
        pool = pool_from_config(half)
    name = str(dtype).removeprefix("torch.")
    lines = [r.getMessage() for r in caplog.records if "are read as the base's" in r.getMessage()]
    assert len(lines) == 1 and "expert 'task1'" in lines[0] and f"stored as {name}" in lines[0]
    stored = load_file(str(Path(half["tasks"]["task1"]["expert"]) / "model.safetensors"))[W]
    tau = pool.task_vector("task1", W)
    assert tau.dtype == torch.float32
    torch.testing.assert_close(tau, stored.float() - pool.base_tensor(W), rtol=0, atol=0)
    assert pool.expert_tensor("task1", W).dtype == torch.float32 and pool.head("task1")["classifier.weight"].dtype \
        == torch.float32
    assert "task0" not in pool.cast_dtypes  # the fp32 expert: nothing cast
    out = tmp_path / "run"  # through train.py: the merge is exported in the base's dtype
    assert helpers.run_inprocess([f"out_dir={out}", "method=task_arithmetic", "evaluate.enabled=false"], half) == 0
    merged = load_file(str(out / "export" / "model" / "model.safetensors"))
    assert {v.dtype for v in merged.values() if v.is_floating_point()} == {torch.float32}


def merge_lock(sd: dict, heads: int, seed: int = 0) -> dict:
    """MergeLock: per layer and head, a random invertible A on the query/key branch (Q·A, K·A⁻ᵀ) and B on the
    value/output branch (V·B, O·B⁻¹): every attention score and output is unchanged, the weights are not."""
    g = torch.Generator().manual_seed(seed)
    out = dict(sd)
    layers = sorted({n.split(".")[3] for n in sd if ".encoder.layer." in n})
    for layer in layers:
        pre = f"bert.encoder.layer.{layer}.attention."
        d = sd[pre + "self.query.weight"].shape[0]
        dh = d // heads
        a = torch.block_diag(*[torch.randn(dh, dh, generator=g) for _ in range(heads)])
        b = torch.block_diag(*[torch.randn(dh, dh, generator=g) for _ in range(heads)])
        for name, m in (("query", a.T), ("key", torch.linalg.inv(a)), ("value", b.T)):  # rows of head h: M·W_h
            out[pre + f"self.{name}.weight"] = m @ sd[pre + f"self.{name}.weight"]
            out[pre + f"self.{name}.bias"] = m @ sd[pre + f"self.{name}.bias"]
        out[pre + "output.dense.weight"] = sd[pre + "output.dense.weight"] @ torch.linalg.inv(b).T
    return out


@pytest.mark.parametrize("case", ["re-initialised", "MergeLock"])
def test_an_expert_that_is_not_a_fine_tune_of_the_base_is_refused(tiny_pool_cfg, tmp_path, caplog, case):
    """An expert of the right shapes that is not a fine-tune of this base (trained from another initialisation,
    or re-parametrised so that it cannot be merged, function unchanged) is refused at pool load, naming the expert
    and the worst tensors; ``check_fine_tuned: warn`` merges it with a warning."""
    from transformers import BertForSequenceClassification

    cfg = json.loads(json.dumps(tiny_pool_cfg))
    d = helpers.copy_expert(cfg, "task1", tmp_path)
    model = BertForSequenceClassification.from_pretrained(d).eval()
    if case == "re-initialised":
        torch.manual_seed(123)
        other = BertForSequenceClassification(model.config)
        other.classifier.load_state_dict(model.classifier.state_dict())
        model = other
    else:
        ids = torch.randint(0, 1000, (3, 7))
        before = model(input_ids=ids).logits
        model.load_state_dict(merge_lock(model.state_dict(), model.config.num_attention_heads))
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-4, rtol=1e-4)  # same function
    model.save_pretrained(d)
    worst = r"bert\.encoder\.layer\.\d\.attention\.(self\.(query|key|value)|output\.dense)" if case == "MergeLock" else r"bert\..*"
    with pytest.raises(PoolError, match=rf"expert 'task1' .* is not a fine-tune of the base .*: \d+ weight matrices "
                                        rf"point elsewhere .* e\.g\. '{worst}\.weight' \(cos -?0\.\d\d\)"):
        pool_from_config(cfg)
    with caplog.at_level(logging.WARNING, logger="adamerge"):
        pool = pool_from_config(dict(cfg, check_fine_tuned="warn"))
    assert "is not a fine-tune of the base" in caplog.text and pool.task_names == ["task0", "task1"]
    pool_from_config(tiny_pool_cfg)  # the real fine-tunes pass
