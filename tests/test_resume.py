"""Interrupted runs (SIGKILL, SIGTERM, Ctrl-C, a truncated checkpoint) resume to the uninterrupted result;
resuming from another pool, method or a finished run is refused with one line."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import helpers
from helpers import ROOT, assert_clear_error, exported_coefficients, inprocess, train_conf


def _spawn(conf, out, *extra):
    cmd = [sys.executable, str(ROOT / "train.py"), "--config-dir", str(conf), "pool=tiny", f"out_dir={out}",
           "data.batch_size=8", "evaluate.enabled=false", "method=adamerging_layerwise", "method.lr=0.05",
           "checkpoint.every_n_steps=2", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))


def _wait_for(path_glob: Path, pattern: str, timeout: float = 300) -> None:
    t0 = time.time()
    while not list(path_glob.glob(pattern)):
        if time.time() - t0 > timeout:
            raise TimeoutError(f"no {pattern} in {path_glob}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def uninterrupted12(tiny_conf_dir, tmp_path_factory):
    """The 12-step run both kill tests must reproduce after their resume (the pool is tiny_conf_dir's, as conf's)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "full"
    train_conf(tiny_conf_dir, out, "method=adamerging_layerwise", "method.lr=0.05", "checkpoint.every_n_steps=2",
          "trainer.max_steps=12")
    return out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_to_the_same_result(conf, uninterrupted12, tmp_path, sig):
    steps = "trainer.max_steps=12"
    run = tmp_path / "killed"
    p = _spawn(conf, run, steps)
    _wait_for(run / "checkpoints", "step000004.ckpt")
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert p.returncode == 143, err[-2000:]
        assert "resume=last" in err
        assert (run / "checkpoints" / "last.ckpt").exists()
    else:
        assert p.returncode == -9
    assert not (run / "export").exists()  # nothing half-written
    train_conf(conf, run, "method=adamerging_layerwise", "method.lr=0.05", "checkpoint.every_n_steps=2", steps,
          "resume=last")
    torch.testing.assert_close(exported_coefficients(run), exported_coefficients(uninterrupted12), atol=1e-6, rtol=0)


def test_every_checkpoint_names_a_best_checkpoint_that_still_exists(tmp_path, tiny_pool_cfg):
    """A kill can land between any two checkpoint writes, and the run then resumes from whichever checkpoint
    is newest. So each checkpoint's record of the best (held-out objective) checkpoint must name a file that
    is still there — and resuming from a middle checkpoint exports the uninterrupted run's merge."""
    run = tmp_path / "run"
    common = ["method=adamerging_layerwise", "method.lr=0.5", "data.batch_size=4", "data.max_length=16",
              "evaluate.enabled=false", "checkpoint.every_n_steps=2", "trainer.max_steps=8"]
    helpers.train_here(tiny_pool_cfg, run, *common)
    held = dict(helpers.logged(run, "holdout_objective"))
    assert len({round(held[s], 6) for s in (2, 4, 6, 8)}) > 1  # the best moved during the run
    saved = sorted((run / "checkpoints").glob("step*.ckpt"))
    assert [p.name for p in saved] == [f"step{s:06d}.ckpt" for s in (2, 4, 6, 8)]
    for ckpt in saved:
        recorded = [v["best_model_path"] for k, v in torch.load(ckpt, weights_only=False)["callbacks"].items()
                    if k.startswith("ModelCheckpoint")]
        assert recorded and all(Path(r).is_file() for r in recorded), (ckpt.name, recorded)
    exported, coefs = json.loads((run / "export" / "selection.json").read_text())["exported"], exported_coefficients(run)
    for later in ("step000006.ckpt", "step000008.ckpt", "last.ckpt"):
        (run / "checkpoints" / later).unlink()  # as if killed just after step 4's checkpoint
    helpers.train_here(tiny_pool_cfg, run, *common, "resume=last", "export.overwrite=true")
    assert json.loads((run / "export" / "selection.json").read_text())["exported"] == exported
    torch.testing.assert_close(exported_coefficients(run), coefs, atol=1e-6, rtol=0)


