"""A learned merge is compared with its start: calibration objective always, validation accuracy when a
task has a validation file; the better merge is exported."""

from __future__ import annotations

import json

import torch

import helpers
from adamerge.data import load_tokenizer
from adamerge.evaluate import accuracy, load_test_sets
from adamerge.families.classifier import ClassifierTestSet
from adamerge.methods import get_method
from adamerge.start_vs_end import calibration_objective, choose, merged_at, monitor_batches, snapshot


def _method(pool):
    return get_method("adamerging")(pool, {"name": "adamerging", "id": "am", "granularity": "layer", "init": 0.3})


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
    assert out["exported"] == "start" and out["validation"]["start"]["avg"] == 1.0
    assert out["calibration_objective"]["start"] == start_loss
    torch.testing.assert_close(m.merged.coefficients.raw, start["merged.coefficients.raw"])

    # labels from the end's predictions: the end is kept
    m.load_state_dict(end)
    out = choose(m, start, start_loss, batches, _labelled_by(m, pool, end, tests), batch_size=8)
    assert out["exported"] == "end"
    torch.testing.assert_close(m.merged.coefficients.raw, end["merged.coefficients.raw"])


def test_train_py_reports_start_and_end(tmp_path, tiny_pool_cfg):
    pool_cfg = json.loads(json.dumps(tiny_pool_cfg))
    for t in pool_cfg["tasks"].values():
        t["validation"] = t["test"]
    conf = tmp_path / "conf"
    helpers.write_pool_config(conf, "tiny_val", pool_cfg)
    out = tmp_path / "run"
    proc = helpers.run_train(["--config-dir", str(conf), "pool=tiny_val", "method=adamerging_layerwise",
                              "trainer.max_steps=3", "data.batch_size=4", "data.max_length=16",
                              "trainer.enable_progress_bar=false", f"out_dir={out}"])
    sel = json.loads((out / "export" / "selection.json").read_text())
    assert set(sel["calibration_objective"]) == {"start", "end"} and sel["exported"] in ("start", "end")
    assert set(sel["validation"]) == {"start", "end"}
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert "start: task_arithmetic λ=0.3" in rows  # the start row beside the learned one
    assert "calibration objective: start" in proc.stdout + proc.stderr
