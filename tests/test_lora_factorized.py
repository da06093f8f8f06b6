"""LoRA experts kept factorized (task_vectors.lora): the same loss, coefficient gradient and export as the
dense task vectors, through train.py with resume, the dense fallback, and no per-expert dense weight."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import helpers
from adamerge.errors import ConfigError
from adamerge.methods import get_method
from adamerge.pool.config import pool_from_config


# -- pools --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert_cfg(tmp_path_factory):
    """Two peft LoRA experts of a tiny BERT (query, value; heads as modules_to_save), with data files."""
    return helpers.make_pool(tmp_path_factory.mktemp("bert_lora"), k=2, form="lora")


@pytest.fixture(scope="module")
def bert(bert_cfg):
    return pool_from_config(bert_cfg)


def make_llama_lora_pool(tmp) -> dict:
    """A tiny Llama and two peft LoRA experts of different ranks: lm0 (r=4) on q, v, o; lm1 (rsLoRA, r=2)
    on q, v with o_proj as a full tensor (modules_to_save), so o_proj must stay dense."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).eval().save_pretrained(tmp / "base")
    helpers.save_tokenizer(tmp / "base")
    loras = [LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]),
             LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"],
                        modules_to_save=["o_proj"])]
    tasks = {}
    for i, lcfg in enumerate(loras):
        torch.manual_seed(10 + i)
        p = get_peft_model(LlamaForCausalLM.from_pretrained(str(tmp / "base")), lcfg)
        with torch.no_grad():
            for n, prm in p.named_parameters():
                if "lora_B" in n or "modules_to_save" in n:
                    prm.add_(torch.randn_like(prm) * 0.1)
        p.save_pretrained(tmp / f"e{i}")
        rows = helpers.make_texts(16, seed=i)
        tasks[f"lm{i}"] = {"expert": str(tmp / f"e{i}"), "calibration": helpers.write_jsonl(tmp / f"c{i}.jsonl", rows)}
    return {"base": str(tmp / "base"), "model_class": "causal_lm", "head_prefixes": [], "tasks": tasks}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return pool_from_config(make_llama_lora_pool(tmp_path_factory.mktemp("llama_lora")))


def methods(pool, method: dict, seed: int = 0, lora_step: str = "auto"):
    """The same method built dense and factorized, with the same random coefficients."""
    out = {}
    for mode in ("dense", "factorized"):
        m = get_method(method["name"])(pool, method, {"lora": mode, "lora_step": lora_step})
        if m.merged.coefficients.raw.requires_grad:
            with torch.no_grad():
                m.merged.coefficients.raw.copy_(torch.rand(m.merged.coefficients.raw.shape,
                                                           generator=torch.Generator().manual_seed(seed)))
        out[mode] = m
    assert out["dense"].merged.names == out["factorized"].merged.names  # the same coefficient layout
    assert not out["dense"].merged.factored_names and out["factorized"].merged.factored_names
    return out["dense"], out["factorized"]


def batch_for(pool, causal: bool, step: int = 0) -> dict:
    ids = torch.randint(1000 + 200 * step, 3000, (3, 7), generator=torch.Generator().manual_seed(step))
    mask = torch.ones_like(ids)
    if causal:
        mask[1, 5:] = 0
    return {t: {"input_ids": ids + i, "attention_mask": mask} for i, t in enumerate(pool.task_names)}


# -- the training step and the export -------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["task", "layer"])
@pytest.mark.parametrize("model, lora_step", [("bert", "adapters"), ("bert", "merge"), ("llama", "adapters"),
                                              ("llama", "auto")])
