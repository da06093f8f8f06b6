"""What a run leaves behind and how it behaves as a process: servable exports written atomically (disk full,
killed between renames, umask), progress lines and loggers, the out_dir lock, global rank, the hub switch."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import helpers
from helpers import inprocess, train_conf


def test_export_has_a_servable_model_per_task_and_a_model_card(tiny_pool_cfg, tmp_path):
    """export/model is the backbone alone; export/tasks/<task> is that task's model, from_pretrained as is."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from adamerge.export import load_task_model

    assert helpers.run_inprocess([f"out_dir={tmp_path / 'run'}", "method=task_arithmetic",
                                  "evaluate.reference_rows=false"], tiny_pool_cfg) == 0
    export = tmp_path / "run" / "export"
    for task, n_labels in (("task0", 2), ("task1", 3)):
        served = AutoModelForSequenceClassification.from_pretrained(str(export / "tasks" / task)).eval()
        assert served.config.num_labels == n_labels
        batch = AutoTokenizer.from_pretrained(str(export / "tasks" / task))(["goal match team"], return_tensors="pt")
        with torch.no_grad():
            torch.testing.assert_close(served(**batch).logits, load_task_model(export, task)(**batch).logits)
    card = (export / "README.md").read_text()
    assert "task_arithmetic" in card and "task0" in card and "task1" in card, card
    assert "## Evaluation" in card and 'from_pretrained("export/tasks/task0")' in card, card
    from huggingface_hub import ModelCard

    meta = ModelCard.load(export / "README.md").data  # the Hub's front matter, read by huggingface_hub
    assert meta.tags == ["merge", "adamerge", "task_arithmetic"] and meta.library_name == "transformers"
    assert meta.base_model is None  # a local base: no hub id to name


def test_stale_export_temporaries_are_removed(tiny_pool_cfg, tmp_path, caplog):
    """A kill -9 during export leaves ``.export.tmp-*``: the next run into the out_dir removes it, says so."""
    run = tmp_path / "run"
    stale = run / ".export.tmp-abc123"
    (stale / "model").mkdir(parents=True)
    (stale / "model" / "model.safetensors").write_bytes(b"half written")
    other = run / ".other.tmp-1"  # not a temporary of this export dir: left alone
    other.mkdir()
    assert inprocess(tmp_path, tiny_pool_cfg, "method=task_arithmetic") == 0
    assert not stale.exists() and other.exists()
    assert (run / "export" / "coefficients.json").exists()
    lines = [r.getMessage() for r in caplog.records if "interrupted export" in r.getMessage()]
    assert lines == ["removed 1 temporary directory left by an interrupted export: .export.tmp-abc123"], lines


def test_importing_the_package_leaves_the_hub_alone_and_the_cli_switches_it_off():
    """A notebook that imports adamerge keeps its hub access; train.py (the CLI) is offline unless told."""
    code = ("import os, sys; import adamerge, adamerge.methods, adamerge.pool.config; "
            "assert 'HF_HUB_OFFLINE' not in os.environ, 'import switched the hub off'; "
            f"sys.path.insert(0, {str(helpers.ROOT)!r}); import train; print(os.environ['HF_HUB_OFFLINE'])")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "1", proc.stderr[-2000:]


def test_the_first_process_of_a_second_node_does_no_rank_zero_start_up_work(tiny_pool_cfg, tmp_path, monkeypatch):
    """On a 2-node run each node's first process has LOCAL_RANK 0; only node 0's is rank 0. The other must
    neither clean the export target's temporaries (rank 0's export may be writing them) nor write .hydra/."""
    run = tmp_path / "run"
    stale = run / ".export.tmp-abc123"
    stale.mkdir(parents=True)
    for key in ("RANK", "SLURM_PROCID", "SLURM_NTASKS", "GROUP_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "1")
    assert inprocess(tmp_path, tiny_pool_cfg, "method=task_arithmetic") == 0
    assert stale.exists() and not (run / ".hydra").exists()
    monkeypatch.setenv("NODE_RANK", "0")  # node 0's first process: rank 0
    assert inprocess(tmp_path, tiny_pool_cfg, "method=task_arithmetic", "export.overwrite=true") == 0
    assert not stale.exists() and (run / ".hydra" / "config.yaml").exists()


@pytest.mark.parametrize("env, zero", [
    ({}, True),                                                   # one process, or Lightning's first
    ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, False),               # a process Lightning starts
    ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),               # the first process of the second node
    ({"RANK": "0", "LOCAL_RANK": "0"}, True),                     # torchrun
    ({"RANK": "4", "LOCAL_RANK": "0"}, False),                    # torchrun, second node
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "LOCAL_RANK": "0"}, False),  # srun
])
def test_launch_is_rank_zero(monkeypatch, env, zero):
    from adamerge.run.distributed import launch_is_rank_zero

    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert launch_is_rank_zero() is zero


