"""Expert Merging / Expert Merging++: loss, chunk allocation, train.py runs (BERT and causal LM), resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import helpers
from adamerge.methods import CheckpointError, get_method
from adamerge.methods.expert_merging_pp import allocate_chunks, layer_importance
from adamerge.pool.config import pool_from_config
from adamerge.run.datamodule import CalibrationDataModule

# the authors' data regime (5–10 samples per task, batch 1); accumulation 2 keeps runs short
FAST = ["data.calibration_size=8", "data.batch_size=1", "data.max_length=16", "evaluate.enabled=false",
        "method.accumulate_grad_batches=2", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false"]


def em_cfg(**kw) -> dict:
    cfg = {"name": "expert_merging", "id": "expert_merging", "init": 0.1, "hidden_layers": [1, -1]}
    cfg.update(kw)
    return cfg


def calibration_loss(method, pool, n_steps: int = 4) -> float:
    """Summed objective (task terms, no regularizer) over fixed batches of the calibration data."""
    dm = CalibrationDataModule.from_pool(pool, batch_size=2, max_length=16, size=8)
    it = iter(dm.train_dataloader())
    with torch.no_grad():
        return sum(float(method.task_loss(t, x)) for _ in range(n_steps) for t, x in next(it).items())


def load_ckpt(method, run_dir: Path):
    sd = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    method.load_state_dict(sd)
    return method


# -- the loss ----------------------------------------------------------------------------------
def test_loss_zero_when_merged_equals_expert(tiny_pool_cfg):
    cfg = dict(tiny_pool_cfg, tasks={"task0": tiny_pool_cfg["tasks"]["task0"]})
    pool = pool_from_config(cfg)
    m = get_method("expert_merging")(pool, em_cfg())
    # the teacher is the expert itself
    params = m.expert_params("task0")
    for n in list(params)[:5]:
        torch.testing.assert_close(params[n], pool.expert_tensor("task0", n))
    batch = next(iter(CalibrationDataModule.from_pool(pool, batch_size=4, max_length=16).train_dataloader()))
    value, _ = m.step_loss(batch)
    assert value > 1e-4  # α = 0.1: merged = base + 0.1·τ ≠ expert
    assert float(m.regularizer().detach()) == 0.0  # σ(w) at its init
    with torch.no_grad():
        m.merged.coefficients.raw.fill_(40.0)  # σ(40) == 1.0 in float32: merged == expert
    value, surrogate = m.step_loss(batch)
    assert float(value) == pytest.approx(0.0, abs=1e-7)
    assert float(m.regularizer().detach()) > 0  # pulled back toward α̅


def test_config_errors(tiny_pool_cfg):
    pool = pool_from_config(tiny_pool_cfg)
    with pytest.raises(ValueError, match="init"):
        get_method("expert_merging")(pool, em_cfg(init=1.5))
    with pytest.raises(ValueError, match="loss_weights"):
        get_method("expert_merging")(pool, em_cfg(loss_weights={"nope": 2.0}))
    with pytest.raises(ValueError, match="ties"):
        get_method("expert_merging")(pool, em_cfg(ties={"density": 0.2}))
    with pytest.raises(ValueError, match="first_pass"):
        get_method("expert_merging_pp")(pool, em_cfg(name="expert_merging_pp", id="expert_merging_pp"))


def test_excluded_tensors_keep_real_expert_as_teacher(tiny_pool_cfg):
    pool = pool_from_config(tiny_pool_cfg)
    m = get_method("expert_merging")(pool, em_cfg(), {"exclude": ["LayerNorm"]})
    n = next(n for n in pool.shared_names() if "LayerNorm" in n)
    assert n not in m.merged.names
    torch.testing.assert_close(m.expert_params("task1")[n], pool.expert_tensor("task1", n))


# -- Expert Merging++ allocation ---------------------------------------------------------------
def test_chunk_allocation():
    imp = [0.5, 0.25, 0.15, 0.06, 0.03, 0.01]
    for budget in (6, 7, 20, 100):
        for kappa in (0.5, 1.0, 2.0):
            m = allocate_chunks(imp, budget, kappa)
            assert sum(m) <= budget and min(m) >= 1
            assert all(a >= b for a, b in zip(m, m[1:]))  # heavier tensors: at least as many chunks
    assert allocate_chunks(imp, 100, 1.0) == [50, 25, 15, 6, 3, 1]
    # κ > 1 concentrates the budget on the most important tensor
    assert allocate_chunks(imp, 100, 2.0)[0] > allocate_chunks(imp, 100, 1.0)[0]
    # tensors under one chunk get one; the rest of B is split among the others by the same formula
    assert allocate_chunks([0.97, 0.01, 0.01, 0.01], 5) == [2, 1, 1, 1]
    assert allocate_chunks([0.0] * 8 + [0.6, 0.4], 20) == [1] * 8 + [7, 4]  # e.g. tensors LoRA leaves alone
    assert allocate_chunks([1.0, 0.0], 10, numels=[3, 8]) == [3, 1]  # never more chunks than entries
    with pytest.raises(ValueError, match="budget"):
        allocate_chunks(imp, 5)
    # importance = normalize(Σ_k |α|·mean|τ|·n)
    i = layer_importance(torch.tensor([[0.5, 0.5], [1.0, 0.0]]), torch.tensor([[1.0, 1.0], [2.0, 9.0]]), [10, 5])
    torch.testing.assert_close(i, torch.tensor([10.0, 10.0], dtype=torch.float64) / 20)


# -- train.py runs ------------------------------------------------------------------------------
def train_py(conf: Path, *overrides: str) -> None:
    """The program train.py runs, in this process, composed by Hydra from configs/ (+ ``conf``): the code path
    and configs of the command line, without the ~9 s of imports a fresh process pays per run."""
    from adamerge.api import compose_config
    from adamerge.run.program import run

    run(compose_config([*FAST, *overrides], config_dir=conf))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_pool_cfg):
    """Expert Merging on the BERT pool (a) and on a causal LM (lm); then Expert Merging++ from (a):
    4 steps straight (pp) and 2 steps resumed to 4 (pp_resumed)."""
    root = tmp_path_factory.mktemp("em_runs")
    conf = root / "conf"
    helpers.write_pool_config(conf, "tiny", tiny_pool_cfg)
    helpers.write_pool_config(conf, "tiny_lm", make_causal_pool(root / "lm_pool"))
    em = ["method=expert_merging", "method.hidden_layers=[1]"]
    train_py(conf, "pool=tiny", *em, "trainer.max_steps=4", f"out_dir={root / 'a'}")
    # the toy LM's KL/MSE are ~0.02, where γ = 5 would pin σ(w) at its init: scale γ down
    train_py(conf, "pool=tiny_lm", *em, "method.reg_weight=0.05", "trainer.max_steps=3", f"out_dir={root / 'lm'}")
    pp = ["pool=tiny", "method=expert_merging_pp", f"method.first_pass={root / 'a' / 'export'}"]
    train_py(conf, *pp, "trainer.max_steps=4", f"out_dir={root / 'pp'}")
    train_py(conf, *pp, "trainer.max_steps=2", f"out_dir={root / 'pp_resumed'}")
    train_py(conf, *pp, "trainer.max_steps=4", f"out_dir={root / 'pp_resumed'}", "resume=last", "export.overwrite=true")
    return root


def test_train_lowers_loss(runs, tiny_pool_cfg):
    pool = pool_from_config(tiny_pool_cfg)
    m = get_method("expert_merging")(pool, em_cfg(hidden_layers=[1]))
    before = calibration_loss(m, pool)
    after = calibration_loss(load_ckpt(m, runs / "a"), pool)
    assert after < 0.9 * before, (before, after)
    rep = json.loads((runs / "a" / "export" / "coefficients.json").read_text())
    assert rep["granularity"] == "layer" and rep["num_trainable"] == 2 * len(rep["tensors"])
    assert all(0 < v < 1 for row in rep["coefficients"] for v in row)


def test_expert_merging_pp_end_to_end(runs, tiny_pool_cfg):
    rep = json.loads((runs / "pp" / "export" / "coefficients.json").read_text())
    L = len(rep["tensors"])
    alloc = rep["allocation"]
    assert rep["granularity"] == "chunk" and alloc["budget"] == 4 * L
    chunks = [rep["chunks"][n] for n in rep["tensors"]]
    assert min(chunks) >= 1 and sum(chunks) == alloc["total_chunks"] <= alloc["budget"]
    assert rep["num_trainable"] == 2 * sum(chunks)
    # the most important tensor got the most chunks
    imp = [alloc["importance"][n] for n in rep["tensors"]]
    assert chunks[imp.index(max(imp))] == max(chunks) > 1
    assert [len(rep["chunk_coefficients"][n][0]) for n in rep["tensors"]] == chunks
    # a checkpoint with another allocation is refused
    pool = pool_from_config(tiny_pool_cfg)
    m = get_method("expert_merging_pp")(pool, {**em_cfg(name="expert_merging_pp", id="expert_merging_pp"),
                                              "first_pass": str(runs / "a" / "export"), "budget_per_tensor": 2})
    ckpt = torch.load(runs / "pp" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    with pytest.raises(CheckpointError, match="chunk allocation"):
        m.on_load_checkpoint(ckpt)


def test_resume_continues_exactly(runs):
    a = torch.load(runs / "pp" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(runs / "pp_resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 4
    assert torch.equal(a["state_dict"]["merged.coefficients.raw"], b["state_dict"]["merged.coefficients.raw"])
    sa, sb = a["lr_schedulers"][0], b["lr_schedulers"][0]
    assert sa["last_epoch"] == sb["last_epoch"] == 4 and sa["_last_lr"] == sb["_last_lr"]
    assert a["optimizer_states"][0]["state"][0]["exp_avg_sq"].equal(b["optimizer_states"][0]["state"][0]["exp_avg_sq"])


# -- causal LM pool ----------------------------------------------------------------------------
def make_causal_pool(tmp: Path, k: int = 2) -> dict:
    """A tiny Llama (tied embeddings) with a word-level tokenizer and ``k`` perturbed experts."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for ws in helpers.WORDS.values() for w in ws})
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", model_input_names=["input_ids", "attention_mask"])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    base = LlamaForCausalLM(cfg).eval()
    base.save_pretrained(tmp / "base")
    fast.save_pretrained(tmp / "base")
    tasks = {}
    for i, topic in enumerate(list(helpers.WORDS)[:k]):
        exp = LlamaForCausalLM(cfg)
        exp.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in exp.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        exp.save_pretrained(tmp / f"lm{i}")
        rows = helpers.make_texts(8, seed=i, topics=(topic,))
        tasks[f"lm{i}"] = {"expert": str(tmp / f"lm{i}"),
                           "calibration": helpers.write_jsonl(tmp / f"lm{i}_cal.jsonl", rows)}
    return {"base": str(tmp / "base"), "model_class": "causal_lm", "head_prefixes": [], "tasks": tasks}


def test_causal_lm_end_to_end(runs):
    import yaml
    from transformers import AutoModelForCausalLM

    pool = pool_from_config(yaml.safe_load((runs / "conf" / "pool" / "tiny_lm.yaml").read_text()))
    m = get_method("expert_merging")(pool, em_cfg(hidden_layers=[1], reg_weight=0.05))
    before = calibration_loss(m, pool)
    after = calibration_loss(load_ckpt(m, runs / "lm"), pool)
    assert after < before, (before, after)
    # the export is a loadable causal LM holding the merged weights (tied lm_head follows the merge)
    lm = AutoModelForCausalLM.from_pretrained(str(runs / "lm" / "export" / "model")).eval()
    merged = m.merged.merged_state_dict()
    sd = lm.state_dict()
    for n in ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"):
        torch.testing.assert_close(sd[n], merged[n])
    torch.testing.assert_close(sd["lm_head.weight"], merged["model.embed_tokens.weight"])
    batch = next(iter(CalibrationDataModule.from_pool(pool, batch_size=2, max_length=16).train_dataloader()))
    x = batch["lm0"]
    with torch.no_grad():
        torch.testing.assert_close(lm(**x).logits, m.merged(task="lm0", **x).logits, rtol=1e-4, atol=1e-5)
