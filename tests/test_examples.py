"""Every script in examples/ runs, as a user would run it (a subprocess from another directory), on pools the
tests build."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import helpers

EXAMPLES = helpers.ROOT / "examples"


def run_example(script: str, cwd, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def task_args(cfg: dict, with_test: bool) -> list[str]:
    out = []
    for name, t in cfg["tasks"].items():
        files = [t["expert"], t["calibration"]] + ([t["test"]] if with_test else [])
        out += ["--task", f"{name}={','.join(files)}"]
    return out


def test_examples_are_all_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == ["lora_in_lora_out.py", "merge_my_models.py"]


def test_merge_my_models(tiny_pool_cfg, tmp_path):
    proc = run_example("merge_my_models.py", tmp_path, "--base", tiny_pool_cfg["base"], *task_args(tiny_pool_cfg, True),
                       "--out", str(tmp_path / "mine"), "--steps", "2")
    assert f"exported to {tmp_path / 'mine' / 'export'}" in proc.stdout
    assert (tmp_path / "mine" / "export" / "tasks" / "task0" / "config.json").exists()


@pytest.fixture(scope="module")
def lora_cfg(tmp_path_factory):
    return helpers.make_pool(tmp_path_factory.mktemp("lora_pool"), k=2, form="lora")


def test_lora_in_lora_out(lora_cfg, tmp_path):
    proc = run_example("lora_in_lora_out.py", tmp_path, "--base", lora_cfg["base"], *task_args(lora_cfg, False),
                       "--out", str(tmp_path / "lora"), "--steps", "2")
    assert "export/lora loaded with peft: largest relative difference to the dense export" in proc.stdout
