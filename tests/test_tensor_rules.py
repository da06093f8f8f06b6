"""The per-tensor merge rules (adamerge/core/tensor_rules.py) beyond their peers' fixtures (tests/test_streaming.py):
the authors' SCE variant, DELLA's rank-dependent keep rate and its L1 rescale, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from peer_pool import PEER_CASES, make_seeded_llama_pool, model_tensors

import helpers
from adamerge.core.tensor_rules import Della, ModelStock, Sce, Widen
from adamerge.errors import ConfigError
from adamerge.methods.adamerging import AdaMerging
from adamerge.methods.static import StaticMerge


def test_sce_authors_variant_masks_only_the_weights():
    """``mask_deltas=false``: the weights come from the variance-selected entries, the vote and the mean from all."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 20, 10, generator=g)
    var = t.var(0, unbiased=False)
    mask = torch.zeros_like(var)
    mask.view(-1)[var.view(-1).topk(int(0.2 * var.numel())).indices] = 1
    w = (t * mask).square().flatten(1).mean(1)
    w = (w / w.sum()).view(3, 1, 1)
    erase = (t.sign() == torch.where(t.sum(0) >= 0, 1.0, -1.0)).float()
    want = (t * w * erase).sum(0) / (w * erase).sum(0).clamp(min=1e-6)
    got = Sce(0.2, mask_deltas=False)("w", t.clone())
    torch.testing.assert_close(got[0], want)
    assert not got[1:].any()
    masked = Sce(0.2, mask_deltas=True)("w", t.clone())[0]
    assert (masked[mask == 0] == 0).all() and (got[0][mask == 0] != 0).any()


def test_della_keeps_large_entries_more_often_and_keeps_each_tasks_l1_norm():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(2, 64, 4096, generator=g)
    out = Della(0.5, 0.15, seed=3)("w", t.clone())
    order = t[0].abs().argsort(dim=1)
    kept = (out[0] != 0).gather(1, order).float().mean(0)  # keep rate by rank in the row, smallest first
    assert abs(kept[:400].mean() - 0.36) < 0.02 and abs(kept[-400:].mean() - 0.64) < 0.02
    assert abs((out != 0).float().mean() - 0.5) < 0.01
    torch.testing.assert_close(out.abs().flatten(1).sum(1), t.abs().flatten(1).sum(1))
    again = Della(0.5, 0.15, seed=3)("w", t.clone())
    assert torch.equal(out, again)  # seeded
    inverse = Della(0.5, 0.15, seed=3, rescale="inverse")("w", t.clone())  # the paper's: unbiased entry by entry
    assert torch.equal(inverse != 0, out != 0)
    assert abs(float(inverse.abs().sum() / t.abs().sum()) - 1) < 0.01  # E|x·B/p| = |x|


def test_model_stock_keeps_the_base_where_the_ratio_is_singular():
    t = torch.stack([torch.ones(4, 3), -torch.ones(4, 3)])  # cos θ = −1, K = 2: 1 + (K − 1) cos θ = 0
    assert not ModelStock()("w", t.clone()).any()


@pytest.mark.parametrize("key", ["sce", "magmax", "slerp", "nuslerp", "multislerp", "karcher", "iso", "model_stock", "widen", "rmm"])
def test_a_merge_rule_is_refused_as_a_learned_methods_transform(key):
    with pytest.raises(ConfigError, match=f"method.{key}' is a whole merge"):
        AdaMerging.parse_config({"id": "adamerging_layerwise", key: True if key == "magmax" else {}})
    StaticMerge.parse_config({"id": key, key: True if key == "magmax" else {}})


@pytest.mark.parametrize("method,experts,says", [("nuslerp", 3, "exactly 2 experts, the pool has 3"),
                                                  ("slerp", 3, "exactly 2 experts, the pool has 3"),
                                                  ("model_stock", 1, "at least 2 experts"),
                                                  ("multislerp method.multislerp.weights=[1,2]", 3, "2 values for 3")])
@pytest.mark.parametrize("stream", ["true", "false"])
def test_a_rule_given_the_wrong_number_of_experts_says_so_in_one_line(tmp_path, capsys, method, experts, says, stream):
    pool = make_seeded_llama_pool(tmp_path / "pool")
    pool["tasks"] = dict(list(pool["tasks"].items())[:experts])
    capsys.readouterr()
    code = helpers.run_inprocess([f"out_dir={tmp_path}/run", *f"method={method}".split(), "evaluate.enabled=false",
                                  f"task_vectors.stream={stream}"], pool)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and says in err, err
    assert not (tmp_path / "run" / "export").exists()


