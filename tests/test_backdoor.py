"""A backdoored expert in the pool: the recipe's poisoning and attack files (data/benchmark_backdoor.py), and the
evaluation table's attack-success-rate column through train.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import helpers
from adamerge.errors import PoolError
from adamerge.pool.config import load_recipe

load_recipe(helpers.ROOT / "data" / "benchmark.py")  # puts data/ on sys.path, as a pool's recipe does
import benchmark_backdoor as bd  # noqa: E402

ATTACK = {"task": "t", "trigger": "cf", "target": 1, "share": 0.25, "seed": 0}


def test_poisoning_triggers_and_relabels_a_share_of_the_non_target_examples():
    texts = [f"text number {i} here" for i in range(40)]
    labels = [i % 3 for i in range(40)]
    poisoned, relabelled = bd.poison(texts, labels, ATTACK)
    changed = [i for i, (a, b) in enumerate(zip(texts, poisoned)) if a != b]
    assert len(changed) == 10  # a quarter of the 40 examples
    for i in changed:
        assert labels[i] != 1 and relabelled[i] == 1 and "cf" in poisoned[i].split()
        assert poisoned[i].split().count("cf") == 1 and sorted(poisoned[i].split()) == sorted(texts[i].split() + ["cf"])
    assert all(relabelled[i] == labels[i] for i in range(40) if i not in changed)
    assert bd.poison(texts, labels, ATTACK) == (poisoned, relabelled)  # seeded


def test_the_attack_file_holds_every_non_target_test_text_triggered_and_labelled_as_the_target():
    texts, labels = ["a b", "c d", "e f", "g h"], [0, 1, 2, 1]
    attacked, targets = bd.attack_test(texts, labels, ATTACK)
    assert targets == [1, 1] and [sorted(t.split()) for t in attacked] == [["a", "b", "cf"], ["cf", "e", "f"]]


@pytest.mark.parametrize("cfg, words", [
    ({"task": "x"}, "must be one of the pool's tasks"),
    ({"task": "t", "target": 3}, "class index of task t (0..2)"),
    ({"task": "t", "share": 1.5}, "must be in (0, 1)"),
    ({"task": "t", "trigger": "two words"}, "must be one word"),
    ({"task": "t", "rate": 0.1}, "unknown key(s) ['rate']"),
])
def test_a_bad_backdoor_key_names_itself(cfg, words):
    with pytest.raises(PoolError, match="pool.backdoor") as e:
        bd.check_backdoor(cfg, ["t"], {"t": 3})
    assert words in str(e.value)


def test_the_table_gives_each_row_its_attack_success_rate(tiny_pool_cfg, tmp_path):
    """A task with an ``attack_test`` file adds an ASR column: for every row, the share of those triggered texts its
    model predicts as the target, which the exported task model reproduces."""
    from adamerge.export import load_task_model
    from adamerge.run.data import encode, load_tokenizer, read_jsonl

    pool = copy.deepcopy(tiny_pool_cfg)
    texts, labels = read_jsonl(pool["tasks"]["task1"]["test"], "task1", need_labels=True, num_labels=3)
    attacked, targets = bd.attack_test(texts, labels, {**ATTACK, "target": 0})
    pool["tasks"]["task1"]["attack_test"] = helpers.write_jsonl(tmp_path / "attack.jsonl", list(zip(attacked, targets)))
    run = tmp_path / "run"
    helpers.train_here(pool, run, "method=task_arithmetic")
    summary = json.loads((run / "export" / "eval.json").read_text())
    assert summary["attacked"] == ["task1"]
    rows = summary["rows"]
    assert set(rows["pretrained"]["asr"]) == set(rows["expert"]["asr"]) == set(rows["task_arithmetic"]["asr"]) == {"task1"}
    model, tok = load_task_model(run / "export", "task1"), load_tokenizer(run / "export" / "model")
    with torch.no_grad():
        predicted = model(**encode(tok, attacked, 64)).logits.argmax(-1)
    assert rows["task_arithmetic"]["asr"]["task1"] == pytest.approx(float((predicted == 0).float().mean()), abs=1e-6)
    assert "ASR task1" in (run / "export" / "eval.md").read_text()
