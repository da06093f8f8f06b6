"""OTA merging with Fast Fisher Grafting (adamerge/methods/ota.py) through train.py: equal to the authors' code on the
experts' optimizer states, the Fisher in their place, and the refusals."""

from __future__ import annotations

import json

import torch
from peer_pool import (
    OTA_THRESHOLDS,
    PEER_CASES,
    make_seeded_llama_pool,
    model_tensors,
    write_optimizer_states,
)
from safetensors.torch import load_file, save_file

import helpers


def test_ota_equals_the_authors_merge_on_the_experts_optimizer_states(tmp_path):
    """With each task's Adam exp_avg_sq and the authors' per-model thresholds, the export is the authors' OTAMergeTask
    output (pmahdavi/ota-merge; tests/fixtures/ota_merges.safetensors, written by bench/crosscheck.py) to the last bit,
    including the entries every expert masks, which keep the base."""
    pool = write_optimizer_states(make_seeded_llama_pool(tmp_path / "pool"), tmp_path / "states")
    helpers.train_here(pool, tmp_path / "run", *PEER_CASES["ota_merging"].adamerge, "evaluate.enabled=false")
    got = model_tensors(tmp_path / "run" / "export" / "model")
    want = {n.split("/", 1)[1]: t for n, t in load_file(str(helpers.ROOT / "tests" / "fixtures" / "ota_merges.safetensors")).items()}
    assert len(want) == 5
    for n, t in want.items():
        assert torch.equal(got[n], t), (n, (got[n] - t).abs().max())
    base = model_tensors(tmp_path / "pool" / "base")
    assert (got["model.layers.0.self_attn.q_proj.weight"] == base["model.layers.0.self_attn.q_proj.weight"]).any()
    report = json.loads((tmp_path / "run" / "export" / "coefficients.json").read_text())
    assert report["curvature"] == "optimizer_state"
    assert set(report["kept_share"]) == set(OTA_THRESHOLDS) and all(0.2 < s < 0.8 for s in report["kept_share"].values())


def test_without_optimizer_states_ota_grafts_on_the_fisher_keeping_the_density(tmp_path):
    pool = helpers.make_pool(tmp_path / "pool", k=2)
    helpers.train_here(pool, tmp_path / "run", "method=ota_merging", "method.num_examples=8", "method.density=0.005",
                       "evaluate.enabled=false")
    report = json.loads((tmp_path / "run" / "export" / "coefficients.json").read_text())
    assert report["curvature"] == "fisher"
    # a density below the share of entries the calibration texts reach (most of the vocabulary's embeddings they
    # do not: no saliency, never kept)
    assert all(abs(s - 0.005) < 2e-4 for s in report["kept_share"].values()), report["kept_share"]


def test_optimizer_states_for_some_tasks_only_or_missing_a_tensor_are_refused_in_one_line(tmp_path, capsys):
    pool = write_optimizer_states(make_seeded_llama_pool(tmp_path / "pool"), tmp_path / "states")
    some = json.loads(json.dumps(pool))
    del some["tasks"]["lm2"]["optimizer_state"]
    capsys.readouterr()
    assert helpers.run_inprocess([f"out_dir={tmp_path}/a", "method=ota_merging", "evaluate.enabled=false"], some) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lm2 do not" in err and "optimizer_state" in err, err
    state = pool["tasks"]["lm1"]["optimizer_state"]
    tensors = load_file(state)
    del tensors["model.norm.weight"]
    save_file(tensors, state)
    assert helpers.run_inprocess([f"out_dir={tmp_path}/b", "method=ota_merging", "evaluate.enabled=false"], pool) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lm1" in err and state in err and "model.norm.weight" in err, err
    assert not (tmp_path / "a" / "export").exists() and not (tmp_path / "b" / "export").exists()


def test_a_threshold_missing_for_a_task_is_refused_in_one_line_before_any_curvature(tmp_path, capsys):
    pool = write_optimizer_states(make_seeded_llama_pool(tmp_path / "pool"), tmp_path / "states")
    capsys.readouterr()
    code = helpers.run_inprocess([f"out_dir={tmp_path}/run", "method=ota_merging", "method.density=null",
                                  "method.threshold={lm0:1e-8,lm1:1e-8}", "evaluate.enabled=false"], pool)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no value for task(s) lm2" in err, err
    assert not (tmp_path / "run" / "export").exists()