@pytest.mark.parametrize("rule", ["sce", "model_stock", "nuslerp", "multislerp", "iso_c", "iso_cts", "magmax"])
def test_a_rule_on_bfloat16_task_vectors_gives_the_float32_merge_to_bfloat16_precision(rule):
    from adamerge.core.transforms import build_stages

    cfg = StaticMerge.parse_config(yaml.safe_load((helpers.ROOT / "adamerge" / "configs" / "method" / f"{rule}.yaml").read_text()))
    g = torch.Generator().manual_seed(2)
    t = torch.randn(2, 24, 16, generator=g) * 0.01
    (stage,) = build_stages(cfg)
    want = stage("w", t.clone())[0]
    got = stage("w", t.clone().bfloat16())[0].float()
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.02 * want.abs().max().item())


@pytest.mark.parametrize("stream", ["true", "false"])
def test_opcm_continued_from_an_earlier_export_equals_the_merge_in_one_run(tmp_path, capsys, stream):
    """Experts added to an OPCM export later, without its experts, give the one-run merge in the same order, bit for bit."""
    pool = make_seeded_llama_pool(tmp_path / "pool")
    first, later = dict(pool, tasks=dict(list(pool["tasks"].items())[:2])), dict(pool, tasks={
        "lm2": pool["tasks"]["lm2"]})
    common = ["method=opcm", "method.opcm.shuffle=false", "evaluate.enabled=false", f"task_vectors.stream={stream}"]
    helpers.train_here(pool, tmp_path / "once", *common)
    helpers.train_here(first, tmp_path / "a", *common)
    helpers.train_here(later, tmp_path / "b", *common, f"method.opcm.continue_from={tmp_path}/a/export")
    once, twice = model_tensors(tmp_path / "once/export/model"), model_tensors(tmp_path / "b/export/model")
    for n, t in once.items():
        assert torch.equal(twice[n], t), n  # the same arithmetic: R_T kept in float32
    report = json.loads((tmp_path / "b/export/coefficients.json").read_text())["opcm"]
    assert report["experts"] == ["lm0", "lm1", "lm2"] and len(report["norms"]) == 3
    capsys.readouterr()
    code = helpers.run_inprocess([f"out_dir={tmp_path}/c", *common, f"method.opcm.continue_from={tmp_path}/a/export"],
                                 first)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "lm0, lm1 are in the earlier merge already" in err, err


def test_knots_coordinates_map_back_to_the_task_vectors_and_ties_runs_on_them():
    """Without a transform between them, KnotsIn and KnotsOut give the task vectors back; TIES between them counts
    the coordinates (r per row), not the matrix's entries."""
    from adamerge.core.knots import KnotsIn, KnotsOut, subspace_alignment
    from adamerge.core.task_vectors import TaskVectors
    from adamerge.core.transforms import build_stages, run_stages

    g = torch.Generator().manual_seed(3)
    stack = torch.stack([torch.randn(48, 4, generator=g) @ torch.randn(4, 32, generator=g) for _ in range(3)])
    u, coordinates = subspace_alignment(stack)
    assert coordinates.shape == (3, 12, 32)  # rank 4 each: 12 shared directions
    torch.testing.assert_close(u.T @ u, torch.eye(12), atol=1e-5, rtol=0)
    into = KnotsIn()
    back = KnotsOut(into)("w", into("w", stack.clone()))
    torch.testing.assert_close(back, stack, atol=1e-5, rtol=1e-5)
    cfg = StaticMerge.parse_config(yaml.safe_load((helpers.ROOT / "adamerge/configs/method/knots_ties.yaml").read_text()))
    stages = build_stages(cfg)
    assert [type(s).__name__ for s in stages] == ["KnotsIn", "TiesTrim", "TiesElect", "DisjointMean", "KnotsOut"]
    merged = run_stages(TaskVectors({"w": stack.clone()}, ["a", "b", "c"]), stages).tensors["w"]
    assert merged.shape == stack.shape and not torch.allclose(merged, stack, atol=1e-3)



def test_emr_gives_each_task_fusionbenchs_model_and_stores_it_as_one_vector_and_bit_masks(tmp_path):
    """EMR merging's per-task model (export/tasks/<task>) equals FusionBench 0.2.33's on the seeded pool to the last
    bit (bench/crosscheck.py), and the compact export (the unified vector, packed masks, scales) rebuilds it."""
    from safetensors.torch import load_file

    from adamerge.core.task_masks import read_task_update

    pool = make_seeded_llama_pool(tmp_path / "pool")
    helpers.train_here(pool, tmp_path / "run", *PEER_CASES["emr_merging"].adamerge, "evaluate.enabled=false")
    export = tmp_path / "run" / "export"
    fixture = load_file(str(helpers.ROOT / "tests" / "fixtures" / "fusionbench_merges.safetensors"))
    got = model_tensors(export / "tasks" / "lm1")
    want = {n.split("/", 1)[1]: t for n, t in fixture.items() if n.startswith("emr_merging/")}
    assert len(want) == 5 and all(torch.equal(got[n], t) for n, t in want.items())
    scales = json.loads((export / "coefficients.json").read_text())["task_masks"]["scales"]
    base = load_file(pool["base"] + "/model.safetensors")
    rebuilt = read_task_update(export, 1, scales[1])
    assert all(torch.equal(base[n] + u, got[n]) for n, u in rebuilt.items())
    packed = (export / "task_masks" / "masks.safetensors").stat().st_size
    assert packed < sum(t.numel() for t in base.values())  # 3 tasks' masks: 3 bits an entry, under a byte


