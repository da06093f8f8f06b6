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


def test_the_attack_files_hold_every_non_target_test_text_with_and_without_the_trigger_labelled_as_the_target():
    texts, labels = ["a b", "c d", "e f", "g h"], [0, 1, 2, 1]
    files = bd.attack_files(texts, labels, ATTACK)
    attacked, targets = files["attack_test"]
    assert targets == [1, 1] and [sorted(t.split()) for t in attacked] == [["a", "b", "cf"], ["cf", "e", "f"]]
    assert files["attack_clean"] == (["a b", "e f"], [1, 1])


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


def test_the_table_gives_each_row_its_attack_success_rate_and_clean_target_rate(tiny_pool_cfg, tmp_path):
    """A task with attack files adds two columns: for every row, the share of the triggered texts (ASR) and of the
    same texts without the trigger (clean→target) its model predicts as the target, which the exported task model
    reproduces."""
    from adamerge.export import load_task_model
    from adamerge.run.data import encode, load_tokenizer, read_jsonl

    pool = copy.deepcopy(tiny_pool_cfg)
    texts, labels = read_jsonl(pool["tasks"]["task1"]["test"], "task1", need_labels=True, num_labels=3)
    files = bd.attack_files(texts, labels, {**ATTACK, "target": 0})
    for key, (attack_texts, targets) in files.items():
        pool["tasks"]["task1"][key] = helpers.write_jsonl(tmp_path / f"{key}.jsonl", list(zip(attack_texts, targets)))
    run = tmp_path / "run"
    helpers.train_here(pool, run, "method=task_arithmetic")
    summary = json.loads((run / "export" / "eval.json").read_text())
    assert summary["extra"] == {"asr": ["task1"], "clean_to_target": ["task1"]}
    rows = summary["rows"]
    for key in ("asr", "clean_to_target"):
        assert set(rows["pretrained"][key]) == set(rows["expert"][key]) == set(rows["task_arithmetic"][key]) == {"task1"}
    model, tok = load_task_model(run / "export", "task1"), load_tokenizer(run / "export" / "model")
    for key, column in (("attack_test", "asr"), ("attack_clean", "clean_to_target")):
        with torch.no_grad():
            predicted = model(**encode(tok, files[key][0], 64)).logits.argmax(-1)
        assert rows["task_arithmetic"][column]["task1"] == pytest.approx(float((predicted == 0).float().mean()), abs=1e-6)
    assert "ASR task1 | clean→target task1 |" in (run / "export" / "eval.md").read_text()


def test_a_backdoored_pool_builds_only_the_poisoned_expert_and_caches_every_expert(tmp_path, monkeypatch):
    """The recipe builds the attacked task's expert under its own key beside the clean experts, which keep the form's
    key (so that the clean pool's cache serves them); a second build builds nothing."""
    bm = load_recipe(helpers.ROOT / "data" / "benchmark.py")
    built = []

    def fake_build(task, form, target, key, save_tokenizer, **train_kw):  # the cache bookkeeping, no training
        built.append((task, key, train_kw.get("backdoor")))
        target.mkdir(parents=True, exist_ok=True)
        (target / "expert_info.json").write_text(json.dumps({"cache_key": key}))

    monkeypatch.setattr(bm, "_build_expert", fake_build)
    cfg = {"form": "full", "tasks": ["bbc_news", "rotten_tomatoes", "chatterbot_topic"], "cache_dir": str(tmp_path),
           "backdoor": {"task": "rotten_tomatoes"}}
    spec = bm.build(cfg)
    key = bm.cache_key("full", 120, 0, 64)
    assert [(t, k == key, b is not None) for t, k, b in built] == [("bbc_news", True, False),
                                                                  ("rotten_tomatoes", False, True),
                                                                  ("chatterbot_topic", True, False)]
    attacked = spec["tasks"]["rotten_tomatoes"]
    assert {"attack_test", "attack_clean"} <= set(attacked) and "attack_test" not in spec["tasks"]["bbc_news"]
    built.clear()
    assert bm.build(cfg) == spec and built == []
