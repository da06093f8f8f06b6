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