def test_step_loss_and_coefficient_gradient_equal_the_dense(model, lora_step, granularity, request):
    """Both ways a step runs factorized weights (the multi-adapter forward; merged from the factors once
    per step) give the dense path's loss and coefficient gradient."""
    pool = request.getfixturevalue(model)
    dense, fact = methods(pool, {"name": "adamerging", "granularity": granularity}, lora_step=lora_step)
    mf = fact.merged
    tokens = sum(x["input_ids"].numel() for x in batch_for(pool, model == "llama").values())
    via = mf.via_adapters(tokens)
    assert via == ({"adapters": mf.factored_names, "merge": []}[lora_step] if lora_step != "auto"
                   else [n for n in mf.factored_names if not mf.task_vectors.factors.factors[n].merge_is_cheaper(tokens)])
    if model == "llama":
        assert "model.layers.0.self_attn.q_proj.weight" in mf.factored_names
        # o_proj: lm1 changes it as a full tensor, so it keeps the dense path beside the factors
        assert "model.layers.0.self_attn.o_proj.weight" in mf.names
        assert "model.layers.0.self_attn.o_proj.weight" not in mf.factored_names
        assert mf.task_vectors.factors.factors["model.layers.0.self_attn.q_proj.weight"].a.shape[0] == 4 + 2
    for step in range(2):  # the second step reuses the buffers, with other coefficients
        batch = batch_for(pool, model == "llama", step)
        g_dense = helpers.step_gradient_matches_dense(dense, batch)  # dense = plain autograd of the merge
        v_dense = dense.step_loss(batch)[0]
        v_fact, surrogate = fact.step_loss(batch)
        g_fact = torch.autograd.grad(surrogate, mf.coefficients.raw)[0]
        torch.testing.assert_close(v_fact, v_dense, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g_fact, g_dense, atol=1e-5, rtol=1e-5)
        rows = [mf.names.index(n) for n in mf.factored_names]
        assert (g_fact[rows] if granularity == "layer" else g_fact).abs().sum() > 0
        assert not any(m._forward_hooks for m in pool.base_model.modules())  # the hooks are gone after the step
        with torch.no_grad():
            for m in (dense, fact):
                m.merged.coefficients.raw.add_(0.05)


@pytest.mark.parametrize("model", ["bert", "llama"])
@pytest.mark.parametrize("method", [{"name": "adamerging", "granularity": "layer"},
                                    {"name": "static", "scale": 0.4}])
def test_exported_weights_equal_the_dense(model, method, request):
    pool = request.getfixturevalue(model)
    dense, fact = methods(pool, method, seed=3)
    a, b = dense.merged.merged_state_dict(), fact.merged.merged_state_dict()
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(b[n], a[n], atol=1e-6, rtol=0)
    n = fact.merged.factored_names[0]
    assert not torch.equal(b[n], pool.base_tensor(n))  # the LoRA updates are in it
    # each expert's own weights too (what RegMean, Fisher and Expert Merging read)
    torch.testing.assert_close(fact.merged.expert_params(1)[n], pool.expert_tensor(pool.task_names[1], n),
                               atol=1e-6, rtol=0)


# -- through train.py ------------------------------------------------------------------------------
def coefs(run) -> torch.Tensor:
    return torch.tensor(json.loads((run / "export" / "coefficients.json").read_text())["coefficients"])


def test_train_py_factorized_trains_exports_and_resumes_exactly(bert_cfg, tmp_path, caplog):
    from transformers import AutoModelForSequenceClassification

    args = ["method=adamerging_layerwise", "task_vectors.lora=factorized", "method.lr=0.05", "data.batch_size=4",
            "trainer.log_every_n_steps=1", "checkpoint.every_n_steps=2", "evaluate.reference_rows=false"]
    full, part, dense = tmp_path / "full", tmp_path / "part", tmp_path / "dense"
    with caplog.at_level(logging.INFO, logger="adamerge"):
        assert helpers.run_inprocess([*args, f"out_dir={full}", "trainer.max_steps=3"], bert_cfg) == 0
    assert "(4 tensors as LoRA factors)" in caplog.text  # the header's task-vector memory names them
    assert len(helpers.logged_losses(full)) == 3
    assert (coefs(full) - 0.3).abs().max() > 0.01
    # the same run on dense task vectors learns the same coefficients
    assert helpers.run_inprocess([*args, f"out_dir={dense}", "trainer.max_steps=3", "task_vectors.lora=dense",
                                  "evaluate.enabled=false"], bert_cfg) == 0
    torch.testing.assert_close(coefs(full), coefs(dense), atol=1e-5, rtol=0)
    # stopped after 2 steps and resumed: exactly the uninterrupted run
    assert helpers.run_inprocess([*args, f"out_dir={part}", "trainer.max_steps=2", "evaluate.enabled=false"],
                                 bert_cfg) == 0
    assert helpers.run_inprocess([*args, f"out_dir={part}", "trainer.max_steps=3", "resume=last",
                                  "export.overwrite=true", "evaluate.enabled=false"], bert_cfg) == 0
    torch.testing.assert_close(coefs(part), coefs(full), atol=1e-6, rtol=0)
    # the exported model holds W0 + Σ c s B A
    pool = pool_from_config(bert_cfg)
    rep = json.loads((full / "export" / "coefficients.json").read_text())
    model = AutoModelForSequenceClassification.from_pretrained(str(full / "export" / "model"))
    sd = model.state_dict()
    c = torch.tensor(rep["coefficients"])
    for i, n in enumerate(rep["tensors"]):
        want = pool.base_tensor(n) + sum(float(c[i, k]) * pool.task_vector(t, n) for k, t in enumerate(pool.task_names))
        torch.testing.assert_close(sd[n], want, atol=1e-6, rtol=0)


