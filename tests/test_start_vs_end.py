"""A learned merge is compared with its start: calibration objective always, validation accuracy when a
task has a validation file; the better merge is exported."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

import helpers
from adamerge.evaluate import accuracy, load_test_sets
from adamerge.families.classifier import ClassifierTestSet
from adamerge.methods import get_method
from adamerge.run.data import load_tokenizer
from adamerge.run.monitors import calibration_objective, holdout_objective, monitor_batches
from adamerge.run.start_vs_end import choose
from adamerge.run.states import merged_at, snapshot


def _method(pool):
    return get_method("adamerging")(pool, {"name": "adamerging", "id": "am", "granularity": "layer", "init": 0.3})


def _in(method, state):
    """``method`` loaded with ``state`` (a copy of it: the method's own state is not touched)."""
    import copy

    other = copy.deepcopy(method)
    other.load_state_dict(state)
    return other


def _labelled_by(method, pool, state, sets):
    """The same inputs, labelled with the predictions of the merge in ``state`` (100% accurate by construction)."""
    params = merged_at(method, state)
    out = {}
    for task, (enc, _, n_cls) in sets.items():
        with torch.no_grad():
            logits = torch.func.functional_call(pool.base_model, {**params, **pool.head(task)}, args=(), kwargs=enc).logits
        out[task] = ClassifierTestSet(enc, logits.argmax(-1), n_cls)
    return out


def test_the_better_of_start_and_end_is_kept(pool):
    tok = load_tokenizer(pool.base_path)
    tests = load_test_sets(pool, tok, max_length=16)
    m = _method(pool)
    start = snapshot(m)
    batches = monitor_batches({t: enc for t, (enc, _, _) in tests.items()}, 4, seed=0, n=2)
    start_loss = calibration_objective(m, batches)
    val = _labelled_by(m, pool, start, tests)  # validation labels = the start merge's predictions

    def end_accuracy(end):
        params = merged_at(m, end)
        return min(accuracy(lambda b, t=t: torch.func.functional_call(
            pool.base_model, {**params, **pool.head(t)}, args=(), kwargs=b).logits, *val[t]) for t in val)

    gen = torch.Generator().manual_seed(0)
    for scale in (3.0, 10.0, 30.0, 100.0):  # "training" moved the coefficients far from the start
        with torch.no_grad():
            m.merged.coefficients.raw.copy_(scale * torch.randn(m.merged.coefficients.raw.shape, generator=gen))
        end = snapshot(m)
        if end_accuracy(end) < 1.0:
            break
    assert end_accuracy(end) < 1.0  # precondition: the end predicts differently somewhere

    out = choose(m, start, start_loss, batches, val, batch_size=8)
    assert out["exported"] == "start" and out["validation"]["start"]["val_acc"] == 1.0
    assert out["calibration_objective"]["start"] == start_loss
    torch.testing.assert_close(m.merged.coefficients.raw, start["merged.coefficients.raw"])

    # labels from the end's predictions: the end is kept
    m.load_state_dict(end)
    out = choose(m, start, start_loss, batches, _labelled_by(m, pool, end, tests), batch_size=8)
    assert out["exported"] == "end"
    torch.testing.assert_close(m.merged.coefficients.raw, end["merged.coefficients.raw"])

    # a monitored best checkpoint whose predictions are the labels: it is kept, by val_norm too
    best = {k: v.clone() for k, v in end.items()}
    best["merged.coefficients.raw"] = torch.full_like(end["merged.coefficients.raw"], 0.6)
    val = _labelled_by(m, pool, best, tests)
    if min(v["val_acc"] for k, v in choose(m, start, start_loss, batches, val, 8)["validation"].items()) == 1.0:
        pytest.skip("start, end and the best checkpoint predict alike on this pool")
    m.load_state_dict(end)
    out = choose(m, start, start_loss, batches, val, batch_size=8, best=best, metric="val_norm",
                 expert={t: 1.0 for t in val})
    assert out["exported"] == "best" and out["validation"]["best"]["val_norm"] == 1.0
    torch.testing.assert_close(m.merged.coefficients.raw, best["merged.coefficients.raw"])

    # by the held-out objective (no labels): the lowest of start, best and end is exported, whichever it is
    holdout = {t: [enc] for t, (enc, _, _) in tests.items()}
    for states in ((start, end), (end, start)):
        m.load_state_dict(states[1])
        out = choose(m, states[0], start_loss, batches, val, batch_size=8, best=best, metric="holdout_objective",
                     holdout=holdout)
        objective = {w: holdout_objective(m_, holdout) for w, m_ in
                     (("start", _in(m, states[0])), ("best", _in(m, best)), ("end", _in(m, states[1])))}
        assert out["holdout_objective"] == pytest.approx(objective, rel=1e-6)
        assert out["exported"] == min(objective, key=objective.get) and "validation" in out
        torch.testing.assert_close(m.merged.coefficients.raw,
                                   {"start": states[0], "best": best, "end": states[1]}[out["exported"]]
                                   ["merged.coefficients.raw"])

    # without validation files the end is exported, and the record says why, whichever way the objective went
    for claimed_start in (float("inf"), float("-inf")):
        out = choose(m, start, claimed_start, batches, None, batch_size=8)
        assert out["exported"] == "end" and "no task has a validation file" in out["why"]


def test_train_py_reports_start_and_end(tmp_path, tiny_pool_cfg, capsys, caplog):
    pool_cfg = json.loads(json.dumps(tiny_pool_cfg))
    for t in pool_cfg["tasks"].values():
        t["validation"] = t["test"]
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="adamerge"):
        helpers.train_here(pool_cfg, out, "method=adamerging_layerwise", "trainer.max_steps=3", "data.batch_size=4",
                           "data.max_length=16", "trainer.enable_progress_bar=false")
    sel = json.loads((out / "export" / "selection.json").read_text())
    assert set(sel["calibration_objective"]) == {"start", "end"} and sel["exported"] in ("start", "end")
    assert set(sel["validation"]) == {"start", "end"}
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert "start: task_arithmetic λ=0.3" in rows  # the start row beside the learned one
    assert "calibration objective: start" in caplog.text + capsys.readouterr().err


