"""Seq2seq LMs (``model_class: seq2seq_lm``): a tiny T5 pool merges with AdaMerging and Expert Merging end to
end, the objective is the first decoder step's, label words and first tokens are scored as a plain model
scores them, and bad data is named before training.

The pool: a random tiny T5 base (MiniLM's BERT tokenizer, pad 0 = decoder start, eos [SEP]) and two experts,
each the base plus a small random perturbation. ``flan=True`` gives the base an lm_head of its own (Flan-T5's
layout: ``shared`` = both stacks' ``embed_tokens``, ``lm_head`` apart); otherwise all four are one tensor.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.func import functional_call

import helpers
from adamerge.errors import ConfigError
from adamerge.evaluate import evaluate_params, load_test_sets
from adamerge.families.seq2seq import class_loglik
from adamerge.methods import get_method
from adamerge.pool.config import pool_from_config
from adamerge.run.data import encode, load_tokenizer, trim

TOPICS = ["sports", "tech", "food"]
EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")


def t5(flan: bool = False):
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=30522, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, pad_token_id=0,
                   decoder_start_token_id=0, eos_token_id=102, **({"tie_word_embeddings": False} if flan else {}))
    return T5ForConditionalGeneration(cfg).eval()


def topic_rows(n: int, seed: int) -> list[tuple[str, str]]:
    return [(text, TOPICS[y]) for text, y in helpers.make_texts(n, seed=seed)]


def make_t5_pool(tmp, flan: bool = False, n_test: int = 6) -> dict:
    """The explicit seq2seq_lm pool: s0 scored by label words (topics), s1 by its first token (a text's
    first word)."""
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(0)
    base_dir = tmp / "base"
    t5(flan).save_pretrained(base_dir)
    helpers.save_tokenizer(base_dir)
    if flan:  # a head apart from the embeddings, as Flan-T5 checkpoints have
        sd = load_file(str(base_dir / "model.safetensors"))
        sd["lm_head.weight"] = torch.randn_like(sd["shared.weight"])
        save_file(sd, str(base_dir / "model.safetensors"), metadata={"format": "pt"})
    tasks = {}
    for i in range(2):
        exp = T5ForConditionalGeneration.from_pretrained(str(base_dir))
        with torch.no_grad():
            for p in exp.parameters():  # tied names are one parameter: perturbed once
                p.add_(0.05 * torch.randn_like(p))
        exp.save_pretrained(tmp / f"e{i}")
        tasks[f"s{i}"] = {"expert": str(tmp / f"e{i}"),
                          "calibration": helpers.write_jsonl(tmp / f"c{i}.jsonl", helpers.make_texts(16, seed=i))}
    tasks["s0"].update(classes=list(TOPICS), test=helpers.write_lm_jsonl(tmp / "t0.jsonl", topic_rows(n_test, 10)))
    free = [(text, text.split()[1]) for text, _ in helpers.make_texts(n_test, seed=11)]
    tasks["s1"]["test"] = helpers.write_lm_jsonl(tmp / "t1.jsonl", free)
    return {"base": str(base_dir), "model_class": "seq2seq_lm", "head_prefixes": [], "tasks": tasks}


def merged_by_hand(pool, rep: dict) -> dict[str, torch.Tensor]:
    """base + Σ_k c_k τ_k for every merged tensor, from coefficients.json's table."""
    c = torch.tensor(rep["coefficients"])
    return {n: pool.base_tensor(n) + sum(float(c[i, k]) * pool.task_vector(t, n) for k, t in enumerate(pool.task_names))
            for i, n in enumerate(rep["tensors"])}


def first_step(model, ids, mask, start: int = 0) -> torch.Tensor:
    """The plain model's first decoder step: logits [n, vocab]."""
    dec = torch.full((ids.shape[0], 1), start, dtype=ids.dtype)
    return model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits[:, 0]