@pytest.mark.parametrize("method", ["emr_merging", "tall_masks"])
def test_a_model_per_task_is_evaluated_per_task_and_served_from_its_directory(tiny_pool_cfg, tmp_path, method):
    """The table has each task's own model and their average; export/tasks/<task> is the task's own model."""
    from transformers import AutoModelForSequenceClassification

    from adamerge.core.task_masks import TaskMasks
    from adamerge.export import load_task_model

    assert helpers.run_inprocess([f"out_dir={tmp_path / 'run'}", f"method={method}",
                                  "evaluate.reference_rows=false"], tiny_pool_cfg) == 0
    rows = json.loads((tmp_path / "run" / "eval.json").read_text())["rows"]
    assert {f"{method} (each task's own model)", f"{method} (average of the task models)"} <= set(rows)
    export = tmp_path / "run" / "export"
    served = {t: AutoModelForSequenceClassification.from_pretrained(str(export / "tasks" / t)) for t in ("task0", "task1")}
    backbones = [served[t].base_model.state_dict() for t in served]
    assert any(not torch.equal(backbones[0][n], backbones[1][n]) for n in backbones[0])
    average = load_task_model(export, "task0").base_model.state_dict()  # export/model: the task models' average
    assert any(not torch.equal(backbones[0][n], average[n]) for n in average)
    if method == "tall_masks":  # the paper's rule: |τ_t| ≥ λ |Σ τ − τ_t|, then the summed vector where it holds
        g = torch.Generator().manual_seed(0)
        t = torch.randn(3, 8, 5, generator=g)
        stage = TaskMasks("tall", 0.4)
        stage.fit(lambda: [("w", t)], 3)
        rows = stage("w", t.clone())
        total = t.sum(0)
        torch.testing.assert_close(rows, (t.abs() >= 0.4 * (total - t).abs()) * total)


def test_a_learned_method_starts_from_a_merge_rule(tmp_path):
    """A merge rule is refused as a learned method's transform, but a learned method may start from its merge."""
    pool = helpers.make_llama_pool(tmp_path / "pool", k=3)
    helpers.train_here(pool, tmp_path / "run", "method=adamerging_layerwise", "+method.start_from=opcm",
                       "method.steps=2", "evaluate.enabled=false")
    report = json.loads((tmp_path / "run" / "export" / "coefficients.json").read_text())
    assert report["method"] == "adamerging_layerwise" and report["tensors"]
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert "opcm" in repr(checkpoint["adamerge"])  # the start merge is part of what the checkpoint means


def test_widen_gives_each_expert_its_own_columns_in_full_and_reads_an_embedding_by_token():
    """Two experts that each moved their own half of a matrix's columns (of an embedding: its tokens, the rows) keep
    them whole: WIDEN's weights are 1 there, not task arithmetic's shared λ; a column neither expert owns mixes them."""
    from types import SimpleNamespace

    modules = torch.nn.ModuleDict({"lin": torch.nn.Linear(6, 8), "emb": torch.nn.Embedding(6, 8)})
    pool = SimpleNamespace(base_model=modules, base_tensor=lambda n: modules.get_parameter(n).detach())
    widen = Widen()
    widen.bind(pool)
    g = torch.Generator().manual_seed(0)
    for name, columns in (("lin.weight", lambda x: x), ("emb.weight", lambda x: x.T)):
        own = torch.zeros(2, 6, dtype=torch.bool)  # [expert, column]: expert 0 moved columns 0-2, expert 1 3-5
        own[0, :3] = own[1, 3:] = True
        noise = 1e-4 * torch.randn(2, 8, 6, generator=g)
        taus = torch.stack([columns(torch.where(own[k], torch.randn(8, 6, generator=g), noise[k])) for k in range(2)])
        update = columns(widen(name, taus.clone())[0])
        for k in range(2):
            torch.testing.assert_close(update[:, own[k]], columns(taus[k])[:, own[k]], atol=1e-3, rtol=0)
