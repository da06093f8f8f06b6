"""RegMean / RegMean++: the closed form against least squares, layer-by-layer inputs, train.py end to end."""

from __future__ import annotations

import json

import torch

import helpers
from adamerge.methods import get_method
from adamerge.methods.regmean import regmean_solve
from adamerge.pool.config import pool_from_config
from adamerge.run.data import encode, load_tokenizer, read_jsonl

N_EX, MAX_LEN = 12, 16


def rm_cfg(name: str = "regmean", **kw) -> dict:
    cfg = {"name": name, "id": name, "alpha": 1.0, "num_examples": N_EX, "batch_size": 5, "max_length": MAX_LEN}
    cfg.update(kw)
    return cfg


def test_solve_is_the_least_squares_fit_of_both_experts():
    torch.manual_seed(0)
    xs = [torch.randn(40, 6), torch.randn(30, 6)]
    ws = [torch.randn(6, 4), torch.randn(6, 4)]  # inputs-first [in, out]
    grams = [x.T @ x / x.shape[0] for x in xs]
    got = regmean_solve(grams, ws, alpha=1.0)
    # min_W Σ_i ‖X_i W − X_i W_i‖² / n_i, solved by lstsq on the stacked system
    a = torch.cat([x / x.shape[0] ** 0.5 for x in xs]).double()
    b = torch.cat([x @ w / x.shape[0] ** 0.5 for x, w in zip(xs, ws)]).double()
    ref = torch.linalg.lstsq(a, b).solution.float()
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # alpha = 0: diagonal Grams only -> a per-input-feature weighted average of the rows
    g0 = regmean_solve(grams, ws, alpha=0.0)
    d = torch.stack([torch.diagonal(g) for g in grams])  # [2, in]
    ref0 = (d[0, :, None] * ws[0] + d[1, :, None] * ws[1]) / (d[0] + d[1])[:, None]
    torch.testing.assert_close(g0, ref0, atol=1e-5, rtol=1e-5)


def expert_inputs(pool, tiny_pool_cfg, task: str, module: str) -> torch.Tensor:
    """Inputs (non-padding tokens) of ``module`` in the real expert model, computed independently."""
    from transformers import BertForSequenceClassification

    spec = tiny_pool_cfg["tasks"][task]
    model = BertForSequenceClassification.from_pretrained(spec["expert"]).eval()
    texts = read_jsonl(spec["calibration"], task)[0][:N_EX]
    enc = encode(load_tokenizer(pool.base_path), texts, MAX_LEN)
    seen = []
    h = model.get_submodule(module).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(**enc)
    h.remove()
    return seen[0][enc["attention_mask"].bool()]


def test_single_linear_layer_equals_least_squares_of_expert_outputs(pool, tiny_pool_cfg):
    m = get_method("regmean")(pool, rm_cfg())
    merged = m.merged.merged_params()
    mod = "bert.encoder.layer.1.attention.output.dense"  # its inputs depend on each expert's own attention
    xs = [expert_inputs(pool, tiny_pool_cfg, t, mod) for t in pool.task_names]
    ws = [pool.expert_tensor(t, mod + ".weight").float() for t in pool.task_names]
    # argmin_W Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖² / n_i: reproduce both experts' outputs on their own inputs
    a = torch.cat([x / x.shape[0] ** 0.5 for x in xs]).double()
    b = torch.cat([x @ w.T / x.shape[0] ** 0.5 for x, w in zip(xs, ws)]).double()
    ref = torch.linalg.lstsq(a, b).solution.T.float()
    # the inputs' Gram has cond ~7e4 here, so float32 Grams (as specified) leave ~2e-4 of error;
    # the least-squares weight itself is ~100x farther than that from the plain average
    avg = (ws[0] + ws[1]) / 2
    assert (ref - avg).abs().max() > 0.05
    torch.testing.assert_close(merged[mod + ".weight"], ref, atol=5e-4, rtol=0)
    # not a linear weight: the plain average
    for n in (mod + ".bias", "bert.encoder.layer.1.output.LayerNorm.weight", "bert.embeddings.word_embeddings.weight"):
        avg = sum(pool.expert_tensor(t, n) for t in pool.task_names) / 2
        torch.testing.assert_close(merged[n], avg, atol=1e-6, rtol=1e-6)


def test_one_pass_equals_layer_by_layer(pool):
    a = get_method("regmean")(pool, rm_cfg(alpha=0.9, layers_per_pass=None)).merged.merged_params()
    b = get_method("regmean")(pool, rm_cfg(alpha=0.9, layers_per_pass=1)).merged.merged_params()
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=1e-5)


def test_regmean_pp_equals_regmean_on_first_layer_and_differs_after(pool):
    # embeddings kept at the base so that block 0 sees the same inputs in both methods
    tv = {"exclude": ["embeddings"]}
    a = get_method("regmean")(pool, rm_cfg(alpha=0.9), tv).merged.merged_params()
    b = get_method("regmean_pp")(pool, rm_cfg("regmean_pp", alpha=0.9), tv).merged.merged_params()
    first = [n for n in a if ".layer.0." in n]
    later = [n for n in a if ".layer.1." in n and n.endswith(".weight") and "LayerNorm" not in n]
    assert len(first) == 16 and len(later) == 6
    for n in first:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=1e-5)
    for n in later:  # block 1's inputs come from the merged block 0 in RegMean++
        assert (a[n] - b[n]).abs().max() > 1e-4, n


def test_regmean_pp_end_to_end_through_train(tiny_pool_cfg, tmp_path):
    out = tmp_path / "run"
    code = helpers.run_inprocess(["method=regmean_pp", f"out_dir={out}", "method.num_examples=8",
                                  "data.max_length=16", "evaluate.reference_rows=false"], tiny_pool_cfg)
    assert code == 0
    rep = json.loads((out / "export" / "coefficients.json").read_text())
    assert rep["method"] == "regmean_pp" and rep["num_trainable"] == 0 and "closed-form" in rep["note"]
    assert rep["coefficients"] is None  # W = W0 + D: no per-task coefficients
    assert not (out / "export" / "coefficients.png").exists() and "W = W0 + D" in (out / "export" / "README.md").read_text()
    ev = json.loads((out / "eval.json").read_text())
    assert "regmean_pp" in json.dumps(ev)
    # the exported model holds exactly the method's merged weights

    sd = helpers.exported_backbone(out)
    pool = pool_from_config(tiny_pool_cfg)
    m = get_method("regmean_pp")(pool, rm_cfg("regmean_pp", alpha=0.9, num_examples=8, batch_size=16))
    merged = m.merged.merged_params()
    n = "bert.encoder.layer.1.intermediate.dense.weight"
    torch.testing.assert_close(sd[n], merged[n], atol=1e-6, rtol=1e-6)
