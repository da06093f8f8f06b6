"""Causal LMs: a tiny Llama pool (tied embeddings) merges with AdaMerging and exports for generate()."""

from __future__ import annotations

import json

import pytest
import torch
from torch.func import functional_call

import helpers
from adamerge.pool.config import pool_from_config
from adamerge.pool.model_pool import PoolError
from helpers import make_llama_pool


def test_causal_lm_adamerging_exports_a_generating_model(tmp_path):
    from transformers import AutoModelForCausalLM

    pool_cfg = make_llama_pool(tmp_path)
    out = tmp_path / "run"
    code = helpers.run_inprocess(["method=adamerging_layerwise", f"out_dir={out}", "trainer.max_steps=3",
                                  "data.batch_size=4", "method.lr=0.05", "trainer.log_every_n_steps=1"], pool_cfg)
    assert code == 0
    rep = json.loads((out / "export" / "coefficients.json").read_text())
    assert "model.embed_tokens.weight" in rep["tensors"] and "lm_head.weight" not in rep["tensors"]  # tied
    c = torch.tensor(rep["coefficients"])
    assert (c - 0.3).abs().max() > 0
    model = AutoModelForCausalLM.from_pretrained(str(out / "export" / "model")).eval()
    # the export equals the merged functional model (incl. the tied lm_head) ...
    pool = pool_from_config(pool_cfg)
    merged = {n: pool.base_tensor(n) + sum(float(c[i, k]) * pool.task_vector(t, n) for k, t in enumerate(pool.task_names))
              for i, n in enumerate(rep["tensors"])}
    ids = torch.randint(5, 30000, (2, 7))
    with torch.no_grad():
        ref = functional_call(pool.base_model, merged, args=(), kwargs={"input_ids": ids}).logits
        torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-4, rtol=1e-4)
        assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
        # ... and generates
        gen = model.generate(ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 12)


def test_causal_lm_entropy_masks_padding(tmp_path):
    from adamerge.methods import get_method

    pool = pool_from_config(make_llama_pool(tmp_path, k=1))
    m = get_method("adamerging")(pool, {"name": "adamerging", "granularity": "layer"}, {})
    ids = torch.randint(5, 30000, (1, 6))
    short = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    padded = {"input_ids": torch.cat([ids, torch.zeros(1, 4, dtype=ids.dtype)], 1),
              "attention_mask": torch.cat([torch.ones_like(ids), torch.zeros(1, 4, dtype=ids.dtype)], 1)}
    with torch.no_grad():
        a, b = m.task_loss("lm0", short), m.task_loss("lm0", padded)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_vocabulary_size_mismatch_is_a_clear_error(tmp_path):
    cfg = make_llama_pool(tmp_path / "a", k=1)
    other = make_llama_pool(tmp_path / "b", k=1, vocab=30600)
    cfg["tasks"]["lm0"]["expert"] = other["tasks"]["lm0"]["expert"]
    with pytest.raises(PoolError, match=r"expert 'lm0'.*embed_tokens.weight.*vocabulary size differs: expert 30600 vs base 30522"):
        pool_from_config(cfg)


def test_untied_causal_lm_merges_embedding_rows_and_whole_lm_head(tmp_path):
    """Untied input embedding: merged on the looked-up rows only; lm_head (every row used) whole; the
    training step's coefficient gradient equals the dense merge's, padding masked."""
    from adamerge.methods import get_method

    pool = pool_from_config(make_llama_pool(tmp_path, k=2, tie=False))
    m = get_method("adamerging")(pool, {"name": "adamerging", "granularity": "layer"}, {})
    mm = m.merged
    assert mm.lookup_name == "model.embed_tokens.weight" and "lm_head.weight" in mm.names
    with torch.no_grad():
        mm.coefficients.raw.uniform_(0, 1)
    ids = torch.randint(5, 30000, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    batch = {t: {"input_ids": ids + i, "attention_mask": mask} for i, t in enumerate(pool.task_names)}
    g1 = helpers.step_gradient_matches_dense(m, batch)
    assert g1[mm.names.index("model.embed_tokens.weight")].abs().sum() > 0
