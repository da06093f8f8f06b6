"""Twin-Merging (adamerge/methods/twin.py) and the routed model it exports (adamerge/routed.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peer_pool import model_tensors
from torch.func import functional_call

import helpers
from adamerge.routed import load

MARKERS = ("weather", "music", "money")  # one word every text of a task starts with: what the router can learn


@pytest.fixture(scope="module")
def pool3(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pool3")
    pool = helpers.make_pool(tmp, k=3, n_cal=48, n_test=24)
    for k, spec in enumerate(pool["tasks"].values()):
        for split in ("calibration", "test"):
            rows = [json.loads(line) for line in open(spec[split])]
            helpers.write_jsonl(tmp / f"{k}_{split}.jsonl", [(f"{MARKERS[k]} {r['text']}", r["label"]) for r in rows])
            spec[split] = str(tmp / f"{k}_{split}.jsonl")
    return pool


def test_routed_to_one_task_the_model_is_the_shared_merge_plus_that_tasks_exclusive_delta(pool3, tmp_path):
    """With the whole spectrum kept and the router's weight on task k, every Linear of the loaded routed model acts
    as θ* + (τ_k − λ Σ τ): the shared merge with task k's own Linear weights and biases."""
    helpers.train_here(pool3, tmp_path / "run", "method=twin_merging", "method.density=1.0", "method.router_epochs=5",
                       "evaluate.enabled=false")
    routed = load(tmp_path / "run" / "export")
    base = routed.model
    batch = {k: v[:4] for k, v in base_batch(pool3).items()}
    for k, task in enumerate(routed.tasks):
        expert = model_tensors(Path(pool3["tasks"][task]["expert"]))
        linear = {n: expert[n] for n in dict(base.named_parameters())
                  if n in expert and n.rpartition(".")[0] in {m.rpartition(".")[0] for m in routed.twins}}
        want = functional_call(base, {**linear, **routed.heads[task]}, args=(), kwargs=batch).logits
        routed.weights = torch.nn.functional.one_hot(torch.tensor([k] * 4), 3).float()
        got = functional_call(base, routed.heads[task], args=(), kwargs=batch, strict=False).logits
        routed.weights = None
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_the_router_learns_the_tasks_and_the_table_has_the_routed_row(pool3, tmp_path):
    helpers.train_here(pool3, tmp_path / "run", "method=twin_merging", "method.router_epochs=100")
    report = json.loads((tmp_path / "run" / "export" / "coefficients.json").read_text())["twin_merging"]
    assert all(share > 0.9 for share in report["router_test_accuracy"].values()), report
    rows = json.loads((tmp_path / "run" / "eval.json").read_text())["rows"]
    assert {"twin_merging", "twin_merging routed (no task id)", "twin_merging routed, the task's own head"} <= set(rows)
    for task, acc in rows["twin_merging routed (no task id)"].items():  # both right is at most the head given right
        assert acc <= rows["twin_merging routed, the task's own head"][task]


def base_batch(pool: dict) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pool["base"])
    texts = [json.loads(line)["text"] for line in open(next(iter(pool["tasks"].values()))["test"])]
    return dict(tok(texts, padding=True, return_tensors="pt"))


def test_a_pool_without_classifier_heads_is_refused_in_one_line(tmp_path, capsys):
    from peer_pool import make_seeded_llama_pool

    pool = make_seeded_llama_pool(tmp_path / "llama", k=2)
    capsys.readouterr()
    code = helpers.run_inprocess([f"out_dir={tmp_path}/run", "method=twin_merging", "evaluate.enabled=false"], pool)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "twin_merging routes classifier heads" in err, err