def test_export_killed_between_renames_keeps_the_previous_export(tmp_path):
    """Killed after the old export was moved aside and before the new one took its place: put it back."""
    from adamerge.atomic import remove_stale_temporaries

    (tmp_path / ".export.old-x1").mkdir()
    (tmp_path / ".export.old-x1" / "eval.md").write_text("previous")
    (tmp_path / ".export.tmp-x2").mkdir()
    assert [p.name for p in remove_stale_temporaries(tmp_path / "export")] == [".export.tmp-x2"]
    assert (tmp_path / "export" / "eval.md").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=oct)
def test_outputs_honour_the_umask(tiny_pool_cfg, tmp_path, umask):
    """export/ and checkpoints get the modes a plain mkdir/open would give (not mkdtemp's 0700, mkstemp's 0600)."""
    old = os.umask(umask)
    try:
        assert inprocess(tmp_path, tiny_pool_cfg, "method=adamerging_layerwise", "trainer.max_steps=2",
                         "checkpoint.every_n_steps=1") == 0
    finally:
        os.umask(old)
    run = tmp_path / "run"

    def mode(p):
        return p.stat().st_mode & 0o777

    assert mode(run / "export") == 0o777 & ~umask
    assert mode(run / "export" / "model") == 0o777 & ~umask
    assert mode(run / "export" / "coefficients.json") == 0o666 & ~umask
    for ckpt in ("last.ckpt", "step000001.ckpt"):
        assert mode(run / "checkpoints" / ckpt) == 0o666 & ~umask, ckpt


def test_progress_lines_in_the_log_file(conf, tmp_path):
    """stdout is not a terminal here: progress still reaches train.log, a line per N steps and the last."""
    run = tmp_path / "run"
    train_conf(conf, run, "method=adamerging_layerwise", "trainer.max_steps=12", "progress.every_n_steps=5",
          "progress.every_s=1000")
    lines = re.findall(r"step (\d+)/12  loss -?\d+\.\d+  s/step \d+\.\d+  ETA \d+s  "
                       r"coef mean/min/max -?\d\.\d+/-?\d\.\d+/-?\d\.\d+$", (run / "train.log").read_text(), re.M)
    assert lines == ["5", "10", "12"], (run / "train.log").read_text()


def test_progress_lines_every_n_steps_and_after_every_s_seconds(caplog, monkeypatch):
    """10 s a step, a line every 5 steps or after 30 s without one, and the last step."""
    from types import SimpleNamespace

    import adamerge.run.progress as progress

    clock = {"t": 0.0}
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock["t"])
    cb = progress.ProgressLog(every_n_steps=5, every_s=30)
    trainer = SimpleNamespace(global_step=0, max_steps=12, is_global_zero=True,
                              callback_metrics={"loss": torch.tensor(0.5)})
    cb.on_train_start(trainer, None)
    with caplog.at_level(logging.INFO, logger="adamerge"):
        for s in range(1, 13):
            clock["t"], trainer.global_step = 10.0 * s, s
            cb.on_train_batch_end(trainer, None, None, None, s)
    assert [r.getMessage().split("  ")[0] for r in caplog.records] == [
        "step 3/12", "step 5/12", "step 8/12", "step 10/12", "step 12/12"]


def test_progress_eta_follows_the_recent_step_rate_after_a_pause(caplog, monkeypatch):
    """1 s a step, a 1,000 s pause after step 10 (a suspended job), then 1 s a step again: 25 steps later the
    line shows 1 s/step and the ETA of the 65 steps left, not an average over the pause."""
    from types import SimpleNamespace

    import adamerge.run.progress as progress

    clock = {"t": 0.0}
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock["t"])
    cb = progress.ProgressLog(every_n_steps=5, every_s=1e9, window=20)
    trainer = SimpleNamespace(global_step=0, max_steps=100, is_global_zero=True, callback_metrics={})
    cb.on_train_start(trainer, None)
    with caplog.at_level(logging.INFO, logger="adamerge"):
        for s in range(1, 36):
            clock["t"] = s + (1000.0 if s > 10 else 0.0)
            trainer.global_step = s
            cb.on_train_batch_end(trainer, None, None, None, s)
    lines = {r.getMessage().split("  ")[0]: r.getMessage() for r in caplog.records}
    assert "s/step 1.000" in lines["step 35/100"] and "ETA 1m05s" in lines["step 35/100"]
    assert "s/step 51.000" in lines["step 30/100"]  # the pause is still inside the last 20 steps there