def _pool_with_validation(tmp_path, tiny_pool_cfg) -> dict:
    """The tiny pool with validation files: each task's test texts labelled by its own expert's predictions
    (each expert is right by construction, so val_norm is a merge's agreement with the experts)."""
    from adamerge.pool.config import pool_from_config
    from adamerge.run.data import read_jsonl

    pool_cfg = json.loads(json.dumps(tiny_pool_cfg))
    pool = pool_from_config(pool_cfg)
    tok = load_tokenizer(pool.base_path)
    for task, t in pool_cfg["tasks"].items():
        texts = read_jsonl(t["test"], task)[0]
        with torch.no_grad():
            logits = torch.func.functional_call(pool.base_model, dict(pool.iter_expert_state(task)), args=(),
                                                kwargs=tok(texts, padding=True, return_tensors="pt")).logits
        t["validation"] = helpers.write_jsonl(tmp_path / f"{task}_val.jsonl", list(zip(texts, logits.argmax(-1).tolist())))
    return pool_cfg


def test_monitor_keeps_the_best_checkpoint_and_exports_the_best_of_three(tmp_path, tiny_pool_cfg):
    """checkpoint.monitor=val_norm: the merge is evaluated on the validation files every 2 steps, Lightning's ModelCheckpoint
    records the best of those, and the export is whichever of start, that checkpoint and the end
    scores highest — its coefficients are the exported ones."""
    out = tmp_path / "run"
    assert helpers.run_inprocess(["method=adamerging_layerwise", "method.lr=0.3", "trainer.max_steps=7",
                                  "checkpoint.every_n_steps=2", "checkpoint.monitor=val_norm", "data.batch_size=4",
                                  "data.max_length=16", "trainer.log_every_n_steps=1", "evaluate.reference_rows=false",
                                  "trainer.enable_progress_bar=false", f"out_dir={out}"],
                                 _pool_with_validation(tmp_path, tiny_pool_cfg)) == 0
    sel = json.loads((out / "export" / "selection.json").read_text())
    watched = dict(helpers.logged(out, "val_norm"))
    assert sorted(watched) == [2, 4, 6]  # a row each, at the step count its checkpoint is named by
    best = sel["best_checkpoint"]
    assert best["val_norm"] == max(watched.values())
    assert best["step"] == max(sorted(watched), key=lambda s: (watched[s], -s))  # the first of equals
    assert Path(best["path"]) == out / "checkpoints" / f"step{best['step']:06d}.ckpt"
    assert set(sel["validation"]) == {"start", "best", "end"}
    scores = {w: sel["validation"][w]["val_norm"] for w in sel["validation"]}
    assert scores["best"] == pytest.approx(best["val_norm"], abs=1e-6)  # the same merge, evaluated again
    assert scores[sel["exported"]] == max(scores.values())
    exported = json.loads((out / "export" / "coefficients.json").read_text())["coefficients"]
    chosen = (torch.load(best["path"], weights_only=False)["state_dict"] if sel["exported"] == "best" else
              torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
              if sel["exported"] == "end" else None)
    if chosen is not None:
        key = "merged.coefficients.raw"
        torch.testing.assert_close(torch.tensor(exported), chosen[key].clamp(0, 1), atol=1e-6, rtol=0)