def test_ties_falls_back_to_dense_with_one_line(bert_cfg, bert, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="adamerge"):
        code = helpers.run_inprocess(["method=ties_merging", "task_vectors.lora=factorized", f"out_dir={tmp_path}",
                                      "evaluate.enabled=false"], bert_cfg)
    assert code == 0 and (tmp_path / "export" / "model").exists()
    lines = [r.getMessage() for r in caplog.records if "task_vectors.lora" in r.getMessage()]
    assert lines == ["task_vectors.lora=factorized: method ties_merging uses dense task vectors "
                     "(ties needs τ's entries)"]
    assert "LoRA factors" not in caplog.text
    # auto: dense for TIES without a word; factorized for task arithmetic; dense=dense
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="adamerge"):
        ties = get_method("static")(bert, {"name": "static", "ties": {}}, {})
        assert not ties.merged.factored_names and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert get_method("static")(bert, {"name": "static"}, {}).merged.factored_names
    assert not get_method("static")(bert, {"name": "static"}, {"lora": "dense"}).merged.factored_names
    with caplog.at_level(logging.INFO, logger="adamerge"):
        assert not get_method("adamerging")(bert, {"name": "adamerging", "start_from": {"name": "static"}},
                                            {"lora": "factorized"}).merged.factored_names
    assert "(start_from re-expresses τ against a dense merge)" in caplog.text


def test_which_method_configs_may_stay_factorized():
    """The one decision (MergeMethod.dense_reason) over every shipped method config."""
    from omegaconf import OmegaConf

    reasons = {}
    for f in sorted((helpers.ROOT / "configs" / "method").glob("*.yaml")):
        values = OmegaConf.to_container(helpers.compose([f"method={f.stem}"]).method, resolve=True)
        if isinstance(values.get("start_from"), str):  # train.py inlines the named config
            values["start_from"] = {"name": values["start_from"]}
        cls = get_method(values["name"])
        reasons[values["id"]] = cls.dense_reason(cls.parse_config(values))
    assert {i for i, r in reasons.items() if r is None} == {"adamerging_layerwise", "adamerging_layerwise_paper",
                                                             "adamerging_taskwise",
                                                            "task_arithmetic", "weight_average",
                                                            "map", "evolve", "m2n2"}  # they only set coefficients
    assert reasons["adamerging_layerwise_pp"] == reasons["ties_merging"] == "ties needs τ's entries"
    assert reasons["dare_task_arithmetic"] == "dare needs τ's entries"
    assert reasons["regmean"] == "regmean needs dense task vectors"


def test_bad_lora_value_is_a_one_line_config_error(bert_cfg, bert, tmp_path, capsys):
    code = helpers.run_inprocess(["method=task_arithmetic", "task_vectors.lora=sparse", f"out_dir={tmp_path}"],
                                 bert_cfg)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == "error: config key 'task_vectors.lora' must be one of 'auto', 'dense', 'factorized', got 'sparse'"
    with pytest.raises(ConfigError, match="task_vectors.lora"):
        get_method("static")(bert, {"name": "static"}, {"lora": True})
    code = helpers.run_inprocess(["method=task_arithmetic", "task_vectors.lora_step=fast", f"out_dir={tmp_path}"],
                                 bert_cfg)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == "error: config key 'task_vectors.lora_step' must be one of 'auto', 'adapters', 'merge', got 'fast'"


@pytest.mark.parametrize("how", ["dense", "factorized", "sharded"])
def test_a_selection_no_expert_changes_is_refused_as_nothing_to_merge(bert, how):
    """The adapters target query and value only: selecting the key weights leaves nothing to merge, said
    the same way by every way of reading task vectors."""
    from adamerge.core.sharded import ShardedTaskVectors
    from adamerge.core.task_vectors import TaskVectors
    from adamerge.errors import PoolError

    include = ["attention.self.key"]
    with pytest.raises(PoolError, match="no expert differs from the base in any selected tensor: nothing to merge"):
        if how == "sharded":
            ShardedTaskVectors.from_pool(bert, rank=0, world=2, include=include)
        else:
            TaskVectors.from_pool(bert, include=include, factorize=how == "factorized")
