"""The run is a program in the package (adamerge/run/program.py), train.py a Hydra shim over it: a Python
caller runs the same program in-process, without the command line."""

from __future__ import annotations

import json
from pathlib import Path

import helpers


def test_a_python_caller_runs_the_program_without_the_command_line(tiny_pool_cfg, tmp_path):
    from adamerge.run.program import run

    out = tmp_path / "run"
    cfg = helpers.compose([f"out_dir={out}", "method=adamerging_taskwise", "trainer.max_steps=2", "data.batch_size=4",
                           "data.max_length=16", "evaluate.reference_rows=false", "trainer.enable_progress_bar=false"],
                          tiny_pool_cfg)
    result = run(cfg)
    assert Path(result["export"]) == out / "export" and (out / "export" / "coefficients.json").exists()
    assert result["selection"]["exported"] in ("start", "best", "end")
    assert result["eval"] == json.loads((out / "eval.json").read_text())  # the table it printed and saved
    assert (out / ".hydra" / "config.yaml").exists()


def test_train_py_is_a_shim():
    """The command line only composes the config and hands it to the program."""
    assert len((helpers.ROOT / "train.py").read_text().splitlines()) <= 60


def test_threads_sets_torchs_cpu_threads_and_a_bad_value_is_one_line(tmp_path, capsys):
    import torch
    from peer_pool import make_seeded_llama_pool

    pool = make_seeded_llama_pool(tmp_path / "pool")
    before = torch.get_num_threads()
    try:
        helpers.train_here(pool, tmp_path / "run", "method=task_arithmetic", "evaluate.enabled=false", "threads=1")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()
    code = helpers.run_inprocess([f"out_dir={tmp_path}/bad", "method=task_arithmetic", "threads=0"], pool)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "'threads'" in err, err