def test_monitor_without_validation_files_is_one_line_before_training(tmp_path, tiny_pool_cfg, capsys):
    out = tmp_path / "run"
    code = helpers.run_inprocess(["checkpoint.monitor=val_acc", f"out_dir={out}"], pool=tiny_pool_cfg)
    helpers.assert_refused_in_one_line(code, capsys, r"checkpoint.monitor=val_acc needs a labelled validation file "
                                       r"for every task: add pool.tasks.task0.validation", out)


def test_ddp_processes_each_score_their_share_of_the_validation_files(tmp_path, tiny_pool_cfg):
    """Under DDP the monitor splits every validation file between the processes (23 examples: 12 + 11) and
    sums the counts: what it logs for the last step is what rank 0 gets scoring the whole files after training."""
    pool = _pool_with_validation(tmp_path, tiny_pool_cfg)
    for t in pool["tasks"].values():  # an odd count, so the two shares differ in size
        lines = Path(t["validation"]).read_text().splitlines()[:23]
        Path(t["validation"]).write_text("\n".join(lines) + "\n")
    helpers.write_pool_config(tmp_path / "conf", "val", pool)
    out = tmp_path / "run"
    helpers.run_train(["--config-dir", str(tmp_path / "conf"), "pool=val", "method=adamerging_layerwise",
                       "method.lr=0.3", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
                       "trainer.max_steps=4", "checkpoint.every_n_steps=2", "checkpoint.monitor=val_norm",
                       "data.batch_size=4", "data.max_length=16", "trainer.log_every_n_steps=1",
                       "evaluate.reference_rows=false", f"out_dir={out}"], timeout=600)
    shares = {}
    for f in out.glob("*.log"):  # rank 0 logs to train.log, rank 1 to train_ddp_process_1.log
        for m in re.finditer(r"validation monitor: rank (\d) scores (.*)", f.read_text()):
            shares[int(m[1])] = sorted(int(n) for n in re.findall(r" (\d+)(?:,|$)", m[2]))
    assert shares == {0: [12, 12], 1: [11, 11]}
    end = json.loads((out / "export" / "selection.json").read_text())["validation"]["end"]
    for column in ("val_acc", "val_norm"):
        assert dict(helpers.logged(out, column))[4] == pytest.approx(end[column], abs=1e-6)


def test_every_familys_test_set_splits_into_disjoint_shares():
    """``shard(rank, world)`` of each family's test set: per-example fields split rank, rank + world, …;
    shared fields (label words, tokenizer, pool) kept."""
    from adamerge.families.causal import LMTestSet
    from adamerge.families.clip_images import ImageTestSet
    from adamerge.families.seq2seq import Seq2SeqTestSet

    n, words = 5, [[7], [8]]
    sets = [ClassifierTestSet({"input_ids": torch.arange(n)[:, None]}, torch.arange(n), 3),
            LMTestSet([[i] for i in range(n)], list("abcde"), "tok", words, list(range(n)), list(range(n))),
            Seq2SeqTestSet([[i] for i in range(n)], list("abcde"), 0, words, list(range(n))),
            ImageTestSet([f"{i}.png" for i in range(n)], torch.arange(n), "pool")]
    for whole in sets:
        shares = [whole.shard(r, 2) for r in range(2)]
        assert [len(s) for s in shares] == [3, 2] and type(shares[0]) is type(whole)
        for r, s in enumerate(shares):
            if isinstance(s, ClassifierTestSet):
                assert s.labels.tolist() == s.encoded["input_ids"][:, 0].tolist() == list(range(r, n, 2))
            elif isinstance(s, ImageTestSet):
                assert s.labels.tolist() == list(range(r, n, 2)) and s.paths[0] == f"{r}.png" and s.pool == "pool"
            else:
                assert s.answers == [p[0] for p in s.prompts] == list(range(r, n, 2)) and s.classes == words
                assert s.targets == list("abcde"[r::2])
                if isinstance(s, LMTestSet):
                    assert s.max_new == list(range(r, n, 2)) and s.tokenizer == "tok"