def test_quiet_start_up(conf, tmp_path):
    """No Lightning tips or accelerator lines, no third-party deprecation warnings; verbose=true shows them.
    Output to a file or pipe gets no progress bar (its redrawn lines would fill the log): progress lines."""
    args = ("method=adamerging_layerwise", "trainer.max_steps=2")
    with ThreadPoolExecutor(2) as runs:  # both at once: interpreter start-up dominates each
        quiet = runs.submit(train_conf, conf, tmp_path / "run", *args)
        verbose = runs.submit(train_conf, conf, tmp_path / "verbose", *args, "verbose=true")
        p, loud = quiet.result(), verbose.result()
    out = p.stdout + p.stderr
    assert "it/s" not in out and "step 2/2  loss" in out, out
    for noise in ("Tip", "deprecated", "GPU available", "TPU available", "Loading weights"):
        assert noise not in out, out
    assert "exported merged model" in out
    assert sorted(f.name for f in (tmp_path / "run" / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml",
                                                                              "overrides.yaml"]
    assert "GPU available" in loud.stdout + loud.stderr


def test_tensorboard_logger_writes_events_and_keeps_the_csv_log(conf, tmp_path):
    pytest.importorskip("tensorboardX")
    run = tmp_path / "run"
    p = train_conf(conf, run, "method=adamerging_layerwise", "trainer.max_steps=3", "trainer.log_every_n_steps=1",
              "logger=tensorboard")
    assert p.returncode == 0, p.stderr[-2000:]
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert helpers.logged_losses(run)  # the CSV log the export's loss curve reads


def test_unknown_or_unavailable_logger_is_one_line_before_any_work(tiny_pool_cfg, tmp_path, capsys):
    import importlib.util

    def refused(out: Path, logger: str, pattern: str) -> None:
        code = helpers.run_inprocess(["method=adamerging_layerwise", f"out_dir={out}", f"logger={logger}",
                                      "data.batch_size=8", "evaluate.enabled=false"], tiny_pool_cfg)
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert re.search(pattern, err), err
        assert not (out / "checkpoints").exists()

    refused(tmp_path / "a", "tensorbord", r"unknown config key 'logger.tensorbord'.*did you mean 'logger.tensorboard'")
    missing = next((n for n in ("wandb", "mlflow") if importlib.util.find_spec(n) is None), None)
    if missing:
        refused(tmp_path / "b", missing, rf"logger={missing} needs the package {missing} \(pip install {missing}\)")


def test_disk_full_during_the_export_is_one_line_and_keeps_the_checkpoints(tiny_pool_cfg, tmp_path, monkeypatch,
                                                                            capsys):
    import errno

    import adamerge.export as export

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "coefficients.png"))

    monkeypatch.setattr(export, "plot_coefficients", full)
    code = helpers.run_inprocess([f"out_dir={tmp_path / 'run'}", "method=adamerging_layerwise", "trainer.max_steps=2",
                                  "data.batch_size=4", "evaluate.enabled=false", "trainer.enable_progress_bar=false"],
                                 tiny_pool_cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: [Errno 28] No space left on device") and "Traceback" not in err
    assert "coefficients.png" in err[-1]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()  # training is not lost: resume=last
    assert not (tmp_path / "run" / "export").exists()


def test_a_second_run_into_a_locked_out_dir_is_refused_and_a_dead_holder_s_lock_is_taken_over(
        tiny_pool_cfg, tmp_path, capsys):
    """A live run holds out_dir/.adamerge.run.lock (pid, host): a second run into it stops before writing anything,
    naming the holder. A lock whose process is gone (a crashed run) is taken over, and released at the end."""
    import socket

    run = tmp_path / "run"
    run.mkdir()
    lock = run / ".adamerge.run.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        assert inprocess(tmp_path, tiny_pool_cfg, "method=adamerging_layerwise", "trainer.max_steps=2") == 2
        err = capsys.readouterr().err
        assert f"is in use by another run (process {holder.pid} on host {socket.gethostname()})" in err
        assert sorted(p.name for p in run.iterdir()) == [".adamerge.run.lock"]  # nothing written, the lock kept
    finally:
        holder.kill()
        holder.wait()
    assert inprocess(tmp_path, tiny_pool_cfg, "method=adamerging_layerwise", "trainer.max_steps=2") == 0
    assert (run / "export" / "coefficients.json").exists() and not lock.exists()