def test_truncated_newest_checkpoint_falls_back_to_previous(tmp_path, tiny_pool_cfg, capsys, caplog):
    run = tmp_path / "run"
    common = ["method=adamerging_layerwise", "data.batch_size=8", "evaluate.enabled=false", "checkpoint.every_n_steps=2"]
    helpers.train_here(tiny_pool_cfg, run, *common, "trainer.max_steps=4")
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:200])
    os.utime(last)  # newest
    with caplog.at_level(logging.WARNING, logger="adamerge"):
        helpers.train_here(tiny_pool_cfg, run, *common, "trainer.max_steps=6", "resume=last", "export.overwrite=true")
    assert "last.ckpt is unreadable or truncated" in caplog.text + capsys.readouterr().err
    bad = run / "checkpoints" / "bad.ckpt"
    bad.write_bytes(last.read_bytes()[:200])
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    # refused before any work: train.py's cli in this process (the same pool as conf's)
    args = ["method=adamerging_layerwise", f"out_dir={run}", "data.batch_size=8", "evaluate.enabled=false",
            "trainer.max_steps=8", "export.overwrite=true"]
    for ckpt, words in ((bad, "bad.ckpt: checkpoint is unreadable or truncated"), (foreign, "not an adamerge checkpoint")):
        assert helpers.run_inprocess([*args, f"resume={ckpt}"], tiny_pool_cfg) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_nonfinite_loss_stops_or_skips(tmp_path, tiny_pool_cfg, capsys, caplog):
    def huge_head(cfg, tmp):
        # pooled output = tanh(huge) = 1 exactly, so every logit = Σ 3e38 overflows to inf -> NaN entropy
        helpers.edit_weights(helpers.copy_expert(cfg, "task0", tmp), lambda sd: sd.update(
            {n: torch.full_like(sd[n], 3e38) for n in ("bert.pooler.dense.bias", "classifier.weight")}))

    cfg = json.loads(json.dumps(tiny_pool_cfg))
    huge_head(cfg, tmp_path)
    args = ["method=adamerging_layerwise", "trainer.max_steps=3", "data.batch_size=8", "evaluate.enabled=false"]
    assert helpers.run_inprocess([*args, f"out_dir={tmp_path / 'run'}"], cfg) == 2
    err = capsys.readouterr().err
    assert "non-finite loss nan at step 0; nothing was exported" in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "export").exists()
    with caplog.at_level(logging.WARNING, logger="adamerge"):
        assert helpers.run_inprocess([*args, f"out_dir={tmp_path / 'run2'}", "+method.nonfinite=skip"], cfg) == 0
    assert "step skipped" in caplog.text
    assert torch.allclose(exported_coefficients(tmp_path / "run2"), torch.tensor(0.3))  # no step was taken


def _nudge_one_element(cfg, tmp):
    """task1's expert with one element of one tensor changed (as if fine-tuned a little further)."""
    helpers.edit_weights(helpers.copy_expert(cfg, "task1", tmp),
                         lambda sd: sd["bert.encoder.layer.1.attention.self.value.weight"].view(-1)[1].add_(1e-3))


def test_resume_refuses_a_pool_that_differs_in_one_element(tiny_pool_cfg, tmp_path, capsys):
    args = ("method=adamerging_layerwise", "export.overwrite=true")
    assert inprocess(tmp_path, tiny_pool_cfg, *args, "trainer.max_steps=2") == 0
    other = json.loads(json.dumps(tiny_pool_cfg))
    _nudge_one_element(other, tmp_path)
    capsys.readouterr()
    assert inprocess(tmp_path, other, *args, "trainer.max_steps=4", "resume=last") == 2
    assert re.search(r"error: checkpoint was made from a different pool: experts: .*'task1'", capsys.readouterr().err)


def test_resume_refuses_swapped_lora_experts(tmp_path, capsys):
    """LoRA experts differ only in their target modules; swapping two of them is another pool."""
    lora = helpers.make_pool(tmp_path / "lora", k=3, form="lora")  # task0 and task2: both 2 labels
    args = ("method=adamerging_layerwise", "export.overwrite=true")
    assert inprocess(tmp_path, lora, *args, "trainer.max_steps=2") == 0
    swapped = json.loads(json.dumps(lora))
    t = swapped["tasks"]
    t["task0"]["expert"], t["task2"]["expert"] = t["task2"]["expert"], t["task0"]["expert"]
    capsys.readouterr()
    assert inprocess(tmp_path, swapped, *args, "trainer.max_steps=4", "resume=last") == 2
    assert re.search(r"error: checkpoint was made from a different pool: experts: ", capsys.readouterr().err)


def test_rerun_into_a_run_dir_with_checkpoints_is_refused(tiny_pool_cfg, tmp_path, capsys):
    """Without resume=, a learned method would overwrite the run's last.ckpt: refused before training."""
    args = ("method=adamerging_layerwise", "export.overwrite=true")
    assert inprocess(tmp_path, tiny_pool_cfg, *args, "trainer.max_steps=2") == 0
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    capsys.readouterr()
    assert inprocess(tmp_path, tiny_pool_cfg, *args, "trainer.max_steps=4") == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: .*/run/checkpoints already holds checkpoints of a run; continue it with "
                        r"resume=last or give a new out_dir\n", err), err
    assert last.read_bytes() == before
    assert inprocess(tmp_path, tiny_pool_cfg, *args, "trainer.max_steps=4", "resume=last") == 0
    assert inprocess(tmp_path, tiny_pool_cfg, "method=task_arithmetic", "export.overwrite=true") == 0  # trains nothing