def test_holdout_split_is_seeded_per_task_and_never_takes_everything():
    from adamerge.run.data import split_holdout

    items = list(range(50))
    train, held = split_holdout(items, 0.2, seed=0, task_idx=0)
    assert len(held) == 10 and sorted(train + held) == items and not set(train) & set(held)
    assert train == sorted(train)  # the training texts keep their order
    assert split_holdout(items, 0.2, seed=0, task_idx=0) == (train, held)  # reproducible
    assert split_holdout(items, 0.2, seed=0, task_idx=1)[1] != held  # each task draws its own
    assert split_holdout(items, 0.2, seed=1, task_idx=0)[1] != held
    assert split_holdout([7, 8], 0.2, 0, 0)[1] in ([7], [8])  # at least one held out ...
    assert split_holdout([7, 8], 0.9, 0, 0)[0] in ([7], [8])  # ... and at least one trained on
    assert split_holdout([7], 0.5, 0, 0) == ([7], []) and split_holdout(items, 0.0, 0, 0) == (items, [])


def test_without_validation_files_the_held_out_objective_picks_the_export(tmp_path, tiny_pool_cfg):
    """The default checkpoint.monitor=auto on a pool without validation files: a fifth of every task's
    calibration texts is held out, the method's objective there is logged every 2 steps (and at step 0), the
    lowest checkpoint is recorded, and start, best and end are compared by it — the exported
    coefficients are the winner's."""
    out = tmp_path / "run"
    helpers.train_here(tiny_pool_cfg, out, "method=adamerging_layerwise", "method.lr=3.0", "trainer.max_steps=6",
                       "checkpoint.every_n_steps=2", "data.batch_size=4", "data.max_length=16",
                       "evaluate.reference_rows=false", "trainer.enable_progress_bar=false")
    sel = json.loads((out / "export" / "selection.json").read_text())
    held = dict(helpers.logged(out, "holdout_objective"))
    assert sorted(held) == [0, 2, 4, 6]
    best = sel["best_checkpoint"]
    assert best["holdout_objective"] == pytest.approx(min(held[s] for s in (2, 4, 6)), rel=1e-6)
    assert set(sel["holdout_objective"]) == {"start", "best", "end"}
    assert sel["holdout_objective"]["start"] == pytest.approx(held[0], rel=1e-5)
    assert sel["holdout_objective"]["end"] == pytest.approx(held[6], rel=1e-5)
    scores = sel["holdout_objective"]
    assert scores[sel["exported"]] == min(scores.values()) and "held-out objective" in sel["why"]
    exported = torch.tensor(json.loads((out / "export" / "coefficients.json").read_text())["coefficients"])
    state = {"start": None, "best": best["path"], "end": str(out / "checkpoints" / "last.ckpt")}[sel["exported"]]
    want = (torch.load(state, weights_only=False)["state_dict"]["merged.coefficients.raw"].clamp(0, 1)
            if state else torch.full_like(exported, 0.3))
    torch.testing.assert_close(exported, want, atol=1e-6, rtol=0)


def test_holdout_monitor_without_held_out_texts_is_one_line_before_training(tmp_path, tiny_pool_cfg, capsys):
    out = tmp_path / "run"
    code = helpers.run_inprocess(["checkpoint.monitor=holdout_objective", "data.holdout_fraction=0",
                                  f"out_dir={out}"], pool=tiny_pool_cfg)
    helpers.assert_refused_in_one_line(code, capsys, r"checkpoint.monitor=holdout_objective needs held-out "
                                       r"calibration texts: set data.holdout_fraction > 0", out)


def test_each_purpose_has_its_own_batch_stream():
    """Training, the start-vs-end comparison and FW-Merging's inner steps never step through the same batches."""
    from adamerge.run.data import STREAM_SEEDS, stream

    enc = {"t": {"input_ids": torch.arange(64).view(64, 1), "attention_mask": torch.ones(64, 1, dtype=torch.long)}}
    first = {p: stream(enc, 8, seed=0, purpose=p).batch(0)["t"]["input_ids"].flatten().tolist() for p in STREAM_SEEDS}
    assert len({tuple(v) for v in first.values()}) == len(STREAM_SEEDS), first
    again = stream(enc, 8, seed=0, purpose="train").batch(0)["t"]["input_ids"].flatten().tolist()
    assert again == first["train"]  # a pure function of (seed, purpose, step)
