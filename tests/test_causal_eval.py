"""Causal LMs get the classifiers' per-task table: label-word scoring (``classes``) and exact match of a
greedy generation, each against a direct computation, end to end through train.py, and bad data named
before training."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import helpers
from adamerge.evaluate import evaluate_params, load_test_sets
from adamerge.families import get_family
from adamerge.families.causal import class_loglik, greedy_generate, lm_accuracy
from adamerge.pool.config import pool_from_config
from adamerge.pool.model_pool import PoolError
from adamerge.run.data import load_tokenizer

TOPICS = ["sports", "tech", "food"]


class Bigram(nn.Module):
    """A causal LM whose next-token logits depend on the current token only: logits = W[token]."""

    def __init__(self, vocab: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, vocab)
        nn.init.zeros_(self.emb.weight)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.emb(input_ids))


class Prior(nn.Module):
    """A causal LM that ignores its input: the same next-token logits everywhere."""

    def __init__(self, vocab: int = 30522):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(vocab))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


def topic_rows(n: int, seed: int) -> list[tuple[str, str]]:
    return [(text, TOPICS[y]) for text, y in helpers.make_texts(n, seed=seed)]


def lm_pool(tmp, classes=("sports", "tech", "food"), n_test: int = 6, tie: bool = True) -> dict:
    """The tiny Llama pool; lm0 scored by label words (test: topic words), lm1 by exact match."""
    cfg = helpers.make_llama_pool(tmp, tie=tie)
    cfg["tasks"]["lm0"].update(classes=list(classes),
                               test=helpers.write_lm_jsonl(tmp / "t0.jsonl", topic_rows(n_test, 10)))
    free = [(text, text.split()[1]) for text, _ in helpers.make_texts(n_test, seed=11)]
    cfg["tasks"]["lm1"]["test"] = helpers.write_lm_jsonl(tmp / "t1.jsonl", free)
    return cfg


def hand_loglik(model, prompt_ids: list[int], word_ids: list[int]) -> float:
    """Σ_j log p(word_j | prompt, word_<j) with one unpadded forward of the whole sequence."""
    ids = torch.tensor([prompt_ids + word_ids])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
    return sum(float(logp[len(prompt_ids) - 1 + j, w]) for j, w in enumerate(word_ids))


def test_label_word_scoring_equals_a_hand_computation(tmp_path):
    from transformers import LlamaForCausalLM

    cfg = lm_pool(tmp_path, classes=("sports", "software chip", "food"))  # a two-token label word
    cfg["tasks"]["lm0"]["test"] = helpers.write_lm_jsonl(
        tmp_path / "t0.jsonl", [(t, {"tech": "software chip"}.get(y, y)) for t, y in topic_rows(6, 10)])
    pool = pool_from_config(cfg)
    tok = load_tokenizer(pool.base_path, causal=True)
    expert = LlamaForCausalLM.from_pretrained(cfg["tasks"]["lm0"]["expert"]).eval()
    params = dict(pool.iter_expert_state("lm0"))  # the expert's weights through functional_call on the base
    words = [tok(w, add_special_tokens=False)["input_ids"] for w in ("sports", "software chip", "food")]
    assert len(words[1]) == 2
    rows = [json.loads(line) for line in open(cfg["tasks"]["lm0"]["test"])]
    prompts = [tok(r["text"])["input_ids"] for r in rows]
    ours = class_loglik(pool.base_model, params, prompts[:2], words, pad_id=0, batch_size=4)  # rows padded
    hand = torch.tensor([[hand_loglik(expert, p, w) for w in words] for p in prompts[:2]], dtype=torch.float64)
    torch.testing.assert_close(ours, hand, atol=1e-4, rtol=1e-5)
    # the accuracy over the whole file: argmax of the hand log-likelihoods against the targets
    names = ["sports", "software chip", "food"]
    hits = [max(range(3), key=lambda c: hand_loglik(expert, p, words[c])) == names.index(r["target"])
            for p, r in zip(prompts, rows)]
    ts = load_test_sets(pool, tok)["lm0"]
    assert sorted(ts.prompts) == sorted(prompts) and ts.classes == words
    assert lm_accuracy(pool.base_model, params, ts, batch_size=5) == pytest.approx(sum(hits) / len(hits))


def test_a_model_that_prefers_one_class_scores_that_class_s_share(tmp_path):
    cfg = lm_pool(tmp_path, n_test=9)
    pool = pool_from_config(cfg)
    tok = load_tokenizer(pool.base_path, causal=True)
    ts = load_test_sets(pool, tok)["lm0"]
    model = Prior()
    for word in ("food", "tech"):
        w = torch.zeros(30522)
        w[tok(word, add_special_tokens=False)["input_ids"][0]] = 5.0  # after any token, the most likely
        share = sum(t == word for t in ts.targets) / len(ts)
        assert 0 < share < 1
        assert lm_accuracy(model, {"logits": w}, ts, batch_size=4) == pytest.approx(share)


def test_greedy_generation_pads_on_the_right_and_stops_at_eos():
    model = Bigram(16)
    w = torch.zeros(16, 16)
    for a, b in ((5, 6), (6, 7), (7, 8), (9, 5), (3, 4)):
        w[a, b] = 3.0
    gen = greedy_generate(model, {"emb.weight": w}, [[5], [3, 9, 5], [3]], max_new=[3, 1, 2], pad_id=0,
                          eos_id=7, batch_size=8)
    assert gen == [[6], [6], [4, 0]]  # 5→6→eos; one token; 3→4, then all-zero logits give token 0


def test_decoding_with_the_key_value_cache_equals_rerunning_the_prefix(tmp_path):
    """A transformers LM decodes with its cache from left-padded prompts; the tokens are those of the plain
    loop that reruns the right-padded prefix at every step (prompts of different lengths in one batch)."""
    from transformers import LlamaForCausalLM

    from adamerge.families.causal import greedy_tokens, greedy_tokens_cached

    model = LlamaForCausalLM.from_pretrained(lm_pool(tmp_path, tie=False)["base"]).eval()
    g = torch.Generator().manual_seed(0)
    params = {n: p + 0.01 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}  # a merge's
    prompts = [torch.randint(1000, 3000, (int(n),), generator=g).tolist() for n in torch.randint(1, 9, (16,), generator=g)]
    cached = greedy_tokens_cached(model, params, prompts, 8, pad_id=0)
    assert torch.equal(cached, greedy_tokens(model, params, prompts, 8, pad_id=0))
    assert len({tuple(row) for row in cached.tolist()}) > 8  # the continuations depend on their prompts
    assert torch.equal(cached[1], torch.tensor(hand_greedy(lambda **kw: torch.func.functional_call(
        model, params, args=(), kwargs=kw), prompts[1], 8)))


def hand_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_exact_match_of_the_model_s_own_greedy_output(tmp_path):
    from transformers import LlamaForCausalLM

    cfg = lm_pool(tmp_path, tie=False)  # tied, the random model repeats the prompt's last token
    base_dir = cfg["base"]
    tok = load_tokenizer(base_dir, causal=True)
    model = LlamaForCausalLM.from_pretrained(base_dir).eval()
    rows = []
    for text, _ in helpers.make_texts(40, seed=3):
        text = " ".join(text.split()[: 2 + len(rows) % 4])  # prompts of different lengths: padded batches
        gen = hand_greedy(model, tok(text)["input_ids"], 2)
        target = tok.decode(gen, skip_special_tokens=True)
        if tok(target, add_special_tokens=False)["input_ids"] == gen:  # the text gives back the same 2 tokens
            rows.append((text, target))
        if len(rows) == 6:
            break
    assert len(rows) == 6
    cfg["tasks"]["lm1"]["test"] = helpers.write_lm_jsonl(tmp_path / "own.jsonl", rows)
    pool = pool_from_config(cfg)
    ts = load_test_sets(pool, tok, max_new_tokens=16)["lm1"]
    assert ts.max_new == [2] * 6
    assert lm_accuracy(pool.base_model, {}, ts, batch_size=4) == 1.0
    # capped at one new token, no two-token target is matched
    assert lm_accuracy(pool.base_model, {}, load_test_sets(pool, tok, max_new_tokens=1)["lm1"]) == 0.0
    wrong = [(text, target.split()[0] + " zebra") for text, target in rows]
    cfg["tasks"]["lm1"]["test"] = helpers.write_lm_jsonl(tmp_path / "wrong.jsonl", wrong)
    pool = pool_from_config(cfg)
    assert evaluate_params(pool.base_model, lambda t: {}, load_test_sets(pool, tok))["lm1"] == 0.0


def rows_of(out):
    return json.loads((out / "eval.json").read_text())


@pytest.mark.parametrize("method", ["adamerging_layerwise", "task_arithmetic"])
def test_train_py_prints_and_saves_the_table_for_a_causal_lm_pool(tmp_path, capsys, method):
    cfg = lm_pool(tmp_path / "pool")
    cfg["tasks"]["lm0"]["validation"] = cfg["tasks"]["lm0"]["test"]  # a learned run chooses start or end by it
    out = tmp_path / "run"
    code = helpers.run_inprocess([f"method={method}", f"out_dir={out}", "trainer.max_steps=2", "data.batch_size=4",
                                  "evaluate.max_new_tokens=4", "trainer.enable_progress_bar=false"], cfg)
    assert code == 0, capsys.readouterr().err
    summary = rows_of(out)
    assert summary["tasks"] == ["lm0", "lm1"]
    rows = summary["rows"]
    learned = method == "adamerging_layerwise"
    assert len(rows) == (4 if learned else 3)
    assert list(rows)[:2] == ["pretrained", "expert"] and list(rows)[-1].startswith(method)
    for row in rows.values():
        assert set(row) == {"lm0", "lm1", "avg", "norm"} and all(0.0 <= row[t] <= 1.0 for t in ("lm0", "lm1"))
    assert "| model | lm0 | lm1 | avg | norm |" in capsys.readouterr().out
    assert json.loads((out / "export" / "eval.json").read_text()) == summary
    if learned:
        selection = json.loads((out / "export" / "selection.json").read_text())
        assert set(selection["validation"]["start"]["per_task"]) == {"lm0"}
    # the pretrained row is the label-word accuracy of the base model itself
    pool = pool_from_config(cfg)
    tests = load_test_sets(pool, load_tokenizer(pool.base_path, causal=True), max_new_tokens=4)
    assert rows["pretrained"]["lm0"] == pytest.approx(lm_accuracy(pool.base_model, {}, tests["lm0"]))


BAD = {
    "no target": ('{"text": "goal match"}',
                  r"task 'lm1': test file .*bad.jsonl line 3 has no 'target' \(needed for evaluation\); add the "
                  r"expected answer"),
    "target not a class": ('{"text": "goal match", "target": "music"}',
                           r"task 'lm0': test file .*bad.jsonl line 3: target 'music' is not one of the task's "
                           r"classes \['sports', 'tech', 'food'\]; fix the target or pool tasks.lm0.classes"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_causal_lm_test_data_is_one_line_before_training(tmp_path, capsys, case):
    line, pattern = BAD[case]
    cfg = lm_pool(tmp_path)
    task = re.search(r"task '(\w+)'", pattern).group(1)
    helpers.replace_test_line(cfg, task, line, tmp_path)
    out = tmp_path / "run"
    code = helpers.run_inprocess(["method=adamerging_layerwise", f"out_dir={out}", "trainer.max_steps=2"], cfg)
    helpers.assert_refused_in_one_line(code, capsys, pattern, out)


@pytest.mark.parametrize("classes, model_class, pattern", [
    (["sports"], "causal_lm", r"two or more label words"),
    (["sports", " sports"], "causal_lm", r"label words must differ"),
    (["a", 3], "causal_lm", r"two or more label words \(non-empty strings\)"),
    (["a", "b"], "sequence_classification", r"apply to causal_lm and seq2seq_lm pools only"),
])
def test_bad_classes_are_refused(classes, model_class, pattern):
    with pytest.raises(PoolError, match=r"pool.tasks.t.classes.*" + pattern):
        get_family(model_class).check_classes("t", classes)