def test_refused_rerun_keeps_the_old_runs_hydra_files(conf, tiny_pool_cfg, tmp_path, capsys):
    """Hydra would write .hydra/ before any check: a rerun refused for its out_dir must not overwrite them."""
    run = tmp_path / "run"
    train_conf(conf, run, "method=adamerging_layerwise", "trainer.max_steps=2")  # through Hydra: its train.log
    hydra_before = {f.name: f.read_bytes() for f in (run / ".hydra").iterdir()}
    assert b"max_steps: 2" in hydra_before["config.yaml"]
    log_before = (run / "train.log").read_bytes()
    assert log_before
    p = train_conf(conf, run, "method=adamerging_layerwise", "trainer.max_steps=4", "export.overwrite=true",
              check=False)  # through Hydra
    assert_clear_error(p, r"already holds checkpoints of a run")
    assert {f.name: f.read_bytes() for f in (run / ".hydra").iterdir()} == hydra_before
    assert (run / "train.log").read_bytes() == log_before  # the old run's log is not appended to


def test_resume_for_a_method_that_does_not_train(tiny_pool_cfg, tmp_path, capsys, caplog):
    """Nothing to resume: a missing checkpoint path is still named; an existing one or last only warns."""
    assert inprocess(tmp_path, tiny_pool_cfg, "method=task_arithmetic", f"resume={tmp_path / 'nope.ckpt'}") == 2
    assert re.search(r"error: resume=.*/nope.ckpt: checkpoint file does not exist", capsys.readouterr().err)
    assert not (tmp_path / "run" / "export").exists()
    (tmp_path / "some.ckpt").write_bytes(b"")
    for resume in ("last", str(tmp_path / "some.ckpt")):
        caplog.clear()
        assert inprocess(tmp_path, tiny_pool_cfg, "method=task_arithmetic", f"resume={resume}",
                         "export.overwrite=true") == 0
        assert f"method task_arithmetic does not train, so it has nothing to resume: resume={resume} ignored" \
            in caplog.text


def test_ctrl_c_checkpoints_and_resumes(conf, tiny_pool_cfg, tmp_path):
    """SIGINT during training does what SIGTERM does: last.ckpt, the resume hint, exit code 130."""
    run = tmp_path / "run"
    p = _spawn(conf, run, "trainer.max_steps=200")  # many steps: still training when the signal comes
    try:
        _wait_for(run / "checkpoints", "step000004.ckpt", timeout=120)
        assert p.poll() is None, "training ended before the signal"
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err[-2000:]
    assert re.search(rf"(?m)^interrupted \(SIGINT\): last checkpoint written; continue with out_dir={run} "
                     r"resume=last$", err), err[-2000:]
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 4 <= step < 200
    assert not (run / "export").exists()
    # the checkpoint goes on: two more steps (the 200 only kept the first process busy), in this process
    helpers.train_here(tiny_pool_cfg, run, "data.batch_size=8", "evaluate.enabled=false", "method=adamerging_layerwise",
                       "method.lr=0.05", "checkpoint.every_n_steps=2", f"trainer.max_steps={step + 2}", "resume=last")
    assert json.loads((run / "export" / "coefficients.json").read_text())["num_trainable"] > 0
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == step + 2


def test_progress_bar_counts_steps_also_after_a_resume(conf, tmp_path):
    """The bar reads "step … k/max_steps", not Lightning's "Epoch 0/-2" of an endless stream."""
    run = tmp_path / "run"
    p = train_conf(conf, run, "method=adamerging_layerwise", "trainer.max_steps=4", "checkpoint.every_n_steps=2",
              "trainer.enable_progress_bar=true")  # on (stdout is a pipe here, where the default is off)
    out = p.stdout + p.stderr  # Lightning draws its bar on stdout
    assert re.search(r"step: 100%.*\b4/4\b", out) and "Epoch" not in out, out[-2000:]
    (run / "export").rename(tmp_path / "first_export")
    p = train_conf(conf, run, "method=adamerging_layerwise", "trainer.max_steps=6", "checkpoint.every_n_steps=2",
              "resume=last", "trainer.enable_progress_bar=true")
    out = p.stdout + p.stderr
    assert re.search(r"step: 100%.*\b6/6\b", out) and "Epoch" not in out, out[-2000:]


def test_sigterm_outside_training_is_143_with_one_line(tiny_pool_cfg, tmp_path, monkeypatch, capsys):
    """SIGTERM while loading, evaluating or exporting (no Trainer handler then): exit 143, one line, and
    the previous SIGTERM handler is back afterwards."""
    from adamerge.run.cli import cli

    def terminated_while_exporting(cfg):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("SIGTERM was not handled")

    from adamerge.run import program

    monkeypatch.setattr(program, "run", terminated_while_exporting)
    before = signal.getsignal(signal.SIGTERM)
    code = cli(helpers.compose([f"out_dir={tmp_path / 'run'}"], tiny_pool_cfg))
    assert code == 143
    assert capsys.readouterr().err.strip().splitlines() == ["interrupted (SIGTERM)"]
    assert signal.getsignal(signal.SIGTERM) is before