@pytest.mark.parametrize("method, flan", [("adamerging_layerwise", False), ("expert_merging", True)])
def test_train_py_merges_evaluates_and_exports_a_t5_pool(tmp_path, capsys, method, flan):
    from transformers import AutoModelForSeq2SeqLM

    cfg = make_t5_pool(tmp_path / "pool", flan=flan)
    cfg["tasks"]["s0"]["validation"] = cfg["tasks"]["s0"]["test"]  # a learned run chooses start or end by it
    out = tmp_path / "run"
    code = helpers.run_inprocess([f"method={method}", f"out_dir={out}", "trainer.max_steps=2", "data.batch_size=4",
                                  "trainer.enable_progress_bar=false"], cfg)
    assert code == 0, capsys.readouterr().err
    assert "| model | s0 | s1 | avg | norm |" in capsys.readouterr().out
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert list(rows)[:2] == ["pretrained", "expert"] and list(rows)[-1].startswith(method)
    for row in rows.values():
        assert set(row) == {"s0", "s1", "avg", "norm"} and all(0.0 <= row[t] <= 1.0 for t in ("s0", "s1"))
    selection = json.loads((out / "export" / "selection.json").read_text())
    assert set(selection["validation"]["start"]["per_task"]) == {"s0"}
    rep = json.loads((out / "export" / "coefficients.json").read_text())
    # tied names are merged once, under the base's own name; Flan-T5's separate lm_head is merged on its own
    assert "shared.weight" in rep["tensors"] and ("lm_head.weight" in rep["tensors"]) == flan
    assert not {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"} & set(rep["tensors"])
    pool = pool_from_config(cfg)
    merged = merged_by_hand(pool, rep)
    assert (merged["shared.weight"] - pool.base_tensor("shared.weight")).abs().max() > 0
    model = AutoModelForSeq2SeqLM.from_pretrained(str(out / "export" / "model")).eval()
    got = model.state_dict()
    for n, v in merged.items():
        torch.testing.assert_close(got[n], v, atol=1e-6, rtol=1e-6)
    for n in EMBEDDINGS[1:3] + (() if flan else EMBEDDINGS[3:]):  # the tied aliases carry the merged table
        torch.testing.assert_close(got[n], merged["shared.weight"], atol=1e-6, rtol=1e-6)
    assert (model.lm_head.weight is model.shared.weight) == (not flan)
    assert 'AutoModelForSeq2SeqLM.from_pretrained("export/model")' in (out / "export" / "README.md").read_text()
    tok = load_tokenizer(out / "export" / "model")
    enc = tok(["goal match team", "pizza"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = functional_call(pool.base_model, merged, args=(), kwargs={
            "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "decoder_input_ids": torch.zeros(2, 1, dtype=torch.long)}).logits[:, 0]
        torch.testing.assert_close(first_step(model, enc["input_ids"], enc["attention_mask"]), ref, atol=1e-5, rtol=1e-5)


def test_objectives_are_the_first_decoder_step_s(tmp_path):
    """AdaMerging's entropy and Expert Merging's KL on one calibration batch, against the plain model's
    first decoder step (the BERT tokenizer's token_type_ids are in the batch: T5 never sees them)."""
    from transformers import T5ForConditionalGeneration

    pool = pool_from_config(make_t5_pool(tmp_path, flan=True))
    texts = ["goal match team", "pizza", "software chip code data network cloud", "cake"]  # padded rows
    batch = trim(encode(load_tokenizer(pool.base_path), texts, max_length=16))
    assert "token_type_ids" in batch and int(batch["attention_mask"].sum(1).min()) < batch["input_ids"].shape[1]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    m = get_method("adamerging")(pool, {"name": "adamerging", "granularity": "layer"}, {})
    with torch.no_grad():
        m.merged.coefficients.raw.uniform_(0, 1)
        coefs = m.merged.coefficients()
        merged = {n: pool.base_tensor(n) + sum(coefs[i][k] * m.merged.task_vectors[n][k] for k in range(2))
                  for i, n in enumerate(m.merged.names)}
        plain = T5ForConditionalGeneration.from_pretrained(pool.base_path).eval()
        plain.load_state_dict(merged, strict=False)
        logits, mask_out = m.task_logits("s0", batch)
        assert logits.shape == (4, 30522) and mask_out is None
        logp = first_step(plain, ids, mask).log_softmax(-1)
        torch.testing.assert_close(m.task_loss("s0", batch), -(logp.exp() * logp).sum(-1).mean(), atol=1e-5, rtol=1e-5)
        em = get_method("expert_merging")(pool, {"name": "expert_merging", "reg_weight": 0.0}, {})
        s = em.merged.coefficients()
        plain.load_state_dict({n: pool.base_tensor(n) + sum(s[i][k] * em.merged.task_vectors[n][k] for k in range(2))
                               for i, n in enumerate(em.merged.names)}, strict=False)
        student = first_step(plain, ids, mask)
        plain.load_state_dict(dict(pool.iter_expert_state("s0")), strict=False)
        teacher = first_step(plain, ids, mask)
        kl = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean")
        torch.testing.assert_close(em.task_loss("s0", batch), kl / 2, atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match=r"method.hidden_layers.*only logits are aligned"):
        get_method("expert_merging")(pool, {"name": "expert_merging", "hidden_layers": [1]}, {})


@pytest.mark.parametrize("name", ["regmean", "fisher_merging"])
def test_closed_form_statistics_run_the_first_decoder_step(pool_dir, name):
    """RegMean's Grams and Fisher's sampled answers come from the same one-step forward (without a decoder
    input T5 refuses to run): the merge is finite and not the plain average the statistics would leave."""
    pool = pool_from_config(pool_dir[1])
    m = get_method(name)(pool, {"name": name, "num_examples": 4, "batch_size": 2}, {})
    merged = m.merged.merged_params()
    n = "decoder.block.1.layer.1.EncDecAttention.k.weight"  # cross-attention: reads the encoder's states
    average = pool.base_tensor(n) + sum(pool.task_vector(t, n) for t in pool.task_names) / 2
    assert torch.isfinite(merged[n]).all() and not torch.allclose(merged[n], average, atol=1e-6)


def hand_loglik(model, prompt: list[int], word: list[int]) -> float:
    """Σ_j log p(word_j | input, word_<j): one unpadded forward, the decoder fed start + the word."""
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([[0] + word[:-1]])).logits[0]
    return sum(float(logp.double().log_softmax(-1)[j, w]) for j, w in enumerate(word))


def test_label_words_and_first_tokens_are_scored_as_the_plain_model_scores_them(tmp_path):
    from transformers import T5ForConditionalGeneration

    cfg = make_t5_pool(tmp_path, n_test=8)
    names = ["sports", "software chip", "food"]  # a two-token label word
    cfg["tasks"]["s0"].update(classes=names, test=helpers.write_lm_jsonl(
        tmp_path / "t0.jsonl", [(t, {"tech": "software chip"}.get(y, y)) for t, y in topic_rows(8, 10)]))
    tok = load_tokenizer(cfg["base"])
    expert = T5ForConditionalGeneration.from_pretrained(cfg["tasks"]["s0"]["expert"]).eval()
    texts = [t for t, _ in helpers.make_texts(8, seed=3)]
    prompts = [tok(t)["input_ids"] for t in texts]
    with torch.no_grad():  # the first token generate() gives, input by input
        firsts = [int(expert.generate(torch.tensor([p]), max_new_tokens=1, do_sample=False)[0, 1]) for p in prompts]
    # s1: half the targets start with the expert's own first token (as text), half do not
    own = [tok.decode([f]) for f in firsts]
    targets = [o if i % 2 == 0 and tok(o, add_special_tokens=False)["input_ids"][:1] == [f] else "zebra"
               for i, (o, f) in enumerate(zip(own, firsts))]
    cfg["tasks"]["s1"]["test"] = helpers.write_lm_jsonl(tmp_path / "t1.jsonl", list(zip(texts, targets)))
    pool = pool_from_config(cfg)
    params = dict(pool.iter_expert_state("s0"))  # the expert's weights through functional_call on the base
    words = [tok(w, add_special_tokens=False)["input_ids"] for w in names]
    assert len(words[1]) == 2
    rows = [json.loads(line) for line in open(cfg["tasks"]["s0"]["test"])]
    enc = [tok(r["text"])["input_ids"] for r in rows]
    hand = torch.tensor([[hand_loglik(expert, p, w) for w in words] for p in enc], dtype=torch.float64)
    torch.testing.assert_close(class_loglik(pool.base_model, params, enc, words, batch_size=7), hand,
                               atol=1e-4, rtol=1e-5)  # inputs padded, two inputs per batch
    tests = load_test_sets(pool, tok)
    acc = evaluate_params(pool.base_model, lambda t: params, tests, batch_size=5)
    picked = hand.argmax(1).tolist()
    assert acc["s0"] == pytest.approx(sum(names[c] == r["target"] for c, r in zip(picked, rows)) / len(rows))
    expected = sum(tok(t, add_special_tokens=False)["input_ids"][0] == f for t, f in zip(targets, firsts)) / len(texts)
    assert 0 < expected < 1 and acc["s1"] == pytest.approx(expected)


BAD = {
    "empty target": ('{"text": "goal match", "target": "\\u0001"}',
                     r"task 's1': test file .*bad.jsonl line 3: target '\\x01' has no tokens under the base model's "
                     r"tokenizer, so there is nothing to score; write the expected answer as words the tokenizer keeps"),
    "no target": ('{"text": "goal match"}',
                  r"task 's1': test file .*bad.jsonl line 3 has no 'target' \(needed for evaluation\); add the expected "
                  r"answer"),
    "no text": ('{"target": "sports"}',
                r"task 's0': test file .*bad.jsonl line 3 is not a JSON object with a string 'text' field"),
    "target not a class": ('{"text": "goal match", "target": "music"}',
                           r"task 's0': test file .*bad.jsonl line 3: target 'music' is not one of the task's classes "
                           r"\['sports', 'tech', 'food'\]; fix the target or pool tasks.s0.classes"),
    "empty label word": (None, r"pool.tasks.s0.classes: '\\x01' has no tokens; give a non-empty word"),
}


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("t5")
    return tmp, make_t5_pool(tmp)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_seq2seq_data_is_one_line_before_training(pool_dir, tmp_path, capsys, case):
    line, pattern = BAD[case]
    tmp, cfg = pool_dir
    cfg = json.loads(json.dumps(cfg))
    task = re.search(r"(?:task '|tasks\.)(\w+)", pattern).group(1)
    if line is None:
        cfg["tasks"][task]["classes"] = ["sports", "\x01", "food"]
    else:
        helpers.replace_test_line(cfg, task, line, tmp_path)
    out = tmp_path / "run"
    code = helpers.run_inprocess(["method=adamerging_layerwise", f"out_dir={out}", "trainer.max_steps=2"], cfg)
    helpers.assert_refused_in_one_line(code, capsys, pattern, out)


@pytest.mark.parametrize("overrides, pattern", [
    (["method=expert_merging", "method.hidden_layers=[1]"],
     r"config key 'method.hidden_layers': in a seq2seq_lm pool only logits are aligned"),
    (["method=fw_merging_soft", "method.objective=cross_entropy"],
     r"method.objective=cross_entropy needs classifier heads; a seq2seq_lm pool has none"),
])
def test_what_a_family_lacks_is_refused_by_what_it_declares(pool_dir, tmp_path, capsys, overrides, pattern):
    """Methods ask the pool's family (hidden_states, classifier_heads), not its model_class string."""
    out = tmp_path / "run"
    code = helpers.run_inprocess([*overrides, f"out_dir={out}", "trainer.max_steps=2"], pool_dir[1])
    helpers.assert_refused_in_one_line(code, capsys, pattern, out)
